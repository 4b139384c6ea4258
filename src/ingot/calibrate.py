"""Calibration for SmoothQuant smoothing: run the source model on calibration text and measure, per channel, the
largest |activation| at each smoothing site (``ingot.quant.smooth``), then turn those into factors.

Downstream of ``models`` (it runs ingot's own runtime model, ``load_model``, with forward hooks); ``ingot convert
--smooth`` hands ``calibrate`` to the converter, which calls it once per conversion (a resumed conversion reuses the
factors it saved).

Calibration text: GSM8K train rows (``$INGOT_DATA_DIR/gsm8k/train.jsonl``; the data README names it as calibration
text), ``samples`` rows drawn with ``random.Random(seed)``, each "question\\nanswer", joined by blank lines,
tokenized once and cut into ``seq_len``-token sequences (the tail dropped). Never an evaluation test set.
The forward runs in float32 on CPU (bf16 matmuls there are slower and add rounding), in the model's dtype on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ingot.quant.smooth import Pair, Smoothing, SmoothConfig, find_pairs, pair_factors


class CalibrationDataError(FileNotFoundError):
    """The calibration text is missing or does not hold what it should."""


def calibration_rows(cfg: SmoothConfig) -> tuple[list[str], str]:
    """The texts of the drawn rows and the sha256 of the file. Raises CalibrationDataError naming the path."""
    path = cfg.calib_path
    if path is None:
        raise CalibrationDataError(
            "smoothing needs calibration text: pass --data-dir DIR or set INGOT_DATA_DIR (expected DIR/gsm8k/train.jsonl)")
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration text not found: expected {path} (GSM8K train.jsonl)")
    data = path.read_bytes()
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path} line {n}: not JSON ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise CalibrationDataError(f"{path} line {n}: expected an object with string 'question' and 'answer'")
        rows.append(f"{row['question']}\n{row['answer']}")
    if not rows:
        raise CalibrationDataError(f"{path}: no rows")
    picked = random.Random(cfg.seed).sample(range(len(rows)), min(cfg.samples, len(rows)))
    return [rows[i] for i in picked], hashlib.sha256(data).hexdigest()


def calibration_batches(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """int64 [n, seq_len]: the texts joined by blank lines, tokenized once, cut into full sequences (at least one:
    a shorter text gives a single shorter sequence)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=True)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        return torch.tensor([ids], dtype=torch.int64)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def activation_maxima(model: torch.nn.Module, stats: set[tuple[str, str]], batches: torch.Tensor,
                      device: str) -> dict[tuple[str, str], torch.Tensor]:
    """Per-channel max |x| (float32 [channels], on CPU) at each ``(where, module)`` of ``stats``: ``("out", m)`` the
    output of module m, ``("in", m)`` its first input, over every token of ``batches`` (one sequence per forward).
    A site the forward never reached (an MoE expert that got no token) is absent from the result."""
    modules = dict(model.named_modules())
    found: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def update(key, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        found[key] = torch.maximum(found[key], m) if key in found else m

    for where, name in sorted(stats):
        if name not in modules:
            raise ValueError(f"calibration: the model has no module {name} (expected from the checkpoint's names)")
        key = (where, name)
        if where == "out":
            handles.append(modules[name].register_forward_hook(lambda m, a, out, key=key: update(key, out)))
        else:
            handles.append(modules[name].register_forward_pre_hook(lambda m, a, key=key: update(key, a[0])))
    try:
        with torch.inference_mode():
            for row in batches:
                model.score(row[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in found.items()}


def _weight_max(module: torch.nn.Module) -> torch.Tensor:
    """max over rows of |W|, float32 [in_features], from the weight the layer multiplies by (any stored kind)."""
    from ingot.layers.linear import Linear, dequantized_weight

    w = dequantized_weight(module) if isinstance(module, Linear) else module.weight.float()
    return w.abs().amax(0).cpu()


@dataclass
class Maxima:
    """What calibration measured: per pair, max |x| per consumer channel and max |W| per consumer column (float32,
    CPU). Independent of alpha: ``smoothing(alpha)`` gives the factors for any alpha without a new forward."""

    pairs: list[Pair]
    act: list[torch.Tensor]
    weight: list[torch.Tensor]
    skipped: list[str]
    record: dict

    def smoothing(self, alpha: float) -> Smoothing:
        factors = [pair_factors(p, a, w, alpha) for p, a, w in zip(self.pairs, self.act, self.weight)]
        return Smoothing(factors, {"method": "smoothquant", "alpha": alpha, **self.record, "skipped": self.skipped})


def measure(src: Path | str, cfg: SmoothConfig, device: str = "cpu", log=None) -> Maxima:
    """Activation and weight maxima at every smoothing site of the checkpoint ``src`` (any format ``load_model``
    reads; FP8 dequantized to the float dtype). Raises CalibrationDataError before loading anything when the
    calibration text is missing."""
    from transformers import AutoTokenizer

    from ingot import formats
    from ingot.formats.safetensors_io import Checkpoint
    from ingot.models.loader import load_model

    t0 = time.perf_counter()
    texts, sha = calibration_rows(cfg)  # first: a missing file fails before minutes of loading
    src = Path(src)
    ckpt = Checkpoint(src)
    fmt, kind = formats.detect(ckpt.config)
    linears, consumed = formats.find_linears(ckpt, fmt, kind)
    tensors = {n for n in ckpt.tensors if n not in consumed}
    pairs = find_pairs(ckpt.config, set(linears), tensors, cfg.pairs)
    if not pairs:
        raise ValueError(f"{src}: no smoothing sites found (model_type {ckpt.config.get('model_type')!r})")
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    batches = calibration_batches(tokenizer, texts, cfg.seq_len)
    dtype = torch.float32 if not str(device).startswith("cuda") else None
    model = load_model(src, device=device, dtype=dtype, fp8_fallback="bf16")
    if log:
        log(f"calibrate: {len(texts)} rows, {batches.numel()} tokens in {batches.shape[0]} sequences on {device}")
    t1 = time.perf_counter()
    acts = activation_maxima(model, {p.stat for p in pairs}, batches, device)
    t2 = time.perf_counter()
    modules = dict(model.named_modules())
    found, act, weight, skipped = [], [], [], []
    for p in pairs:
        if p.stat not in acts:
            skipped.append(f"{p.stat[1]} (no activations seen)")
            continue
        found.append(p)
        act.append(acts[p.stat])
        weight.append(torch.stack([_weight_max(modules[c]) for c in p.consumers]).amax(0))
    del model
    record = {
        "pair_kinds": list(cfg.pairs),
        "calibration": {
            "file": str(cfg.calib_path), "sha256": sha, "rows": len(texts), "seed": cfg.seed,
            "sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1]), "tokens": int(batches.numel()),
            "device": str(device), "dtype": str(dtype or formats.model_dtype(ckpt.config)).removeprefix("torch."),
            "seconds_load": round(t1 - t0, 2), "seconds_forward": round(t2 - t1, 2),
        },
    }
    return Maxima(found, act, weight, skipped, record)


def calibrate(src: Path | str, cfg: SmoothConfig, device: str = "cpu", log=None) -> Smoothing:
    """Smoothing factors of the checkpoint ``src`` at ``cfg.alpha`` (``measure``, then the factors)."""
    return measure(src, cfg, device, log).smoothing(cfg.alpha)
