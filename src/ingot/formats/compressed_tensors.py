"""compressed-tensors (vLLM, llm-compressor), FORMATS.md:

- int-quantized (W8A8 int8):  ``weight`` int8 [N, K], ``weight_scale`` [N, 1] in the model dtype.
- pack-quantized (W4A16 group 128, W8A16 per channel): ``weight_packed`` int32 [N, cdiv(K * bits, 32)],
  ``weight_shape`` int32 [2], ``weight_scale`` [N, cdiv(K, 128)] (group) or [N, 1] (channel).
- float-quantized (FP8 block): ``weight`` e4m3fn [N, K], ``weight_scale`` [cdiv(N, 128), cdiv(K, 128)].
compressed-tensors keeps scales in the model's dtype (its initializer makes them so), so ingot does too.

int8-weight is written with strategy "channel", as llm-compressor's W8A16 preset does (one scale per output
row, the same numbers as ingot's int8-weight scheme); group-128 int8 is not an ingot scheme.
"""

from __future__ import annotations

import torch

from ingot.formats.base import Format, StoredLinear, TensorSpec, cdiv, expect_shape, pack_int32, unpack_int32
from ingot.formats.safetensors_io import CheckpointError

FORMAT_OF = {
    "fp8-block": "float-quantized",
    "int8-channel": "int-quantized",
    "int8-weight": "pack-quantized",
    "int4-group": "pack-quantized",
}


