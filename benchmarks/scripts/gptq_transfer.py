"""Does GPTQ's gain, made on GSM8K-train calibration Hessians, carry over to other text?

For some decoder layers of the embedded model, Hessians H = 2 X^T X / n are collected in one pass of the original
model (float32, CPU) on: 128 GSM8K-train rows (seed 0, the --gptq default), 512 rows, 128 *other* rows (seed 99, held
out) and 24 WikiText-2 test windows of 512 tokens (the text `ingot eval --tasks ppl,kl` scores). Each linear is
GPTQ-quantized from each calibration set at several damps, and its relative output error
sqrt(tr(E H E^T) / tr(W H W^T)) is measured on the held-out GSM8K and the WikiText Hessians, as a ratio to
round-to-nearest's on the same grid (1.0 = no gain).

    INGOT_DATA_DIR=../shared/data python benchmarks/scripts/gptq_transfer.py int8-weight --layers 0,4,8,12,16,20,24,29 \\
        --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ingot.calibrate import HessianHooks, calibration_batches, calibration_rows
from ingot.formats.gguf_import import DEFAULT_MODEL, pull
from ingot.models.loader import load_model
from ingot.quant import ref
from ingot.quant.gptq import GptqConfig, gptq_quantize
from ingot.quant.schemes import Scheme

DAMPS = (0.01, 0.1, 0.3, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scheme")
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,29")
    ap.add_argument("--out")
    args = ap.parse_args()
    data = Path(os.environ["INGOT_DATA_DIR"])
    src = pull(DEFAULT_MODEL, Path(os.environ.get("INGOT_CACHE_DIR", Path.home() / ".cache" / "ingot")))
    tok = AutoTokenizer.from_pretrained(str(src))
    model = load_model(src, dtype=torch.float32)
    layers = {int(x) for x in args.layers.split(",")}
    mods = {n: m for n, m in model.named_modules()
            if n.endswith("_proj") and n.startswith("model.layers.") and int(n.split(".")[2]) in layers}

    def hessians(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hooks = HessianHooks(mods)
        with torch.inference_mode():
            for row in ids:
                model.score(row[None])
        hooks.remove()
        return {n: hooks.hessian(n).float() for n in mods}

    sets = {}
    for name, samples, seed in (("gsm128", 128, 0), ("gsm512", 512, 0), ("gsm_heldout", 128, 99)):
        texts, _ = calibration_rows(GptqConfig(calib_path=data / "gsm8k" / "train.jsonl", samples=samples, seed=seed))
        sets[name] = hessians(calibration_batches(tok, texts, 512))
    text = (data / "wikitext-2" / "wiki.test.raw").read_text()[:200_000]
    sets["wiki"] = hessians(torch.tensor(tok(text)["input_ids"][: 24 * 512]).view(24, 512))
    scheme = Scheme.from_name(args.scheme)
    torch.set_num_threads(1)
    rows = {}
    for n, m in mods.items():
        w = m.weight.float()

        def err(q: torch.Tensor, h: torch.Tensor) -> float:
            e = w - q
            return float((((e @ h) * e).sum() / ((w @ h) * w).sum()).sqrt())

        rtn = ref.dequantize_weight(ref.quantize_weight(w, scheme))
        row = {"rtn": {k: err(rtn, sets[k][n]) for k in ("gsm_heldout", "wiki")}}
        for cal in ("gsm128", "gsm512"):
            for d in DAMPS:
                q = ref.dequantize_weight(gptq_quantize(w, sets[cal][n], scheme, damp=d).qw)
                row[f"{cal}_d{d}"] = {k: err(q, sets[k][n]) for k in ("gsm_heldout", "wiki")}
        rows[n] = row
    summary = {}
    for key in next(iter(rows.values())):
        for target in ("gsm_heldout", "wiki"):
            summary[f"{key}/{target}"] = round(sum(r[key][target] / r["rtn"][target] for r in rows.values()) / len(rows), 4)
        down = [r[key]["wiki"] / r["rtn"]["wiki"] for n, r in rows.items() if n.endswith("down_proj")]
        summary[f"{key}/wiki down_proj"] = round(sum(down) / len(down), 4)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"scheme": args.scheme, "layers": sorted(layers), "summary": summary,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
