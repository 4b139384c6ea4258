"""Sweep SmoothQuant smoothing on the embedded model: one calibration, many (scheme, alpha, pairs) conversions,
each evaluated (WikiText-2 ppl + KL vs the BF16 source) on the same seeded windows; the BF16 reference's logits are
computed once and reused. Writes one JSON with every variant's metrics.

    INGOT_DATA_DIR=../shared/data python benchmarks/scripts/smooth_sweep.py --limit 8 \\
        --variant int8-channel:none --variant int8-channel:0.5 --variant int8-channel:0.5:norm,up-down \\
        --variant int8-channel:ignore-down --out benchmarks/results/smooth-sweep.json

--fp8-emulate runs fp8-block as FP8 (the reference math) on CPU rather than as its int8-block fallback.
A variant is SCHEME:ALPHA[:PAIRS] (ALPHA "none": no smoothing; "ignore-down": down_proj kept in BF16 by
--ignore 'mlp\\.down_proj$').
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ingot.calibrate import measure
from ingot.eval import evaluate
from ingot.eval.data import DataDir
from ingot.eval.runner import EvalOptions, IngotModel
from ingot.formats.gguf_import import DEFAULT_MODEL, pull
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.schemes import Scheme
from ingot.quant.smooth import PAIR_KINDS, SmoothConfig


class CachedRef:
    """The reference model with its logits kept per input batch (the same windows for every variant)."""

    def __init__(self, model: IngotModel):
        self.model, self.cache = model, {}
        self.name, self.tokenizer, self.max_len = model.name, model.tokenizer, model.max_len

    def load(self):
        self.model.load()

    def score(self, input_ids):
        key = (tuple(input_ids.shape), hash(input_ids.numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = self.model.score(input_ids)
        return self.cache[key]

    def release(self):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/ingot-smooth-sweep")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp8-fallback", default="int8-block")
    ap.add_argument("--fp8-emulate", action="store_true",
                    help="run fp8-block linears as FP8 on CPU through Fp8BlockMethod's reference (quant/ref.py: e4m3 "
                         "weights and activations, exact products, fp32 per-block sums) instead of the int8 fallback")
    args = ap.parse_args()
    if args.fp8_emulate:  # measurement only: the library falls back on CPUs, which have no FP8 matmul to be fast
        import ingot.layers.linear as linear

        linear.fp8_unsupported_reason = lambda device: None
    torch.manual_seed(0)
    data_root = Path(os.environ["INGOT_DATA_DIR"])
    src = pull(DEFAULT_MODEL, Path(os.environ.get("INGOT_CACHE_DIR", Path.home() / ".cache" / "ingot")))
    work = Path(args.workdir)
    cfg = SmoothConfig(calib_path=data_root / "gsm8k" / "train.jsonl", samples=args.calib_samples)
    maxima = None
    options = EvalOptions(tasks=("ppl", "kl"), limit=args.limit, seed=args.seed, fp8_fallback=args.fp8_fallback)
    ref = CachedRef(IngotModel(src, "cpu"))
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"command": " ".join([sys.executable, *sys.argv]), "git_sha": sha, "device": "cpu",
               "source": str(src), "fp8": "emulated (Fp8BlockMethod reference)" if args.fp8_emulate
               else f"fallback {args.fp8_fallback}", "limit": args.limit, "seed": args.seed, "eval_dtype": "bfloat16 (checkpoint's)",
               "calibration": None, "variants": []}
    for v in args.variant:
        scheme, alpha, *rest = v.split(":")
        pairs = tuple(rest[0].split(",")) if rest else PAIR_KINDS
        ignore, smooth, calibrate = (), None, None
        if alpha == "ignore-down":
            ignore = (r"mlp\.down_proj$",)
        elif alpha != "none":
            if maxima is None:
                maxima = measure(src, cfg, "cpu", log=print)
                results["calibration"] = maxima.record["calibration"]
            smoothing = maxima.smoothing(float(alpha)).only(lambda p: p.kind in pairs)
            smooth = SmoothConfig(float(alpha), cfg.calib_path, cfg.samples, cfg.seq_len, cfg.seed, pairs)
            calibrate = lambda *a, s=smoothing: s  # noqa: E731
        dst = work / v.replace(":", "_").replace(",", "+")
        t0 = time.perf_counter()
        convert(src, dst, ConvertOptions(Scheme.from_name(scheme), ignore=ignore, smooth=smooth, overwrite=True),
                progress=False, calibrate=calibrate)
        r = evaluate(dst, options, DataDir(data_root), ref=src, ref_model=ref)
        kl, ppl = r["metrics"]["kl"], r["metrics"]["ppl"]
        row = {"variant": v, "scheme": scheme, "alpha": alpha, "pairs": list(pairs), "ignore": list(ignore),
               "ppl": ppl["ppl"], "ref_ppl": kl["ref_ppl"], "dppl_pct": kl["dppl_pct"], "kl_mean": kl["kl_mean"],
               "kl_stderr": kl["kl_stderr"], "kl_p99": kl["kl_p99"], "top1": kl["top1"], "tokens": kl["tokens"],
               "windows": kl["windows"], "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        results["variants"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
