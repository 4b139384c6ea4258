"""Llama-family decoder-only transformers: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

One block structure (pre-norm residual: x + attn(norm(x)), then x + mlp(norm(x))); the families differ only in named
fields of ``LlamaArgs``: q/k/v biases (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), sliding windows (Mistral,
Qwen2/3 when enabled), RoPE scaling (Llama 3.1: llama3), tied embeddings (SmolLM2, Llama 3.2 1B/3B).

Module names equal the HF checkpoint names (``model.layers.{i}.self_attn.q_proj`` ...), so checkpoint tensor names
are ``named_parameters()`` names. ``CausalLM`` (the shared embed -> blocks -> norm -> lm_head shell) is also the base of
DeepSeek-V3 (``ingot.models.deepseek_v3``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ingot.layers.attention import Attention, AttnMetadata, KVSpec
from ingot.layers.linear import (
    ActQuant, Linear, QuantizedActivation, RowMaxActivation, fuse_linears, shared_input_quant,
)
from ingot.layers.moe import MLP, MoE
from ingot.layers.norm import RMSNorm
from ingot.layers.rotary import RopeScaling, RotaryEmbedding

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# ------------------------------------------------------------------------------------------------------------ args


def _require(config: dict, *names: str) -> None:
    missing = [n for n in names if config.get(n) is None]
    if missing:
        raise ValueError(f"config.json ({config.get('model_type')}): missing field(s) {', '.join(missing)}")


@dataclass(frozen=True)
class LlamaArgs:
    """Everything that shapes a Llama-family model, named as in config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama / Qwen3: attention_bias
    o_bias: bool = False  # Llama / Qwen3: attention_bias; never in Qwen2
    mlp_bias: bool = False  # Llama: mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k, before RoPE
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention; () = none anywhere

    def __post_init__(self) -> None:
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"LlamaArgs: model_type {self.model_type!r} is not one of {', '.join(LLAMA_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json head_dim {self.head_dim} must be even (RoPE rotates channel pairs)")
        if self.sliding_windows and len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"{len(self.sliding_windows)} sliding windows for {self.num_hidden_layers} layers")

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @classmethod
    def from_hf_config(cls, config: dict) -> "LlamaArgs":
        mt = config.get("model_type")
        _require(config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        heads = config["num_attention_heads"]
        if not config.get("head_dim") and config["hidden_size"] % heads:
            raise ValueError(
                f"config.json hidden_size {config['hidden_size']} is not a multiple of num_attention_heads {heads}"
            )
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rope=RopeScaling.from_hf_config(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias and mt in ("llama", "qwen3"),
            o_bias=attention_bias and mt in ("llama", "qwen3"),
            mlp_bias=bool(config.get("mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3",
            sliding_windows=_sliding_windows(config),
        )


def _sliding_windows(config: dict) -> tuple[int | None, ...]:
    """Per-layer windows as transformers builds them: Mistral windows every layer when ``sliding_window`` is set;
    Qwen2/3 only with ``use_sliding_window``, on the layers ``layer_types`` marks (default: from max_window_layers on)."""
    mt, n = config.get("model_type"), config["num_hidden_layers"]
    if mt == "mistral":
        w = config.get("sliding_window")
        return (w,) * n if w else ()
    if mt not in ("qwen2", "qwen3") or not config.get("use_sliding_window") or not config.get("sliding_window"):
        return ()
    w, first = config["sliding_window"], config.get("max_window_layers", 28)
    types = config.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"config.json layer_types has {len(types)} entries for {n} layers")
    return tuple(w if t == "sliding_attention" else None for t in types)


# ------------------------------------------------------------------------------------------------------ primitives


@dataclass(frozen=True)
class LinearFactory:
    """Makes the ingot Linear named ``prefix``, of the kind ``linear_kind(prefix)`` (the loader passes each stored
    linear's kind; "bf16" by default)."""

    linear_kind: Callable[[str], str]
    device: torch.device | str | None
    dtype: torch.dtype
    fp8_fallback: str = "int8-block"

    def __call__(self, prefix: str, in_features: int, out_features: int, bias: bool = False) -> Linear:
        return Linear(
            in_features, out_features, bias,
            kind=self.linear_kind(prefix), device=self.device, dtype=self.dtype, fp8_fallback=self.fp8_fallback,
        )


def _embedding(vocab: int, dim: int, device, dtype) -> nn.Embedding:
    # _weight skips the N(0, 1) init: 129280 x 7168 (DeepSeek-V3) is 0.9 G values filled for nothing.
    return nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim, device=device, dtype=dtype))


