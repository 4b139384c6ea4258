"""Checkpoint formats: bytes on disk only (FORMATS.md). No quantization math lives here.

``writer(name, kind)`` gives the format object that writes ``kind``; ``detect(config)`` reads config.json's
``quantization_config`` and gives (format, kind) of a source checkpoint. The format lives in config.json,
never in file names.
"""

from __future__ import annotations

import torch

from ingot.formats.base import KINDS, QUANTIZABLE, Format, PlainFormat, StoredLinear, TensorSpec
from ingot.formats.compressed_tensors import CompressedTensors
from ingot.formats.gptq import Gptq
from ingot.formats.hf_fp8 import HfFp8
from ingot.formats.safetensors_io import Checkpoint, CheckpointError
from ingot.formats.sglang_int8 import SglangInt8

FORMAT_NAMES = ("hf-fp8", "sglang", "compressed-tensors", "gptq", "bf16", "fp16")

# Which formats store each kind; the first is the default (the pairing: the format each
# target engine loads natively).
FORMATS_OF_KIND: dict[str, tuple[str, ...]] = {
    "bf16": ("bf16", "fp16"),
    "fp8-block": ("hf-fp8", "compressed-tensors"),
    "int8-block": ("sglang",),
    "int8-channel": ("sglang", "compressed-tensors"),
    "int8-weight": ("compressed-tensors",),
    "int4-group": ("compressed-tensors", "gptq"),
}


def writer(name: str | None, kind: str) -> Format:
    """The format that writes linears of ``kind``: ``name`` or the kind's default; refuses impossible pairs."""
    if kind not in FORMATS_OF_KIND:
        raise ValueError(f"unknown scheme {kind!r}")
    allowed = FORMATS_OF_KIND[kind]
    name = name or allowed[0]
    if name not in FORMAT_NAMES:
        raise ValueError(f"unknown format {name!r}; expected one of: {', '.join(FORMAT_NAMES)}")
    if name not in allowed:
        raise ValueError(f"format {name!r} cannot store scheme {kind!r}; {kind} can be written as: {', '.join(allowed)}")
    return _make(name, kind)


def _make(name: str, kind: str | None) -> Format:
    if name == "hf-fp8":
        return HfFp8()
    if name == "sglang":
        return SglangInt8(kind)
    if name == "compressed-tensors":
        return CompressedTensors(kind)
    if name == "gptq":
        return Gptq()
    return PlainFormat(name, torch.float16 if name == "fp16" else torch.bfloat16)


METHODS = {"fp8": "hf-fp8", "blockwise_int8": "sglang", "w8a8_int8": "sglang", "compressed-tensors": "compressed-tensors", "gptq": "gptq"}


def detect(config: dict) -> tuple[Format, str]:
    """(format, kind of its quantized linears) of a checkpoint, from its config.json."""
    qcfg = config.get("quantization_config")
    if qcfg is None:
        return _make("fp16" if model_dtype(config) == torch.float16 else "bf16", None), "bf16"
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") not in METHODS:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        raise CheckpointError(
            f"config.json quantization_config.quant_method {method!r} is not a format ingot reads; "
            f"expected one of: {', '.join(METHODS)}"
        )
    name = METHODS[qcfg["quant_method"]]
    probe = _make(name, None)
    kind = probe.source_kind(config, {})
    return _make(name, kind), kind


def find_linears(ckpt: Checkpoint, fmt: Format, kind: str) -> tuple[dict[str, str], set[str]]:
    """The linears of a checkpoint: {module prefix: stored kind}, and the set of tensor names they consist of.

    Quantized linears are found by the format's marker tensor (e.g. ``weight_scale_inv``) and must have all
    their required companions; plain linears are quantizable module names (FORMATS.md) with a float 2-D
    ``weight``. A quantized-dtype weight without its scale is an error naming the missing tensor.
    """
    linears: dict[str, str] = {}
    if kind != "bf16":
        for name in ckpt.tensors:
            if name.endswith(fmt.linear_key):
                prefix = name[: -len(fmt.linear_key)]
                for suffix in fmt.required(kind):
                    if prefix + suffix not in ckpt:
                        raise CheckpointError(f"{ckpt.dir}: tensor {prefix + suffix} is missing (needed by linear {prefix})")
                linears[prefix] = kind
    consumed = {p + s for p in linears for s in fmt.companions if p + s in ckpt}
    for name, info in ckpt.tensors.items():
        if name in consumed or not name.endswith(".weight"):
            continue
        prefix = name[: -len(".weight")]
        if info.dtype in (torch.int8, torch.float8_e4m3fn, torch.int32):
            raise CheckpointError(
                f"{ckpt.dir}: tensor {name} is {info.dtype} but has no scale; expected {prefix}{fmt.linear_key} "
                f"(format {fmt.name}, from config.json)"
            )
        if QUANTIZABLE.match(prefix) and len(info.shape) == 2:
            linears[prefix] = "bf16"
            consumed.add(name)
    return linears, consumed


def linear_shape(ckpt: Checkpoint, prefix: str) -> tuple[int, int]:
    """[N, K] of a stored linear from the headers: ``weight``, compressed-tensors' ``weight_shape`` (packed), or
    GPTQ's ``qweight`` [K / 8, N]."""
    t = ckpt.tensors
    if f"{prefix}.weight" in t:
        shape = t[f"{prefix}.weight"].shape
    elif f"{prefix}.weight_shape" in t:
        shape = tuple(int(v) for v in ckpt.get(f"{prefix}.weight_shape").tolist())
    else:
        kq, n = t[f"{prefix}.qweight"].shape
        shape = (n, kq * 8)
    if len(shape) != 2:
        raise CheckpointError(f"{ckpt.dir}: linear {prefix} has weight shape {tuple(shape)}, expected [N, K]")
    return shape[0], shape[1]


def model_dtype(config: dict) -> torch.dtype:
    """The dtype of the model's unquantized tensors, from config.json (``dtype`` or the older ``torch_dtype``)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise CheckpointError(f"config.json dtype {name!r}: expected one of {', '.join(dtypes)}")
    return dtypes[name]


__all__ = [
    "KINDS", "QUANTIZABLE", "Format", "StoredLinear", "TensorSpec", "CheckpointError",
    "FORMAT_NAMES", "FORMATS_OF_KIND", "writer", "detect", "find_linears", "linear_shape", "model_dtype", "Checkpoint",
]