def _args(num_bits: int, type_: str, strategy: str, *, dynamic: bool = False, group_size=None, block=None) -> dict:
    return {
        "num_bits": num_bits,
        "type": type_,
        "strategy": strategy,
        "symmetric": True,
        "dynamic": dynamic,
        "group_size": group_size,
        "block_structure": block,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def _scheme_args(kind: str) -> tuple[dict, dict | None]:
    """(weights, input_activations) quantization args of a kind."""
    if kind == "fp8-block":
        return _args(8, "float", "block", block=[128, 128]), _args(8, "float", "group", dynamic=True, group_size=128)
    if kind == "int8-channel":
        return _args(8, "int", "channel"), _args(8, "int", "token", dynamic=True)
    if kind == "int8-weight":
        return _args(8, "int", "channel"), None
    return _args(4, "int", "group", group_size=128), None


def _linear_group(qcfg: dict) -> dict:
    groups = [g for g in qcfg.get("config_groups", {}).values() if "Linear" in g.get("targets", [])]
    if len(groups) != 1:
        raise CheckpointError(
            "config.json quantization_config.config_groups: expected exactly one group targeting 'Linear', "
            f"found {len(groups)}"
        )
    return groups[0]


class CompressedTensors(Format):
    name = "compressed-tensors"
    kinds = tuple(FORMAT_OF)

    def __init__(self, kind: str | None = None):
        self.linear_key = ".weight_packed" if FORMAT_OF.get(kind) == "pack-quantized" else ".weight_scale"
        self.companions = (".weight", ".weight_packed", ".weight_shape", ".weight_scale")

    def required(self, kind):
        if FORMAT_OF[kind] == "pack-quantized":
            return (".weight_packed", ".weight_shape", ".weight_scale")
        return (".weight", ".weight_scale")

    def scale_dtype(self, kind, model_dtype):
        return model_dtype

    def source_kind(self, config, tensors):
        qcfg = config["quantization_config"]
        group = _linear_group(qcfg)
        w, a = group.get("weights") or {}, group.get("input_activations")
        key = (qcfg.get("format"), w.get("type"), w.get("num_bits"), w.get("strategy"), a is not None)
        kinds = {
            ("float-quantized", "float", 8, "block", True): "fp8-block",
            ("int-quantized", "int", 8, "channel", True): "int8-channel",
            ("pack-quantized", "int", 8, "channel", False): "int8-weight",
            ("pack-quantized", "int", 4, "group", False): "int4-group",
        }
        if key not in kinds or not w.get("symmetric", False):
            raise CheckpointError(
                f"config.json: compressed-tensors {key[0]} with {w.get('num_bits')}-bit {w.get('type')} "
                f"{w.get('strategy')} weights (symmetric={w.get('symmetric')}) is not a layout ingot reads; "
                f"it reads: fp8 block, int8 channel W8A8, int8 channel W8A16, int4 group W4A16 (symmetric)"
            )
        if kinds[key] == "int4-group" and w.get("group_size") != 128:
            raise CheckpointError(f"config.json: int4 group_size {w.get('group_size')}; ingot reads group 128")
        return kinds[key]

    def decode(self, prefix, src, kind, config):
        if kind in ("int8-weight", "int4-group"):
            bits = 8 if kind == "int8-weight" else 4
            n, k = (int(v) for v in src.get(f"{prefix}.weight_shape").tolist())
            packed = src.get(f"{prefix}.weight_packed")
            expect_shape(f"{prefix}.weight_packed", packed, (n, cdiv(k * bits, 32)), "packed weight")
            s = src.get(f"{prefix}.weight_scale")
            expect_shape(f"{prefix}.weight_scale", s, (n, 1 if kind == "int8-weight" else cdiv(k, 128)), "scale")
            return StoredLinear(kind, unpack_int32(packed, bits, k), s.float(), group_size=128)
        w = src.get(f"{prefix}.weight")
        expected = torch.float8_e4m3fn if kind == "fp8-block" else torch.int8
        if w.dtype != expected:
            raise CheckpointError(f"tensor {prefix}.weight: dtype {w.dtype}, expected {expected} for {kind}")
        n, k = w.shape
        s = src.get(f"{prefix}.weight_scale")
        if kind == "fp8-block":
            block = tuple(_linear_group(config["quantization_config"])["weights"].get("block_structure") or (128, 128))
            expect_shape(f"{prefix}.weight_scale", s, (cdiv(n, block[0]), cdiv(k, block[1])), "block scale")
            return StoredLinear(kind, w, s.float(), block_size=block)
        expect_shape(f"{prefix}.weight_scale", s, (n, 1), "per-channel scale")
        return StoredLinear(kind, w, s.float())

    def linear_specs(self, prefix, kind, n, k, model_dtype):
        self.check_kind(kind)
        if kind == "fp8-block":
            return [
                TensorSpec(f"{prefix}.weight", torch.float8_e4m3fn, (n, k)),
                TensorSpec(f"{prefix}.weight_scale", model_dtype, (cdiv(n, 128), cdiv(k, 128))),
            ]
        if kind == "int8-channel":
            return [
                TensorSpec(f"{prefix}.weight", torch.int8, (n, k)),
                TensorSpec(f"{prefix}.weight_scale", model_dtype, (n, 1)),
            ]
        bits = 8 if kind == "int8-weight" else 4
        return [
            TensorSpec(f"{prefix}.weight_packed", torch.int32, (n, cdiv(k * bits, 32))),
            TensorSpec(f"{prefix}.weight_scale", model_dtype, (n, 1 if kind == "int8-weight" else cdiv(k, 128))),
            TensorSpec(f"{prefix}.weight_shape", torch.int32, (2,)),
        ]

    def encode(self, prefix, lin, model_dtype):
        scale = lin.scale.to(model_dtype)
        if lin.kind in ("fp8-block", "int8-channel"):
            return {f"{prefix}.weight": lin.qweight, f"{prefix}.weight_scale": scale}
        bits = 8 if lin.kind == "int8-weight" else 4
        n, k = lin.qweight.shape
        return {
            f"{prefix}.weight_packed": pack_int32(lin.qweight, bits),
            f"{prefix}.weight_scale": scale,
            f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int32),
        }

    def load_caveat(self, kind, n, k):
        # compressed-tensors' strategy_cdiv (and vLLM's kernels) need K to divide into groups / blocks.
        if kind in ("int4-group", "fp8-block") and k % 128:
            return f"compressed-tensors and vLLM refuse {kind} weights whose K is not a multiple of 128"
        return None

    def quantization_config(self, kind, ignored, scale_fmt):
        self.check_kind(kind)
        weights, acts = _scheme_args(kind)
        return {
            "quant_method": "compressed-tensors",
            "format": FORMAT_OF[kind],
            "quantization_status": "compressed",
            # lm_head and the MoE router are never quantized (FORMATS.md); the router is a plain Linear in
            # some implementations, so it must be named here or a loader would quantize it.
            "ignore": ["lm_head", "re:.*mlp\\.gate$", *ignored],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "kv_cache_scheme": None,
        }