def _plain_linear(in_features: int, out_features: int, device, dtype) -> nn.Linear:
    """An uninitialized bias-free nn.Linear (lm_head: never quantized, FORMATS.md)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------- attention


class LlamaAttention(nn.Module):
    """GQA self-attention. x [..., hidden] -> [..., hidden]; q/k/v [..., heads, head_dim], RoPE in half layout."""

    def __init__(self, args: LlamaArgs, prefix: str, layer: int, make: LinearFactory):
        super().__init__()
        h, hkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.head_dim = d
        self.q_proj = make(f"{prefix}.q_proj", args.hidden_size, h * d, args.qkv_bias)
        self.k_proj = make(f"{prefix}.k_proj", args.hidden_size, hkv * d, args.qkv_bias)
        self.v_proj = make(f"{prefix}.v_proj", args.hidden_size, hkv * d, args.qkv_bias)
        self.o_proj = make(f"{prefix}.o_proj", h * d, args.hidden_size, args.o_bias)
        self.q_norm = self.k_norm = None
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps, device=make.device, dtype=make.dtype)
            self.k_norm = RMSNorm(d, args.rms_norm_eps, device=make.device, dtype=make.dtype)
        self.attn = Attention(h, hkv, d, d, d**-0.5, window=args.window(layer))
        self.qkv_proj: Linear | None = None  # fuse_projections()
        self.qkv_sizes = (h * d, hkv * d, hkv * d)

    def fuse_projections(self) -> None:
        """q/k/v -> one qkv_proj (``fuse_linears``) when their kinds allow; q_proj/k_proj/v_proj are then dropped."""
        if self.qkv_proj is None and (qkv := fuse_linears([self.q_proj, self.k_proj, self.v_proj])) is not None:
            self.qkv_proj = qkv
            del self.q_proj, self.k_proj, self.v_proj

    def input_quant(self, x: torch.Tensor) -> ActQuant | None:
        """The quantization q/k/v want for x (``shared_input_quant``): what the norm before may emit."""
        if self.qkv_proj is not None:
            return self.qkv_proj.input_quant(x)
        return shared_input_quant(x, self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor | QuantizedActivation, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttnMetadata | None) -> torch.Tensor:
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.unflatten(-1, (-1, self.head_dim))  # (..., H, D)
        k = k.unflatten(-1, (-1, self.head_dim))  # (..., Hkv, D)
        v = v.unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        flat = q.flatten(-2)  # o_proj's input has q's rows
        # the layer rotates q and k; a CUDA decode step may hand o_proj its input already quantized, or with row
        # maxima ([T, H * D]); else [T, H, D]
        out = self.attn(q, k, v, meta, rope, self.o_proj.input_quant(flat), self.o_proj.takes_row_maxima(flat))
        return self.o_proj(out if isinstance(out, (QuantizedActivation, RowMaxActivation)) else out.flatten(-2))


# ----------------------------------------------------------------------------------------------------------- block


class DecoderLayer(nn.Module):
    """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)). Shared with DeepSeek-V3.

    ``fused_ops`` False (default): exactly that, one layer's output at a time. True (the engine's setting,
    ``CausalLM.set_fused_ops``): vLLM's residual stream - a layer returns its MLP output and the residual stream
    before it *un-added*; each norm adds first (``RMSNorm.add_forward``: the add and the norm in one launch on the
    kernel path) and, when the next linears quantize their input, emits it quantized (``input_quant``). The sums
    are the same ops in the model dtype, so on CPU the logits are bit-identical to the unfused form.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float, device, dtype):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden_size, eps, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, device=device, dtype=dtype)
        self.fused_ops = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMetadata | None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., hidden] (+ ``residual``, the stream a fused layer left un-added) -> (hidden, residual): unfused,
        (the layer's output, None); fused, (its MLP output, the stream before it), summed by the next norm."""
        if not self.fused_ops:
            if residual is not None:
                x = x + residual
            x = x + self.self_attn(self.input_layernorm(x), rope, meta)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        h, residual = self.input_layernorm.add_forward(x, residual, self.self_attn.input_quant(x))
        h = self.self_attn(h, rope, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual, self.mlp.input_quant(h))
        return self.mlp(h), residual


# ----------------------------------------------------------------------------------------------------------- model


class CausalLM(nn.Module):
    """embed_tokens -> decoder layers -> norm -> lm_head, over a flattened batch with a paged KV cache.

    Subclasses build ``self.model.layers`` (the first ``num_layers`` run in forward; DeepSeek's MTP layers may follow)
    and ``self.model.rotary_emb``. Parameters are allocated empty; a loader fills them by name, then calls
    ``process_weights_after_loading()``.
    """

    def __init__(self, config: dict, args, vocab_size: int, hidden_size: int, eps: float, tie: bool, device, dtype):
        super().__init__()
        self.config, self.args, self.dtype = config, args, dtype
        self.model = nn.Module()
        self.model.embed_tokens = _embedding(vocab_size, hidden_size, device, dtype)
        self.model.layers = nn.ModuleList()
        self.model.norm = RMSNorm(hidden_size, eps, device=device, dtype=dtype)
        self.lm_head = _plain_linear(hidden_size, vocab_size, device, dtype)
        if tie:  # one tensor: named_parameters() lists it once, as model.embed_tokens.weight
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_layers = 0

    def _finish(self) -> None:
        self.requires_grad_(False)

    def process_weights_after_loading(self) -> None:
        """Derive what the forward needs from the loaded weights (nothing for Llama; MLA's absorbed kv_b_proj).
        Call after every Linear's own ``process_weights_after_loading``."""

    def fuse_projections(self) -> None:
        """Merge the projections that read one input into one Linear each (q/k/v, gate/up: ``fuse_linears``), for
        fewer, wider GEMMs and one activation quantization per input, and turn on the fused norm / residual-add /
        activation-quantization forms (``set_fused_ops(True)``); the engine calls it after loading. Parameter
        names change (``qkv_proj``, ``gate_up_proj``): load, calibrate and inspect by checkpoint name before (the
        fused forms also hand linears quantized activations, which calibration hooks could not read).
        Fused: Llama attention, dense MLPs and MoE shared experts; never routed experts (MoE stacks them)."""
        for layer in self.model.layers:
            mlp = layer.mlp
            for module in (layer.self_attn, mlp if isinstance(mlp, MLP) else getattr(mlp, "shared_experts", None)):
                if module is not None and callable(getattr(module, "fuse_projections", None)):
                    module.fuse_projections()
        self.set_fused_ops(True)

    def set_fused_ops(self, enabled: bool) -> None:
        """Every module with a ``fused_ops`` switch (decoder layers, MLPs, MLA) on or off: on, the residual adds run
        inside the norms and, on the kernel path, RMSNorm and silu * up emit the activations their W8A8 linears
        read already quantized (one launch instead of two or three; the same bits). Off: each op on its own."""
        for module in self.modules():
            if hasattr(module, "fused_ops"):
                module.fused_ops = bool(enabled)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a decode step is free of host syncs, so a CUDA graph can capture it. MoE layers are when they run
        the fused grouped-GEMM path (experts of a kind with a grouped kernel); their per-expert loop counts tokens
        per expert on the host (one sync per layer)."""
        return all(m.supports_cuda_graphs for m in self.modules() if isinstance(m, MoE))

    # ---- running
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """input_ids int64 [T], positions int64 [T] (flattened new tokens of a batch) -> hidden [T, hidden_size]."""
        return self._hidden(input_ids, positions, meta)

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata | None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(positions)  # once per step, shared by every layer
        residual = None  # the stream fused layers leave un-added (DecoderLayer)
        for layer in self.model.layers[: self.num_layers]:
            x, residual = layer(x, rope, meta, residual)
        return self.model.norm(x) if residual is None else self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> float32 logits [..., vocab] (the matmul in the model dtype, as transformers).
        One row [1, hidden_size] on CUDA (batch-1 decode) runs ``kernels.dense_gemv``: the same math, the weight
        streamed ~13% faster than cuBLAS's GEMV on the H100 (kernels/NOTES.md, session 22)."""
        w = self.lm_head.weight
        one_row = hidden.dim() == 2 and hidden.shape[0] == 1
        if one_row and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and w.dtype == hidden.dtype:
            from ingot.kernels.dense_gemv import dense_gemv

            return dense_gemv(hidden.contiguous(), w, torch.float32)
        return F.linear(hidden, w).float()

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T] -> float32 logits [B, T, vocab]: no cache, causal attention within each row."""
        if input_ids.dim() != 2:
            raise ValueError(f"score: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.compute_logits(self._hidden(input_ids, positions, None))

    # ---- KV cache
    def _attention_ops(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers[: self.num_layers]]

    def kv_cache_spec(self) -> list[KVSpec]:
        """One KVSpec per attention layer, in layer order."""
        return [op.spec for op in self._attention_ops()]

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """caches[i] = (k_cache, v_cache or None) of layer i, shaped as ``kv_cache_spec()[i]`` says. The list is kept
        as ``bound_kv_caches``: an engine sharing the model with another rebinds its own before a step."""
        ops = self._attention_ops()
        if len(caches) != len(ops):
            raise ValueError(f"bind_kv_cache: {len(caches)} caches for {len(ops)} attention layers")
        for i, (op, (k, v)) in enumerate(zip(ops, caches)):
            try:
                op.bind_cache(k, v)
            except ValueError as error:
                raise ValueError(f"layer {i}: {error}") from None
        self.bound_kv_caches = caches


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict, make: LinearFactory):
        args = LlamaArgs.from_hf_config(config)
        dev, dt = make.device, make.dtype
        super().__init__(
            config, args, args.vocab_size, args.hidden_size, args.rms_norm_eps, args.tie_word_embeddings, dev, dt
        )
        self.model.rotary_emb = RotaryEmbedding(args.head_dim, args.rope)
        for i in range(args.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = LlamaAttention(args, f"{prefix}.self_attn", i, make)
            mlp = MLP(f"{prefix}.mlp", args.hidden_size, args.intermediate_size, make, bias=args.mlp_bias)
            self.model.layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps, dev, dt))
        self.num_layers = args.num_hidden_layers
        self._finish()
