"""Rotary position embeddings (RoPE) with the frequency scalings real checkpoints use.

Each scaling reproduces transformers' ``ROPE_INIT_FUNCTIONS`` exactly (same float32 operations, so the same bits):

- ``default``: inv_freq[i] = 1 / theta^(2i / dim).
- ``linear``:  inv_freq / factor (position interpolation).
- ``llama3``:  Llama 3.1's piecewise rule: wavelengths above original_max / low_freq_factor are divided by
  ``factor``, below original_max / high_freq_factor kept, smoothly interpolated in between.
- ``yarn``:    NTK-by-parts interpolation (DeepSeek-V3: factor 40, beta_fast 32, beta_slow 1, original 4096) plus an
  ``attention_factor`` that scales cos and sin: get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when
  both are set (1.0 for DeepSeek-V3, whose mscale == mscale_all_dim == 1), else get_mscale(factor). The softmax-scale
  half of YaRN (``yarn_softmax_mscale``) belongs to the attention that uses it (MLA).

``dynamic`` NTK is refused: transformers recomputes its frequencies from the longest sequence of the *current batch*,
so a token's rotation would depend on its batch neighbours and cached keys would go stale. ``longrope`` and partial
rotary dims are refused too (none of ingot's model families use them).

Two layouts pair up the rotated channels (same math, different channel pairing):
- half (Llama, Qwen, Mistral; transformers' ``rotate_half``): channel i pairs with channel i + dim/2.
- interleaved (DeepSeek-V3, ``rope_interleave``): channel 2i pairs with 2i + 1; as in transformers'
  ``apply_rotary_pos_emb_interleave`` the output is de-interleaved (evens' results first, then odds'). Queries and keys
  get the same permutation, so their dot products are those of the interleaved rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE parameters of a config: ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (4.x
    and most config.json files on the Hub). ``factor`` is None only for ``default``; yarn's None factor is resolved to
    max_position_embeddings / original_max_position_embeddings, as transformers does."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: explicit cos/sin scale, overrides the mscale rule
    truncate: bool = True  # yarn: floor/ceil the correction range (DeepSeek's find_correction_range does)

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            why = {
                "dynamic": "its frequencies depend on the longest sequence of each batch",
                "longrope": "not implemented",
            }.get(self.rope_type, "unknown rope type")
            raise ValueError(
                f"config rope_scaling.rope_type {self.rope_type!r} is not supported ({why}); "
                f"ingot supports: {', '.join(ROPE_TYPES)}"
            )
        if not self.theta > 0:
            raise ValueError(f"config rope_theta must be positive, got {self.theta}")
        if self.rope_type != "default" and (self.factor is None or not self.factor > 0):
            raise ValueError(
                f"config rope_scaling.factor must be positive for rope_type {self.rope_type!r}, got {self.factor}"
            )
        if self.rope_type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self, name) is None:
                    raise ValueError(f"config rope_scaling.{name} is required for rope_type 'llama3'")
            if self.high_freq_factor == self.low_freq_factor:
                raise ValueError("config rope_scaling: llama3 needs high_freq_factor != low_freq_factor")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ValueError("config rope_scaling.original_max_position_embeddings is required for rope_type 'yarn'")

    @classmethod
    def from_hf_config(cls, config: dict) -> "RopeScaling":
        """Read a config.json dict; fields missing from the rope dict fall back as in transformers'
        ``standardize_rope_params`` (theta from ``rope_theta``, original length from the config, then
        ``max_position_embeddings``)."""
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"config partial_rotary_factor {partial} is not supported (only full-dimension RoPE)")
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        original = params.get("original_max_position_embeddings")
        if rope_type in ("llama3", "yarn"):
            # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style configs).
            original = config.get("original_max_position_embeddings") or original or config.get("max_position_embeddings")
        factor = params.get("factor")
        if rope_type == "yarn" and factor is None and original:
            factor = config["max_position_embeddings"] / original
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=None if factor is None else float(factor),
            original_max_position_embeddings=None if original is None else int(original),
            low_freq_factor=params.get("low_freq_factor"),
            high_freq_factor=params.get("high_freq_factor"),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1.0 when not extrapolating, scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_mscale(rope: RopeScaling) -> float:
    """Multiplier of the softmax scale under YaRN: get_mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set
    (DeepSeek-V3: factor 40 -> (0.1 ln 40 + 1)^2 = 1.8739), else 1. transformers' ``yarn_apply_mscale``, DeepSeek's
    ``softmax_scale * mscale * mscale``."""
    if rope.rope_type == "default" or not rope.mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
    return m * m


def rope_inv_freq(dim: int, rope: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies float32 [dim // 2] and the cos/sin ``attention_factor`` (1.0 except for yarn)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"RoPE dimension must be positive and even, got {dim}")
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    return _yarn(dim, rope)


def _llama3(inv_freq: torch.Tensor, rope: RopeScaling) -> torch.Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(dim: int, rope: RopeScaling) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength makes `rotations` turns over the context
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high-frequency dims keep their frequency; 0: low-frequency dims are interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of positions, computed on the fly (no [max_positions, dim] table: 131072 x 128 x 4 B x 2 =
    128 MB for Llama 3.1, while one step's [T, dim/2] costs nothing to compute).

    forward(positions int64 [...]) -> (cos, sin) float32 [..., dim // 2], already multiplied by attention_factor.
    Holds no parameters or buffers: nothing of it is in a checkpoint. ``inv_freq`` is a plain tensor attribute that
    follows the positions' device (copied there once).
    """

    def __init__(self, dim: int, rope: RopeScaling):
        super().__init__()
        self.dim, self.rope = dim, rope
        self.inv_freq, self.attention_factor = rope_inv_freq(dim, rope)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # fp32 as in transformers: bf16 positions lose > 256
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rope_type={self.rope.rope_type!r}, theta={self.rope.theta}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [..., H, dim] by (cos, sin) [..., dim // 2] (the leading dims of x without H).

    Computed in x.dtype with cos/sin cast to it first, as transformers does (bit-identical BF16 outputs).
    interleaved=False pairs channel i with i + dim/2; True pairs 2i with 2i + 1 and returns the de-interleaved result.
    """
    if x.is_cuda and x.dim() == 3 and cos.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16):
        from ingot.kernels.norm_rope import rotary  # one launch instead of 9, within 1 ulp (the engine's [T, H, D])

        return rotary(x, cos, sin, interleaved)
    cos = cos.to(x.dtype).unsqueeze(-2)  # (..., 1, dim/2): broadcast over heads
    sin = sin.to(x.dtype).unsqueeze(-2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
