"""``ingot inspect``: what a checkpoint holds and what its weights would take on a GPU at each precision.

Reads config.json and the shard headers only (plus the tiny ``weight_shape`` tensors of packed layouts), so it
answers in seconds for a 690 GB checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ingot import formats
from ingot.formats.base import QUANTIZABLE, layer_index
from ingot.formats.safetensors_io import Checkpoint, numel
from ingot.quant.ref import scale_shape
from ingot.quant.schemes import PRESETS, Scheme

# The precisions the estimate is given for (a preset each; int8 is int8-channel, the smaller of the two int8s).
ESTIMATE_SCHEMES = ("bf16", "fp8-block", "int8-channel", "int4-group")



def linear_bytes(scheme: Scheme, n: int, k: int) -> int:
    """Bytes of one [n, k] linear under ``scheme``: values plus scales (float32; bf16 for int4 groups)."""
    if not scheme.is_quantized:
        return 2 * n * k
    values = n * k * scheme.bits // 8
    scales = numel(scale_shape(scheme, n, k)) * (2 if scheme.weight == "int4" else 4)
    return values + scales


def inspect_checkpoint(path: Path | str) -> dict:
    """A summary dict of a checkpoint directory or index file (see ``format_table``)."""
    ckpt = Checkpoint(path)
    config = ckpt.config
    fmt, kind = formats.detect(config)
    linears, consumed = formats.find_linears(ckpt, fmt, kind)
    n_layers = config.get("num_hidden_layers")
    shapes = {prefix: formats.linear_shape(ckpt, prefix) for prefix in linears}
    other = {n: i for n, i in ckpt.tensors.items() if n not in consumed}
    other_params = sum(numel(i.shape) for i in other.values())
    other_bytes = sum(i.nbytes for i in other.values())

    def quantizable(prefix: str) -> bool:
        layer = layer_index(prefix)
        mtp = n_layers is not None and layer is not None and layer >= n_layers
        return QUANTIZABLE.match(prefix) is not None and not mtp

    estimates = {}
    for name in ESTIMATE_SCHEMES:
        scheme = PRESETS[name]
        total = other_bytes
        for prefix, (n, k) in shapes.items():
            total += linear_bytes(scheme if quantizable(prefix) else PRESETS["bf16"], n, k)
        estimates[name] = total
    disk = sum((ckpt.dir / s).stat().st_size for s in ckpt.shards)
    return {
        "path": str(ckpt.dir),
        "format": fmt.name,
        "scheme": kind,
        "model_type": config.get("model_type"),
        "params": other_params + sum(n * k for n, k in shapes.values()),
        "linears": dict(sorted(Counter(linears.values()).items())),
        "other_tensors": len(other),
        "shards": len(ckpt.shards),
        "bytes_on_disk": disk,
        "gpu_bytes_estimate": estimates,
        "smoothing": _smoothing(ckpt.dir),
        "gptq": _gptq(ckpt.dir),
    }


def _smoothing(path: Path) -> dict | None:
    """SmoothQuant smoothing folded in by ``ingot convert --smooth`` (from ingot_manifest.json), in short."""
    manifest = path / "ingot_manifest.json"
    if not manifest.is_file():
        return None
    sm = json.loads(manifest.read_text()).get("smoothing")
    if not sm:
        return None
    kinds = Counter(p["kind"] for p in sm.get("pairs", []))
    calib = sm.get("calibration", {})
    return {"method": sm.get("method"), "alpha": sm.get("alpha"), "pairs": dict(sorted(kinds.items())),
            "calibration": {k: calib.get(k) for k in ("file", "sha256", "rows", "tokens", "seed")}}


def _gptq(path: Path) -> dict | None:
    """GPTQ rounding done by ``ingot convert --gptq`` (from ingot_manifest.json), in short."""
    manifest = path / "ingot_manifest.json"
    if not manifest.is_file():
        return None
    g = json.loads(manifest.read_text()).get("gptq")
    if not g:
        return None
    calib = g.get("calibration", {})
    return {"method": g.get("method"), **{k: g.get(k) for k in ("damp", "block", "act_order", "scales", "sequential",
                                                                 "quantized", "loss_ratio_mean")},
            "rtn_fallback": len(g.get("rtn_fallback", [])),
            "calibration": {k: calib.get(k) for k in ("file", "sha256", "rows", "tokens", "seed", "smoothed")}}


def _gb(n: int) -> str:
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB" if n < 100e9 else f"{n / 1e9:.0f} GB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _smooth_cell(sm: dict | None) -> str:
    if not sm:
        return "-"
    return f"alpha {sm['alpha']}, {sum(sm['pairs'].values())} pairs, {sm['calibration']['tokens']} tokens"


def _gptq_cell(g: dict | None) -> str:
    if not g:
        return "-"
    order = ", act-order" if g["act_order"] else ""
    return (f"damp {g['damp']}, {g['scales']}{order}, {'sequential' if g['sequential'] else 'one pass'}, "
            f"{g['quantized']} linears, {g['calibration']['tokens']} tokens")


def format_table(rows: list[dict]) -> str:
    """One row per checkpoint: what it is, what it holds, and its weights' GPU memory at each precision."""
    head = ["path", "format", "scheme", "model", "params", "linears", "other", "shards", "on disk", "smoothing", "gptq"]
    head += [f"GPU {s}" for s in ESTIMATE_SCHEMES]
    table = [head]
    for r in rows:
        linears = ", ".join(f"{k} {v}" for k, v in r["linears"].items())
        cells = [r["path"], r["format"], r["scheme"], str(r["model_type"]), _count(r["params"]), linears,
                 str(r["other_tensors"]), str(r["shards"]), _gb(r["bytes_on_disk"]), _smooth_cell(r.get("smoothing")),
                 _gptq_cell(r.get("gptq"))]
        cells += [_gb(r["gpu_bytes_estimate"][s]) for s in ESTIMATE_SCHEMES]
        table.append(cells)
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
