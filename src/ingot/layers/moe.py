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

Compute gathers each expert's tokens and runs only the experts that received any (decode of one token runs 8 of
256). Counting tokens per expert is one host sync per MoE layer, so a MoE step cannot be captured in a CUDA graph;
that needs a grouped-GEMM kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Builds the Linear named `prefix` ([out, in]), with a bias or not: the model decides each linear's kind from its prefix.
MakeLinear = Callable[[str, int, int, bool], nn.Module]


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); x [..., hidden] -> [..., hidden]. Linears named as in HF."""

    def __init__(self, prefix: str, hidden_size: int, intermediate_size: int, make_linear: MakeLinear, bias: bool = False):
        super().__init__()
        self.gate_proj = make_linear(f"{prefix}.gate_proj", hidden_size, intermediate_size, bias)
        self.up_proj = make_linear(f"{prefix}.up_proj", hidden_size, intermediate_size, bias)
        self.down_proj = make_linear(f"{prefix}.down_proj", intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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


class MoE(nn.Module):
    """Routed experts ``{prefix}.experts.{e}`` + shared experts ``{prefix}.shared_experts`` + router ``{prefix}.gate``.

    forward(x [..., hidden]) -> [..., hidden] in x.dtype; the weighted expert outputs are summed in float32.
    """

    def __init__(self, prefix: str, cfg: MoEConfig, make_linear: MakeLinear, *, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.gate = MoEGate(cfg, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            MLP(f"{prefix}.experts.{e}", cfg.hidden_size, cfg.moe_intermediate_size, make_linear)
            for e in range(cfg.n_routed_experts)
        )
        self.shared_experts = None
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = MLP(f"{prefix}.shared_experts", cfg.hidden_size, inter, make_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        y = self.routed(flat, weights, ids).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(x.shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) as float32 [T, hidden], running each used expert once on
        the tokens routed to it (sorted by expert: one gather, one matmul chain, one scatter-add per expert)."""
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
