"""Is round-to-nearest int8 particularly lossy on the embedded model because its weights come from a Q4_1 GGUF?

SmolLM2-135M-Instruct is read from a Q4_1 GGUF: each run of 32 weights along K is ``m + d * q`` (q in 0..15,
d and m per block) dequantized to BF16. This script (1) confirms that structure on the BF16 checkpoint, (2) compares
int8-channel RTN on those weights with RTN on the same weights "un-gridded" (each weight moved by a uniform
+-d/2 dither, so the values fill their block's range continuously with the same statistics), both as the relative
weight error and as the relative output error on calibration inputs (tr(E H E^T) / tr(W H W^T), H from GSM8K-train
text through ingot's own model), and (3) the same for int4-group.

    INGOT_DATA_DIR=../shared/data python benchmarks/scripts/gguf_grid_check.py [--samples 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ingot.calibrate import HessianHooks, calibration_batches, calibration_rows
from ingot.formats.gguf_import import DEFAULT_MODEL, pull
from ingot.models.loader import load_model
from ingot.quant import ref
from ingot.quant.gptq import GptqConfig
from ingot.quant.schemes import Scheme


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    src = pull(DEFAULT_MODEL, Path(os.environ.get("INGOT_CACHE_DIR", Path.home() / ".cache" / "ingot")))
    cfg = GptqConfig(calib_path=Path(os.environ["INGOT_DATA_DIR"]) / "gsm8k" / "train.jsonl", samples=args.samples)
    texts, _ = calibration_rows(cfg)
    ids = calibration_batches(AutoTokenizer.from_pretrained(str(src)), texts, cfg.seq_len)
    model = load_model(src, dtype=torch.float32)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(n.removesuffix(".weight") for n in tensors if n.endswith("_proj.weight"))
    modules = dict(model.named_modules())
    hooks = HessianHooks({n: modules[n] for n in names})
    with torch.inference_mode():
        for row in ids:
            model.score(row[None])
    hooks.remove()
    g = torch.Generator().manual_seed(0)
    rows, distinct = [], []
    for name in names:
        w = tensors[f"{name}.weight"].float()
        n, k = w.shape
        blocks = w.view(n, k // 32, 32)
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        step = (hi - lo) / 15  # Q4_1: 16 levels from the block's min to its max
        levels = torch.round((blocks - lo) / torch.where(step > 0, step, torch.ones_like(step)))
        on_grid = float(((lo + levels * step - blocks).abs() <= 0.01 * step + 1e-8).float().mean())
        distinct.append(max(len(torch.unique(b)) for b in blocks[:4].reshape(-1, 32)))
        dithered = (blocks + (torch.rand(blocks.shape, generator=g) - 0.5) * step).view(n, k)
        h = hooks.hessian(name).float()
        row = {"name": name, "on_q4_grid": round(on_grid, 4)}
        for scheme in ("int8-channel", "int4-group"):
            sc = Scheme.from_name(scheme)
            for tag, x in (("gguf", w), ("dithered", dithered)):
                e = x - ref.dequantize_weight(ref.quantize_weight(x, sc))
                row[f"{scheme}_{tag}_werr"] = float(e.norm() / x.norm())
                row[f"{scheme}_{tag}_oerr"] = float((((e @ h) * e).sum() / ((x @ h) * x).sum()).sqrt())
        rows.append(row)

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    summary = {"linears": len(rows), "max_distinct_values_per_32_block": max(distinct),
               "fraction_on_q4_grid": mean("on_q4_grid")}
    for key in rows[0]:
        if key.endswith(("werr", "oerr")):
            summary[key] = round(mean(key), 6)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
