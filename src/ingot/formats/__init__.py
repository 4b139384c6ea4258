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
from ingot.formats.safetensors_io import CheckpointError
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


def model_dtype(config: dict) -> torch.dtype:
    """The dtype of the model's unquantized tensors, from config.json (``dtype`` or the older ``torch_dtype``)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise CheckpointError(f"config.json dtype {name!r}: expected one of {', '.join(dtypes)}")
    return dtypes[name]


__all__ = [
    "KINDS", "QUANTIZABLE", "Format", "StoredLinear", "TensorSpec", "CheckpointError",
    "FORMAT_NAMES", "FORMATS_OF_KIND", "writer", "detect", "model_dtype",
]
