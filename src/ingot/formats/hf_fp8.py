"""hf-fp8: DeepSeek-V3/R1 and transformers' "fine-grained FP8" (FORMATS.md).

Per linear: ``weight`` float8_e4m3fn [N, K] and ``weight_scale_inv`` float32 [cdiv(N, 128), cdiv(K, 128)] -
the dequantization multiplier despite its name. ``scale_fmt: "ue8m0"`` (DeepSeek-V3.1+) makes every scale a
power of two, still stored as float32.
"""

from __future__ import annotations

import torch

from ingot.formats.base import Format, StoredLinear, TensorSpec, cdiv, expect_shape
from ingot.formats.safetensors_io import CheckpointError


def block_size_of(qcfg: dict, path: str = "quantization_config") -> tuple[int, int]:
    block = qcfg.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"config.json {path}.weight_block_size: expected [rows, cols], got {block!r}")
    return (block[0], block[1])


def decode_block(prefix: str, src, kind: str, block: tuple[int, int], weight_dtype: torch.dtype) -> StoredLinear:
    """A block-scaled linear stored as ``weight`` + ``weight_scale_inv`` (hf-fp8 and sglang blockwise_int8)."""
    w = src.get(f"{prefix}.weight")
    if w.dtype != weight_dtype:
        raise CheckpointError(f"tensor {prefix}.weight: dtype {w.dtype}, expected {weight_dtype} for {kind}")
    s = src.get(f"{prefix}.weight_scale_inv")
    n, k = w.shape
    expect_shape(f"{prefix}.weight_scale_inv", s, (cdiv(n, block[0]), cdiv(k, block[1])), "block scale")
    return StoredLinear(kind, w, s.float(), block_size=block)


def block_specs(prefix: str, n: int, k: int, weight_dtype: torch.dtype) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", weight_dtype, (n, k)),
        TensorSpec(f"{prefix}.weight_scale_inv", torch.float32, (cdiv(n, 128), cdiv(k, 128))),
    ]


class HfFp8(Format):
    name = "hf-fp8"
    kinds = ("fp8-block",)
    linear_key = ".weight_scale_inv"
    companions = (".weight", ".weight_scale_inv")

    def source_kind(self, config, tensors):
        return "fp8-block"

    def decode(self, prefix, src, kind, config):
        block = block_size_of(config.get("quantization_config", {}))
        return decode_block(prefix, src, "fp8-block", block, torch.float8_e4m3fn)

    def linear_specs(self, prefix, kind, n, k, model_dtype):
        self.check_kind(kind)
        return block_specs(prefix, n, k, torch.float8_e4m3fn)

    def encode(self, prefix, lin, model_dtype):
        return {f"{prefix}.weight": lin.qweight, f"{prefix}.weight_scale_inv": lin.scale.float()}

    def quantization_config(self, kind, ignored, scale_fmt):
        self.check_kind(kind)
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if scale_fmt == "ue8m0":
            cfg["scale_fmt"] = "ue8m0"
        if ignored:
            # transformers reads modules_to_not_convert; SGLang and vLLM read ignored_layers.
            cfg["modules_to_not_convert"] = list(ignored)
            cfg["ignored_layers"] = list(ignored)
        return cfg
