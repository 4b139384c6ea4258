"""DeepSeek-V3 / R1: multi-head latent attention (MLA) with a compressed KV cache, and group-routed MoE.

MLA, per token (V3 sizes): the keys and values of all 128 heads are linear images of one 512-channel latent
c = kv_a_layernorm(x @ W_DKV) plus a 64-channel rotated key k_pe shared by the heads. Per head h:
    k_h = [W_UK[h] c, k_pe]   (128 + 64)       v_h = W_UV[h] c   (128)       W_UK, W_UV: rows of kv_b_proj
so q_h . k_h = (W_UK[h]^T q_nope_h) . c + q_pe_h . k_pe: absorbing W_UK into the query turns attention into MQA over
the cache entry [c, k_pe] (576 channels, one kv head) with values c; the head's output is W_UV[h] (attn . c).
The cache holds 576 values per token per layer instead of 128 x (192 + 128) = 40960 (DeepSeek's reference inference
code, SGLang and vLLM do the same).

Prefill also runs in the absorbed form: one code path over the same cache, exact in fp32. It costs more attention
FLOPs than expanding per-head K/V from the latent: per (query, key, head) QK^T + PV is 576 + 512 = 1088
multiply-adds absorbed vs 192 + 128 = 320 expanded (3.4x), which matters for long compute-bound prefills; decode is
bound by reading the cache, where 576 per token beats 40960. Expanding for prefill is an optimization for the
engine's kernels.

Softmax scale: qk_head_dim^-0.5 (192^-0.5) times YaRN's mscale^2 (mscale_all_dim 1, factor 40: x1.8739), as in
transformers and DeepSeek's reference. RoPE: YaRN on the 64 rope channels, interleaved pairs (``rope_interleave``,
transformers' default for this model).

Layers: the first ``first_k_dense_replace`` (3) are dense MLPs, then MoE where layer % moe_layer_freq == 0 (DeepSeek's
own modeling code; transformers ignores moe_layer_freq, which is 1 in every released config). The
``num_nextn_predict_layers`` MTP layers after them are built only with ``load_mtp`` (their weights can be loaded; the
engine has no speculative decoding that runs them yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ingot.layers import linear as linear_layers
from ingot.layers.attention import Attention, AttnMetadata
from ingot.layers.moe import MLP, MoE, MoEConfig
from ingot.layers.norm import RMSNorm
from ingot.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary, yarn_softmax_mscale
from ingot.models.llama import CausalLM, DecoderLayer, LinearFactory, _embedding, _plain_linear, _require

# ------------------------------------------------------------------------------------------------------------ args


@dataclass(frozen=True)
class DeepseekV3Args:
    """Everything that shapes a DeepSeek-V3 model, named as in its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    moe: MoEConfig | None  # None: no routed experts (every layer dense)
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    rope: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json {name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"config.json q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config.json qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        if self.first_k_dense_replace < 0 or self.num_nextn_predict_layers < 0:
            raise ValueError("config.json first_k_dense_replace and num_nextn_predict_layers must be >= 0")
        if self.moe is not None and self.moe.hidden_size != self.hidden_size:
            raise ValueError(f"MoE hidden_size {self.moe.hidden_size} != hidden_size {self.hidden_size}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * yarn_softmax_mscale(self.rope)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @classmethod
    def from_hf_config(cls, config: dict) -> "DeepseekV3Args":
        _require(config, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        for name, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):  # DeepSeek-V3's routing
            if config.get(name, value) != value:
                raise ValueError(f"config.json {name} {config[name]!r} is not supported (DeepSeek-V3 routing: {value!r})")
        moe = None
        if config.get("n_routed_experts"):
            _require(config, "moe_intermediate_size", "num_experts_per_tok")
            moe = MoEConfig(
                hidden_size=config["hidden_size"],
                moe_intermediate_size=config["moe_intermediate_size"],
                n_routed_experts=config["n_routed_experts"],
                num_experts_per_tok=config["num_experts_per_tok"],
                n_shared_experts=config.get("n_shared_experts") or 0,
                n_group=config.get("n_group") or 1,
                topk_group=config.get("topk_group") or 1,
                norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
            )
        mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            q_lora_rank=config.get("q_lora_rank"),
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            moe=moe,
            first_k_dense_replace=config.get("first_k_dense_replace") or 0,
            moe_layer_freq=config.get("moe_layer_freq") or 1,
            num_nextn_predict_layers=mtp or 0,
            rope=RopeScaling.from_hf_config(config),
            rope_interleave=bool(config.get("rope_interleave", True)),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


# ------------------------------------------------------------------------------------------------------- attention


class MLAttention(nn.Module):
    """Multi-head latent attention in the absorbed form. x [..., hidden] -> [..., hidden].

    Caches [c, k_pe] (kv_lora_rank + qk_rope_head_dim channels, one kv head, shared_kv); see the module docstring.
    ``process_weights_after_loading`` splits the (dequantized) kv_b_proj weight [H * (nope + v), kv_lora_rank] into
    w_uk [H, nope, kv_lora_rank] and w_uv [H, v, kv_lora_rank] (plain attributes, not checkpoint tensors).
    """

    def __init__(self, args: DeepseekV3Args, prefix: str, make: LinearFactory):
        super().__init__()
        a, h, dev, dt = args, args.num_attention_heads, make.device, make.dtype
        self.num_heads, self.nope, self.rope_dim, self.c = h, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        self.v_head_dim, self.interleaved = a.v_head_dim, a.rope_interleave
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if a.q_lora_rank is None:
            self.q_proj = make(f"{prefix}.q_proj", a.hidden_size, h * a.qk_head_dim)
        else:
            self.q_a_proj = make(f"{prefix}.q_a_proj", a.hidden_size, a.q_lora_rank, a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, a.rms_norm_eps, device=dev, dtype=dt)
            self.q_b_proj = make(f"{prefix}.q_b_proj", a.q_lora_rank, h * a.qk_head_dim)
        self.kv_a_proj_with_mqa = make(f"{prefix}.kv_a_proj_with_mqa", a.hidden_size, self.c + self.rope_dim, a.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.c, a.rms_norm_eps, device=dev, dtype=dt)
        self.kv_b_proj = make(f"{prefix}.kv_b_proj", self.c, h * (self.nope + a.v_head_dim))
        self.o_proj = make(f"{prefix}.o_proj", h * a.v_head_dim, a.hidden_size, a.attention_bias)
        self.attn = Attention(h, 1, self.c + self.rope_dim, self.c, a.softmax_scale, shared_kv=True)
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None
        self.fused_ops = False  # q_a_layernorm emits q_b_proj's input quantized (CausalLM.set_fused_ops)

    def process_weights_after_loading(self) -> None:
        lin, dtype = self.kv_b_proj, self.kv_a_layernorm.weight.dtype
        # bf16: a view of the weight itself; quantized: one dequantized copy in the model dtype (V3: 128 x 256 x 512
        # x 2 B = 32 MB per layer, 2 GB over 61 layers, beside the 16 MB int8 weight the forward no longer reads).
        w = lin.weight if lin.kind == "bf16" else linear_layers.dequantized_weight(lin, dtype)  # [H * (nope + v), C]
        w = w.view(self.num_heads, self.nope + self.v_head_dim, self.c)
        self.w_uk, self.w_uv = w[:, : self.nope], w[:, self.nope :]

    def input_quant(self, x: torch.Tensor) -> linear_layers.ActQuant | None:
        """The quantization that q_proj (or q_a_proj) and kv_a_proj_with_mqa, which both read x, want for it: the norm
        before emits x quantized once for both when they agree."""
        first = self.q_proj if self.q_proj is not None else self.q_a_proj
        return linear_layers.shared_input_quant(x, first, self.kv_a_proj_with_mqa)

    def _query(self, x: torch.Tensor | linear_layers.QuantizedActivation) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        q_a = self.q_a_proj(x)
        quant = self.q_b_proj.input_quant(q_a) if self.fused_ops else None
        return self.q_b_proj(self.q_a_layernorm(q_a, quant))

    def forward(self, x: torch.Tensor | linear_layers.QuantizedActivation, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttnMetadata | None) -> torch.Tensor:
        if self.w_uk is None:  # a loader that skipped process_weights_after_loading; never inside a graph capture
            self.process_weights_after_loading()
        q_nope, q_pe = self._query(x).unflatten(-1, (self.num_heads, -1)).split([self.nope, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.c, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        q_pe = apply_rotary(q_pe, *rope, interleaved=self.interleaved)  # (..., H, rope)
        k_pe = apply_rotary(k_pe.unsqueeze(-2), *rope, interleaved=self.interleaved)  # (..., 1, rope)
        q_c = torch.einsum("...hd,hdc->...hc", q_nope, self.w_uk)  # (..., H, C): W_UK absorbed into the query
        out_c = self.attn(torch.cat([q_c, q_pe], dim=-1), torch.cat([c.unsqueeze(-2), k_pe], dim=-1), None, meta)
        out = torch.einsum("...hc,hvc->...hv", out_c, self.w_uv)  # (..., H, v): W_UV applied after attention
        return self.o_proj(out.flatten(-2))


# ----------------------------------------------------------------------------------------------------------- block


def _mlp(args: DeepseekV3Args, prefix: str, layer: int, make: LinearFactory) -> nn.Module:
    if args.is_moe_layer(layer):
        return MoE(f"{prefix}.mlp", args.moe, make, device=make.device, dtype=make.dtype)
    return MLP(f"{prefix}.mlp", args.hidden_size, args.intermediate_size, make)


class MTPLayer(DecoderLayer):
    """A multi-token-prediction layer (checkpoint names model.layers.{N + i}.*): a full decoder block plus enorm,
    hnorm, eh_proj [hidden, 2 * hidden], its own embed_tokens and shared_head.{norm, head}. Built for loading only."""

    def __init__(self, args: DeepseekV3Args, layer: int, make: LinearFactory):
        prefix, dev, dt = f"model.layers.{layer}", make.device, make.dtype
        super().__init__(MLAttention(args, f"{prefix}.self_attn", make), _mlp(args, prefix, layer, make),
                         args.hidden_size, args.rms_norm_eps, dev, dt)
        self.embed_tokens = _embedding(args.vocab_size, args.hidden_size, dev, dt)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device=dev, dtype=dt)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device=dev, dtype=dt)
        self.eh_proj = make(f"{prefix}.eh_proj", 2 * args.hidden_size, args.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device=dev, dtype=dt)
        self.shared_head.head = _plain_linear(args.hidden_size, args.vocab_size, dev, dt)


# ----------------------------------------------------------------------------------------------------------- model


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, config: dict, make: LinearFactory, load_mtp: bool = False):
        args = DeepseekV3Args.from_hf_config(config)
        dev, dt = make.device, make.dtype
        super().__init__(
            config, args, args.vocab_size, args.hidden_size, args.rms_norm_eps, args.tie_word_embeddings, dev, dt
        )
        self.model.rotary_emb = RotaryEmbedding(args.qk_rope_head_dim, args.rope)
        for i in range(args.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = MLAttention(args, f"{prefix}.self_attn", make)
            mlp = _mlp(args, prefix, i, make)
            self.model.layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps, dev, dt))
        self.num_layers = args.num_hidden_layers
        if load_mtp:
            for i in range(args.num_nextn_predict_layers):
                self.model.layers.append(MTPLayer(args, args.num_hidden_layers + i, make))
        self._finish()

    def process_weights_after_loading(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.process_weights_after_loading()
            if isinstance(layer.mlp, MoE):  # stacked expert weights checked, the grouped kind decided
                layer.mlp.process_weights_after_loading()
