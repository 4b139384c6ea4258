"""GPTQ v1 checkpoints (AutoGPTQ / GPTQModel), 4-bit, group 128, symmetric (FORMATS.md).

``qweight`` int32 [K / 8, N]: eight 4-bit values packed along the *input* dimension, low bits first.
``qzeros``  int32 [cdiv(K, 128), N / 8]: v1 stores zero - 1 (symmetric zero 8 -> 7), packed along N.
``scales``  fp16 [cdiv(K, 128), N];  ``g_idx`` int32 [K] = i // 128 (no act-order).
Stored values are unsigned: q_u = q + 8, so w = (q_u - (qzeros + 1)) * scale = q * scale.
"""

from __future__ import annotations

import torch

from ingot.formats.base import Format, StoredLinear, TensorSpec, cdiv, expect_shape, pack_int32, unpack_int32
from ingot.formats.safetensors_io import CheckpointError

GROUP = 128


class Gptq(Format):
    name = "gptq"
    kinds = ("int4-group",)
    linear_key = ".qweight"
    companions = (".qweight", ".qzeros", ".scales", ".g_idx")

    def required(self, kind):
        return (".qweight", ".qzeros", ".scales")  # g_idx is optional without act-order

    def scale_dtype(self, kind, model_dtype):
        return torch.float16

    def source_kind(self, config, tensors):
        q = config["quantization_config"]
        checks = {"bits": 4, "group_size": GROUP, "sym": True, "desc_act": False}
        bad = {k: q.get(k) for k, v in checks.items() if q.get(k, v) != v}
        if bad or q.get("checkpoint_format", "gptq") != "gptq":
            raise CheckpointError(
                f"config.json quantization_config: ingot reads GPTQ v1 4-bit group-128 symmetric without act-order; "
                f"got {bad or {'checkpoint_format': q.get('checkpoint_format')}}"
            )
        return "int4-group"

    def decode(self, prefix, src, kind, config):
        qweight = src.get(f"{prefix}.qweight")
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        scales = src.get(f"{prefix}.scales")
        expect_shape(f"{prefix}.scales", scales, (cdiv(k, GROUP), n), "scales")
        qzeros = src.get(f"{prefix}.qzeros")
        expect_shape(f"{prefix}.qzeros", qzeros, (cdiv(k, GROUP), n // 8), "qzeros")
        zeros = unpack_int32(qzeros, 4, n).to(torch.int32) + 8 + 1  # v1: stored zero - 1 (unsigned)
        if not (zeros == 8).all():
            raise CheckpointError(f"tensor {prefix}.qzeros: asymmetric zero points; ingot reads symmetric GPTQ")
        if f"{prefix}.g_idx" in src:
            g_idx = src.get(f"{prefix}.g_idx")
            if not torch.equal(g_idx.long(), torch.arange(k) // GROUP):
                raise CheckpointError(f"tensor {prefix}.g_idx: act-order permutation; ingot reads desc_act=false")
        q = unpack_int32(qweight.T.contiguous(), 4, k)  # [N, K] signed
        return StoredLinear(kind, q, scales.T.float().contiguous(), group_size=GROUP)

    def linear_specs(self, prefix, kind, n, k, model_dtype):
        self.check_kind(kind)
        if k % 8 or n % 8:
            raise ValueError(f"{prefix}: GPTQ packs 8 values per int32 along K and N; [{n}, {k}] is not a multiple of 8")
        g = cdiv(k, GROUP)
        return [
            TensorSpec(f"{prefix}.g_idx", torch.int32, (k,)),
            TensorSpec(f"{prefix}.qweight", torch.int32, (k // 8, n)),
            TensorSpec(f"{prefix}.qzeros", torch.int32, (g, n // 8)),
            TensorSpec(f"{prefix}.scales", torch.float16, (g, n)),
        ]

    def encode(self, prefix, lin, model_dtype):
        n, k = lin.qweight.shape
        g = cdiv(k, GROUP)
        zeros = torch.full((g, n), 8 - 1 - 8, dtype=torch.int8)  # v1 zero - 1 = 7, in pack's signed form (-1)
        return {
            f"{prefix}.g_idx": (torch.arange(k, dtype=torch.int32) // GROUP),
            f"{prefix}.qweight": pack_int32(lin.qweight, 4).T.contiguous(),
            f"{prefix}.qzeros": pack_int32(zeros, 4),
            f"{prefix}.scales": lin.scale.to(torch.float16).T.contiguous(),
        }

    def quantization_config(self, kind, ignored, scale_fmt):
        self.check_kind(kind)
        cfg = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": False,
            "sym": True,
            "damp_percent": 0.01,
            "true_sequential": True,
            "checkpoint_format": "gptq",
        }
        if ignored:
            cfg["modules_to_not_convert"] = list(ignored)
        return cfg
