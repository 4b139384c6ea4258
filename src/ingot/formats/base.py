"""What every format shares: which tensors are quantizable linears, the logical form of a stored linear,
and the Format interface (read a linear's stored tensors, write them, describe them in config.json).

Formats speak bytes and layouts only; the numbers (scales, rounding) are ``ingot.quant``'s.
A linear is identified by its module prefix, e.g. ``model.layers.3.self_attn.q_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from ingot.formats.safetensors_io import CheckpointError, nbytes

# FORMATS.md "What is quantized": attention projections (Llama and DeepSeek MLA), dense MLP, MoE experts and
# shared experts, inside the transformer blocks. embed_tokens, lm_head, norms, biases and the MoE router
# (mlp.gate) never match.
QUANTIZABLE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))$"
)

# Logical kinds of stored linears; they are the names of ingot's scheme presets.
KINDS = ("bf16", "fp8-block", "int8-block", "int8-channel", "int8-weight", "int4-group")


def layer_index(prefix: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", prefix)
    return int(m.group(1)) if m else None


@dataclass
class StoredLinear:
    """A linear's weight as decoded from (or about to be encoded into) a format: logical tensors, no math.

    kind:       one of KINDS.
    qweight:    [N, K] values: float8_e4m3fn, int8 (int4 values in [-8, 7] unpacked into int8), or a float
                dtype for bf16.
    scale:      the dequantization multiplier grid - block [cdiv(N, bn), cdiv(K, bk)], channel [N, 1],
                group [N, cdiv(K, g)] - or None for bf16.
    block_size: (bn, bk) for block kinds; group_size for group kinds.
    """

    kind: str
    qweight: torch.Tensor
    scale: torch.Tensor | None
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class TensorSource(Protocol):
    """Where a format's decoder reads stored tensors from (a ``Checkpoint``)."""

    def get(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Format:
    """A checkpoint format. Subclasses set ``name``, ``kinds`` and override the encode/decode hooks.

    Read side: ``linear_key`` is the suffix whose presence marks a stored quantized linear; ``companions`` are
    the suffixes that belong to it. Write side: ``linear_specs`` (shapes without data, for planning shards),
    ``encode`` (the tensors), ``quantization_config`` (the config.json entry).
    """

    name: str = ""
    kinds: tuple[str, ...] = ()  # quantized kinds this format can store (bf16 linears always can)
    linear_key: str = ".weight"
    companions: tuple[str, ...] = (".weight",)

    # ---- read
    def required(self, kind: str) -> tuple[str, ...]:
        """Suffixes a stored linear of ``kind`` cannot be read without (its weight and scale)."""
        return self.companions

    def scale_dtype(self, kind: str, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype this format stores weight scales in."""
        return torch.float32

    def source_kind(self, config: dict, tensors: dict) -> str:
        """Which kind the quantized linears of a checkpoint in this format are (from its config)."""
        raise NotImplementedError

    def decode(self, prefix: str, src: TensorSource, kind: str, config: dict) -> StoredLinear:
        raise NotImplementedError

    # ---- write
    def linear_specs(self, prefix: str, kind: str, n: int, k: int, model_dtype: torch.dtype) -> list[TensorSpec]:
        raise NotImplementedError

    def encode(self, prefix: str, lin: StoredLinear, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, kind: str, ignored: list[str], scale_fmt: str) -> dict | None:
        raise NotImplementedError

    def load_caveat(self, kind: str, n: int, k: int) -> str | None:
        """Why the engines that load this format would refuse an [n, k] linear of ``kind`` (None: they load it).

        The file is still valid per FORMATS.md (ragged edges pad the scale grid) and ingot reads it; the caveat
        is reported so users can ``--ignore`` such layers or pick another format.
        """
        return None

    # ---- shared
    def check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            supported = ", ".join(self.kinds) or "none (unquantized only)"
            raise ValueError(f"format {self.name!r} cannot store scheme {kind!r}; it stores: {supported}")


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Refuse a stored tensor whose shape does not match what its weight needs."""
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name}: {what} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def bf16_specs(prefix: str, n: int, k: int, dtype: torch.dtype) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", dtype, (n, k))]


class PlainFormat(Format):
    """Unquantized checkpoints: every linear a plain ``weight`` in ``dtype``; no quantization_config."""

    kinds = ()

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def source_kind(self, config: dict, tensors: dict) -> str:
        return "bf16"

    def decode(self, prefix: str, src: TensorSource, kind: str, config: dict) -> StoredLinear:
        return StoredLinear("bf16", src.get(f"{prefix}.weight"), None)

    def linear_specs(self, prefix, kind, n, k, model_dtype):
        return bf16_specs(prefix, n, k, model_dtype)

    def encode(self, prefix, lin, model_dtype):
        return {f"{prefix}.weight": lin.qweight.to(model_dtype)}

    def quantization_config(self, kind, ignored, scale_fmt):
        return None


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit values along the last dim into int32, compressed-tensors' layout.

    q: int8 [R, C] in [-2^(bits-1), 2^(bits-1) - 1] -> int32 [R, cdiv(C * bits, 32)]: each value offset by
    +2^(bits-1) to be unsigned, element i at bit offset bits * i, low bits first; the tail is zero-padded.
    """
    per = 32 // bits
    rows, cols = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    pad = cdiv(cols, per) * per - cols
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * bits
    packed = (u << shifts).sum(dim=-1)  # disjoint bit fields: sum == bitwise or; fits in 32 bits
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 [R, P] -> int8 [R, cols] signed values."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    u = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(packed.shape[0], -1)[:, :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)
