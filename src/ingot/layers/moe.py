"""Feed-forward layers: the gated SiLU MLP (dense layers, each MoE expert, the shared experts) and DeepSeek-V3's MoE.

DeepSeek-V3 routing (transformers' DeepseekV3TopkRouter, DeepSeek's ``Gate``), per token:
1. scores = sigmoid(x @ W_gate^T), in float32 (the router is never quantized: 256 x 7168 weights, 0.02% of a layer).
2. Selection only sees scores + e_score_correction_bias (the aux-loss-free balancing bias); the bias never enters
   the output weights.
3. Group-limited: experts form n_group groups (8 of 32); a group's score is the sum of its top-2 biased scores; only
   the topk_group best groups (4) stay eligible; the top_k experts (8) are picked among them.
4. weights = unbiased scores of the picked experts, divided by their sum if norm_topk_prob (+1e-20 against 0/0),
   times routed_scaling_factor (2.5).
5. y = sum_k weights_k * expert_k(x) + shared_experts(x).

Two ways to run the routed experts, the same math:

- fused (CUDA; any device under TRITON_INTERPRET=1), vLLM/SGLang's fused_moe: ``moe_align`` sorts the T * top_k
  assignments by expert on the device, the activations are quantized once per token, one grouped GEMM computes
  gate and up for every assignment from the stacked ``[E, 2I, H]`` weight, silu(gate) * up, quantized per
  assignment (one launch for bf16/fp16, ``ingot.kernels.silu_mul``), one grouped GEMM with ``[E, H, I]`` multiplies
  by down and by the routing weight, and the top_k rows of each token are summed in float32. No host sync, static
  shapes for a given T: a decode step can be captured in a CUDA graph. For the kinds with a grouped kernel: bf16,
  int8-channel, int8-block, fp8-block (``ingot.kernels.moe_gemm``).
- loop (CPU, and int8-weight / int4-group experts everywhere: no grouped kernel for them yet): gathers each
  expert's tokens and runs only the experts that received any through their own Linears. Counting tokens per expert
  is one host sync per layer, so such a step cannot be captured.

Stacked weights. The checkpoint names each expert's linears (``experts.{e}.gate_proj.weight`` ...), and so does
the model: every expert keeps its three ``Linear``s, but for the grouped kinds their parameters are views into
stacked tensors the MoE allocates once (``MoE.stacked``): ``w13.weight`` [E, 2 * I_pad, H] (gate rows
[0, I), up rows [I_pad, I_pad + I)), ``w2.weight`` [E, H, I], and the scales likewise (``w13.weight_scale`` [E, 2I, 1]
per channel, [E, 2 * I_pad / bn, cdiv(H, bk)] per block). The loader fills them expert by expert through the views,
so there is no second copy and no full-size temporary. I_pad = I, except for block kinds, where it is I rounded up
to the 128-row block (DeepSeek-V3: I = 2048, no padding) so that up's scale rows start on a block row; padding rows
are zero and their outputs are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ingot.layers.linear import ActQuant, Linear, QuantizedActivation, fuse_linears, shared_input_quant

# Builds the Linear named `prefix` ([out, in]), with a bias or not: the model decides each linear's kind from its prefix.
MakeLinear = Callable[[str, int, int, bool], nn.Module]
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # silu * up kernel's activations; float32 keeps torch


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); x [..., hidden] -> [..., hidden]. Linears named as in HF.

    ``fuse_projections()`` merges gate/up into one gate_up_proj (``fuse_linears``) for a model the engine runs; the
    routed experts of a MoE are never fused (their parameters are views of the MoE's stacks).

    On the kernel path (``use_kernels``: None = CUDA inputs, True forces Triton's interpreter on CPU) bf16/fp16
    ``silu * up`` is one launch (``ingot.kernels.silu_mul``, torch's roundings). With ``fused_ops`` (the engine's
    setting, ``CausalLM.set_fused_ops``) and a W8A8 down_proj, that launch also quantizes the product for down_proj
    (``silu_mul_quant``), and x may arrive already quantized for gate/up (``QuantizedActivation``, from the norm).
    """

    def __init__(self, prefix: str, hidden_size: int, intermediate_size: int, make_linear: MakeLinear, bias: bool = False):
        super().__init__()
        self.gate_proj = make_linear(f"{prefix}.gate_proj", hidden_size, intermediate_size, bias)
        self.up_proj = make_linear(f"{prefix}.up_proj", hidden_size, intermediate_size, bias)
        self.down_proj = make_linear(f"{prefix}.down_proj", intermediate_size, hidden_size, bias)
        self.gate_up_proj: Linear | None = None
        self.use_kernels: bool | None = None
        self.fused_ops = False

    def fuse_projections(self) -> None:
        if self.gate_up_proj is None and (gate_up := fuse_linears([self.gate_proj, self.up_proj])) is not None:
            self.gate_up_proj = gate_up
            del self.gate_proj, self.up_proj

    def input_quant(self, x: torch.Tensor) -> ActQuant | None:
        """The quantization gate/up want for x (``shared_input_quant``): what the norm before may emit."""
        if self.gate_up_proj is not None:
            return self.gate_up_proj.input_quant(x)
        return shared_input_quant(x, self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._act(gate, up))

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | QuantizedActivation:
        """silu(gate) * up in the model dtype, or quantized for down_proj (fused_ops, kernel path)."""
        kernels = gate.is_cuda if self.use_kernels is None else self.use_kernels
        if not kernels or gate.dtype not in KERNEL_DTYPES:
            return F.silu(gate) * up
        from ingot.kernels.silu_mul import silu_mul, silu_mul_quant

        quant = self.down_proj.input_quant(gate) if self.fused_ops else None
        if quant is None:
            return silu_mul(gate, up)
        x_q, x_s = silu_mul_quant(gate, up, quant.dtype, quant.group_size, quant.scale_fmt)
        return QuantizedActivation(x_q, x_s, quant, gate.dtype)


