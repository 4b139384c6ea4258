"""SGLang's INT8 formats (FORMATS.md): ``blockwise_int8`` (Meituan DeepSeek-R1-Block-INT8) and
``w8a8_int8`` (Meituan DeepSeek-R1-Channel-INT8).

blockwise_int8: ``weight`` int8 [N, K] + ``weight_scale_inv`` float32 [cdiv(N, 128), cdiv(K, 128)].
w8a8_int8:      ``weight`` int8 [N, K] + ``weight_scale`` float32 [N, 1].
Meituan's channel checkpoint ships without a quantization_config; ingot writes
``{"quant_method": "w8a8_int8"}`` so the directory is self-describing.
"""

from __future__ import annotations

import torch

from ingot.formats.base import Format, StoredLinear, TensorSpec, expect_shape
from ingot.formats.hf_fp8 import block_size_of, block_specs, decode_block
from ingot.formats.safetensors_io import CheckpointError

METHOD = {"int8-block": "blockwise_int8", "int8-channel": "w8a8_int8"}


class SglangInt8(Format):
    name = "sglang"
    kinds = ("int8-block", "int8-channel")

    def __init__(self, kind: str | None = None):
        # On the read side the config decides which of the two layouts a checkpoint uses.
        self.linear_key = ".weight_scale" if kind == "int8-channel" else ".weight_scale_inv"
        self.companions = (".weight", self.linear_key)

    def source_kind(self, config, tensors):
        method = config["quantization_config"]["quant_method"]
        return {v: k for k, v in METHOD.items()}[method]

    def decode(self, prefix, src, kind, config):
        if kind == "int8-block":
            block = block_size_of(config["quantization_config"])
            return decode_block(prefix, src, kind, block, torch.int8)
        w = src.get(f"{prefix}.weight")
        if w.dtype != torch.int8:
            raise CheckpointError(f"tensor {prefix}.weight: dtype {w.dtype}, expected torch.int8 for w8a8_int8")
        s = src.get(f"{prefix}.weight_scale")
        expect_shape(f"{prefix}.weight_scale", s, (w.shape[0], 1), "per-channel scale")
        return StoredLinear(kind, w, s.float())

    def linear_specs(self, prefix, kind, n, k, model_dtype):
        self.check_kind(kind)
        if kind == "int8-block":
            return block_specs(prefix, n, k, torch.int8)
        return [TensorSpec(f"{prefix}.weight", torch.int8, (n, k)), TensorSpec(f"{prefix}.weight_scale", torch.float32, (n, 1))]

    def encode(self, prefix, lin, model_dtype):
        scale_name = ".weight_scale_inv" if lin.kind == "int8-block" else ".weight_scale"
        return {f"{prefix}.weight": lin.qweight, f"{prefix}{scale_name}": lin.scale.float()}

    def quantization_config(self, kind, ignored, scale_fmt):
        self.check_kind(kind)
        cfg: dict = {"quant_method": METHOD[kind]}
        if kind == "int8-block":
            cfg.update(activation_scheme="dynamic", weight_block_size=[128, 128])
        if ignored:
            cfg["ignored_layers"] = list(ignored)
        return cfg