@dataclass(frozen=True)
class MoEConfig:
    """The routed-expert part of a DeepSeek-V3 layer (config.json field names)."""

    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        e, g = self.n_routed_experts, self.n_group
        if e <= 0 or g <= 0 or e % g:
            raise ValueError(f"config n_routed_experts {e} must be a positive multiple of n_group {g}")
        if not 1 <= self.topk_group <= g:
            raise ValueError(f"config topk_group {self.topk_group} must be in [1, n_group={g}]")
        if g > 1 and e // g < 2:
            raise ValueError(f"config: group scores sum each group's top-2 experts; {e} experts in {g} groups have {e // g}")
        eligible = self.topk_group * (e // g)
        if not 1 <= self.num_experts_per_tok <= eligible:
            raise ValueError(
                f"config num_experts_per_tok {self.num_experts_per_tok} must be in [1, {eligible}] "
                f"(topk_group {self.topk_group} x {e // g} experts per group)"
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"config n_shared_experts must be >= 0, got {self.n_shared_experts}")


class MoEGate(nn.Module):
    """Router. weight [E, hidden] (checkpoint dtype, computed in float32), e_score_correction_bias float32 [E].

    forward(x [T, hidden]) -> (weights float32 [T, top_k], expert ids int64 [T, top_k]).
    """

    def __init__(self, cfg: MoEConfig, *, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, device=device, dtype=dtype), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(e, device=device, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (T, E)
        biased = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1:
            grouped = biased.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
        ids = biased.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


GROUPED_KINDS = ("bf16", "int8-channel", "int8-block", "fp8-block")  # ingot.kernels.moe_gemm.KINDS (no triton here)
BLOCK_KINDS = ("int8-block", "fp8-block")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _linear_parts(linear: nn.Module) -> list[str]:
    """The parameters a Linear's method fills (all but the bias)."""
    return [name for name, _ in linear.named_parameters(recurse=False) if name != "bias"]


def _aliases(param: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether ``param`` is the storage slot ``view`` (meta tensors have no storage: taken as yes)."""
    if param.device != view.device or param.shape != view.shape or param.dtype != view.dtype:
        return False
    return param.device.type == "meta" or (param.data_ptr() == view.data_ptr() and param.stride() == view.stride())


class MoE(nn.Module):
    """Routed experts ``{prefix}.experts.{e}`` + shared experts ``{prefix}.shared_experts`` + router ``{prefix}.gate``.

    forward(x [..., hidden]) -> [..., hidden] in x.dtype; the weighted expert outputs are summed in float32.

    ``use_fused``: None (default) runs the fused grouped-GEMM path on CUDA inputs when the experts' kind has one
    (``grouped_kind``; ``grouped_reason`` says why not) and the per-expert loop otherwise; True forces the fused
    path (Triton's interpreter on CPU; an error where it is unavailable); False forces the loop.
    """

    def __init__(self, prefix: str, cfg: MoEConfig, make_linear: MakeLinear, *, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.gate = MoEGate(cfg, device=device, dtype=dtype)
        self.use_fused: bool | None = None
        self.stacked: dict[str, torch.Tensor] = {}  # "w13.weight", "w13.weight_scale", "w2.weight", ...
        self.grouped_kind: str | None = None  # set by process_weights_after_loading
        self.grouped_reason: str | None = "process_weights_after_loading has not run"
        self.block_size: tuple[int, int] | None = None
        self.act_scale_fmt = ("float", "float")  # fp8-block activations of the two GEMMs (per-linear detection)
        self._i_pad = cfg.moe_intermediate_size
        self._stack_kind: str | None = None  # the kind the stacks were allocated for (None: no stacks)
        self._processed = False
        self.experts = nn.ModuleList()
        for e in range(cfg.n_routed_experts):  # one expert's own parameters exist at a time, then become views
            mlp = MLP(f"{prefix}.experts.{e}", cfg.hidden_size, cfg.moe_intermediate_size, make_linear)
            if e == 0:
                self._allocate_stacks(mlp)
            elif self._stack_kind is not None and self._stackable_kind(mlp)[0] != self._stack_kind:
                self._unstack(f"experts.{e} is {mlp.gate_proj.kind}, experts.0 {self._stack_kind}")
            if self._stack_kind is not None:
                self._adopt(e, mlp)
            self.experts.append(mlp)
        self.shared_experts = None
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = MLP(f"{prefix}.shared_experts", cfg.hidden_size, inter, make_linear)

    # ---- stacked expert weights
    def _stackable_kind(self, mlp: MLP) -> tuple[str | None, str | None]:
        """(kind, None) when the expert's three linears can live in grouped-GEMM stacks, else (None, why not)."""
        from ingot.layers.linear import Linear

        lins = [getattr(mlp, name) for name in PROJECTIONS]
        if not all(isinstance(lin, Linear) for lin in lins):
            return None, "experts are not ingot Linears"
        kinds = {lin.kind for lin in lins}
        if len(kinds) != 1:
            return None, f"experts mix linear kinds {sorted(kinds)}"
        kind = kinds.pop()
        if kind not in GROUPED_KINDS:
            return None, f"no grouped GEMM kernel for {kind} experts (grouped kinds: {', '.join(GROUPED_KINDS)})"
        if any(lin.bias is not None for lin in lins):
            return None, "experts with biases"
        return kind, None

    def _allocate_stacks(self, mlp: MLP) -> None:
        kind, why = self._stackable_kind(mlp)
        if kind is None:
            self.grouped_reason = why
            return
        self._stack_kind = kind
        if kind in BLOCK_KINDS:
            bn = mlp.gate_proj.block_size[0]
            self._i_pad = -(-self.cfg.moe_intermediate_size // bn) * bn
        for name in _linear_parts(mlp.gate_proj):
            self._new_stack(name, mlp)

    def _unstack(self, why: str) -> None:
        """Give the experts built so far their own parameters again and drop the stacks (experts of mixed kinds)."""
        for mlp in self.experts:
            for proj in PROJECTIONS:
                linear = getattr(mlp, proj)
                for name in _linear_parts(linear):
                    linear.register_parameter(name, nn.Parameter(getattr(linear, name).clone(), requires_grad=False))
        self.stacked, self._stack_kind, self.grouped_reason = {}, None, why

    def _up_offset(self, name: str, gate: nn.Module) -> int | None:
        """Row of the w13 stack of parameter ``name`` where up_proj starts (None: the scale's block rows do not divide
        I_pad, e.g. a [96, 128] block)."""
        if self._stack_kind not in BLOCK_KINDS:
            return getattr(gate, name).shape[0]
        if name == "weight":
            return self._i_pad
        bn = gate.block_size[0]
        return self._i_pad // bn if self._i_pad % bn == 0 else None

    def _new_stack(self, name: str, mlp: MLP) -> bool:
        """Allocate ``w13.{name}`` and ``w2.{name}`` shaped after ``mlp``'s parameters, the padding rows of w13
        zeroed. False (nothing allocated) when the rows do not fit."""
        gate, down = getattr(mlp.gate_proj, name), getattr(mlp.down_proj, name)
        off = self._up_offset(name, mlp.gate_proj)
        if off is None:
            return False
        e, rows = self.cfg.n_routed_experts, gate.shape[0]
        w13 = torch.empty((e, 2 * off, *gate.shape[1:]), dtype=gate.dtype, device=gate.device)
        if rows < off:
            w13[:, rows:off].zero_()
            w13[:, off + rows :].zero_()
        self.stacked[f"w13.{name}"] = w13
        self.stacked[f"w2.{name}"] = torch.empty((e, *down.shape), dtype=down.dtype, device=down.device)
        return True

    def _views(self, e: int, name: str, rows: int) -> dict[str, torch.Tensor]:
        """Expert e's slots of the stacks of parameter ``name`` (gate and up have ``rows`` rows)."""
        w13, w2 = self.stacked[f"w13.{name}"], self.stacked[f"w2.{name}"]
        off = w13.shape[1] // 2
        return {"gate_proj": w13[e, :rows], "up_proj": w13[e, off : off + rows], "down_proj": w2[e]}

    def _adopt(self, e: int, mlp: MLP, names: list[str] | None = None, copy: bool = False) -> None:
        """Replace expert e's parameters ``names`` (default: all) by views of the stacks, copying their values in first
        when ``copy``; the expert's own storage is freed with its old parameters."""
        for name in names or _linear_parts(mlp.gate_proj):
            for proj, view in self._views(e, name, getattr(mlp.gate_proj, name).shape[0]).items():
                linear = getattr(mlp, proj)
                if copy:
                    with torch.no_grad():
                        view.copy_(getattr(linear, name))
                linear.register_parameter(name, nn.Parameter(view, requires_grad=False))

    def _in_stack(self, name: str) -> bool:
        """Whether every expert's parameter ``name`` is still its stack slot."""
        if f"w13.{name}" not in self.stacked:
            return False
        rows = getattr(self.experts[0].gate_proj, name).shape[0]
        return all(_aliases(getattr(getattr(mlp, proj), name), view)
                   for e, mlp in enumerate(self.experts) for proj, view in self._views(e, name, rows).items())

    def _check_stacks(self) -> str | None:
        """Bring expert parameters that left their stack slots back, one parameter name at a time (a checkpoint block
        size other than 128 x 128 re-registers the scales with new grids; a moved module has new tensors). None when
        the stacks hold every expert, else why they cannot."""
        first = self.experts[0]
        stale = [name for name in _linear_parts(first.gate_proj) if not self._in_stack(name)]
        if not stale:
            return None
        shapes = {(proj, name, tuple(getattr(getattr(m, proj), name).shape))
                  for m in self.experts for proj in PROJECTIONS for name in stale}
        if len(shapes) != len(PROJECTIONS) * len(stale):
            return f"experts' {', '.join(stale)} differ in shape"
        if self._stack_kind in BLOCK_KINDS:
            sizes = {tuple(getattr(m, proj).block_size) for m in self.experts for proj in PROJECTIONS}
            if len(sizes) != 1:
                return f"experts mix block sizes {sorted(sizes)}"
        for name in stale:
            self.stacked.pop(f"w13.{name}", None)
            self.stacked.pop(f"w2.{name}", None)
            if not self._new_stack(name, first):
                return f"{list(first.gate_proj.block_size)} blocks do not tile I_pad = {self._i_pad} rows"
            for e, mlp in enumerate(self.experts):
                self._adopt(e, mlp, [name], copy=True)
        return None

    def process_weights_after_loading(self) -> None:
        """After the experts' Linears have loaded (and run their own processing): check the stacks, decide the
        grouped kind, and for fp8-block the activation scale format each GEMM uses (its linears' detection must
        agree: ue8m0 only when every expert's scales are powers of two)."""
        self._processed = True
        self.grouped_kind = None
        if self._stack_kind is None:
            return
        why = self._check_stacks()
        if why is None and self._stack_kind in BLOCK_KINDS:
            self.block_size = tuple(self.experts[0].gate_proj.block_size)
        if why is None and self._stack_kind == "fp8-block":
            fmts = []
            for projs in (("gate_proj", "up_proj"), ("down_proj",)):
                found = {getattr(getattr(m, p), "act_scale_fmt", "float") for m in self.experts for p in projs}
                if len(found) != 1:
                    why = f"fp8 experts' {'/'.join(projs)} disagree on the activation scale format ({sorted(found)})"
                    break
                fmts.append(found.pop())
            else:
                self.act_scale_fmt = tuple(fmts)
        self.grouped_kind, self.grouped_reason = (self._stack_kind, None) if why is None else (None, why)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a CUDA forward is free of host syncs: the fused path runs (a grouped kind, not forced off)."""
        if self.use_fused is False:
            return False
        return self.grouped_kind is not None if self._processed else self._stack_kind is not None

    # ---- forward
    def input_quant(self, x: torch.Tensor) -> None:
        """None: the router reads x in the model dtype (and the experts quantize per assignment), so the norm before
        a MoE emits the tensor."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        if self._fused(flat):
            y = self.routed_fused(flat, weights, ids)
        else:
            y = self.routed(flat, weights, ids)
        y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(x.shape)

    def _fused(self, x: torch.Tensor) -> bool:
        want = x.is_cuda if self.use_fused is None else self.use_fused
        if not want:
            return False
        if not self._processed:  # a loader that skipped process_weights_after_loading; never inside a graph capture
            self.process_weights_after_loading()
        if self.grouped_kind is None and self.use_fused:
            raise RuntimeError(f"MoE.use_fused is True, but the fused path is unavailable: {self.grouped_reason}")
        return self.grouped_kind is not None

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The loop: sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) as float32 [T, hidden], running each used expert
        once on the tokens routed to it (sorted by expert: one gather, one matmul chain, one scatter-add per expert).
        One host sync (the tokens per expert)."""
        top_k = ids.shape[1]
        order = ids.flatten().argsort(stable=True)  # (T * top_k): assignments grouped by expert
        tokens = order // top_k
        w = weights.flatten()[order]
        counts = torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts).tolist()  # the host sync
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start : start + n]
                out.index_add_(0, idx, self.experts[e](x[idx]).float() * w[start : start + n, None])
                start += n
        return out

    def _quantize(self, x: torch.Tensor, scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grouped GEMM's A operand of activations x [rows, K]: as they are (bf16) or quantized as the kind's
        Linear quantizes them (per token int8; per token per bk-group int8 / fp8)."""
        from ingot.kernels.act_quant import per_token_group_quant, per_token_quant_int8

        kind = self.grouped_kind
        if kind == "bf16":
            return x, None
        if kind == "int8-channel":
            return per_token_quant_int8(x)
        qdtype = "int8" if kind == "int8-block" else "fp8_e4m3"
        return per_token_group_quant(x, qdtype, group_size=self.block_size[1], scale_fmt=scale_fmt)

    def _activation(self, gate: torch.Tensor, up: torch.Tensor,
                    scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """down's A operand: silu(gate) * up in the model dtype (as the MLP computes it), quantized as ``_quantize``
        does; for bf16/fp16 one launch (``ingot.kernels.silu_mul``: the same roundings, the same quantized bits)."""
        if gate.dtype not in KERNEL_DTYPES:
            return self._quantize(F.silu(gate) * up, scale_fmt)
        from ingot.kernels.silu_mul import silu_mul, silu_mul_quant

        kind = self.grouped_kind
        if kind == "bf16":
            return silu_mul(gate, up), None
        if kind == "int8-channel":
            return silu_mul_quant(gate, up)
        qdtype = "int8" if kind == "int8-block" else "fp8_e4m3"
        return silu_mul_quant(gate, up, qdtype, self.block_size[1], scale_fmt)

    def routed_fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The fused path (module docstring): float32 [T, hidden], the same sum as ``routed``, without host syncs."""
        from ingot.kernels import moe_gemm as mg

        cfg, kind, bs = self.cfg, self.grouped_kind, self.block_size or (128, 128)
        t, top_k = ids.shape
        if t == 0:
            return torch.zeros(0, cfg.hidden_size, dtype=torch.float32, device=x.device)
        inter = cfg.moe_intermediate_size
        block_m = mg.default_config(t, top_k, cfg.n_routed_experts).block_m
        align = mg.moe_align(ids, cfg.n_routed_experts, block_m)
        w13, w2 = self.stacked["w13.weight"], self.stacked["w2.weight"]
        s13, s2 = self.stacked.get("w13.weight_scale"), self.stacked.get("w2.weight_scale")
        a, a_s = self._quantize(x.contiguous(), self.act_scale_fmt[0])
        h = mg.moe_gemm(a, a_s, w13, s13, align, kind, bs, out_dtype=x.dtype)  # (T * top_k, 2 * I_pad)
        off = w13.shape[1] // 2
        a, a_s = self._activation(h[:, :inter], h[:, off : off + inter], self.act_scale_fmt[1])  # (T * top_k, I)
        y = mg.moe_gemm(a, a_s, w2, s2, align, kind, bs, topk_weights=weights.contiguous(), out_dtype=x.dtype)
        return y.view(t, top_k, cfg.hidden_size).sum(dim=1, dtype=torch.float32)
