"""Sweep SmoothQuant smoothing and GPTQ on the embedded model: one smoothing calibration, many (scheme, alpha, pairs,
GPTQ) conversions, each evaluated (WikiText-2 ppl + KL vs the BF16 source) on the same seeded windows; the BF16
reference's logits are computed once and reused. Writes one JSON with every variant's metrics, rewritten after each
variant (a killed sweep keeps what it finished).

    INGOT_DATA_DIR=../shared/data python benchmarks/scripts/smooth_sweep.py --limit 8 \\
        --variant int8-channel:none --variant int8-channel:0.5 --variant int8-channel:0.5:norm,up-down \\
        --variant int8-channel:ignore-down --variant int8-channel:none:gptq --variant int4-group:none:gptq=0.1:act-order \\
        --out benchmarks/results/smooth-sweep.json

--fp8-emulate runs fp8-block as FP8 (the reference math) on CPU rather than as its int8-block fallback.
A variant is SCHEME:ALPHA[:PAIRS[:ignore-down]][:GPTQ...] (ALPHA "none": no smoothing; "A/B": alpha B for up-down pairs;
PAIRS "all" or e.g. "norm,up-down"; "ignore-down": down_proj kept in BF16 by --ignore 'mlp\\.down_proj$';
SCHEME:ignore-down alone: that, unsmoothed). GPTQ tokens, anywhere after SCHEME: "gptq" or "gptq=DAMP" (what
`ingot convert --gptq [--gptq-damp DAMP]` does: GptqConfig with the CLI's defaults, the same calibration text as the
smoothing, through ``convert(..., calibrate_gptq=ingot.calibrate.calibrate_gptq)``), and with it "act-order"
(--gptq-act-order), "dynamic" (--gptq-scales dynamic), "one-pass" (--no-gptq-sequential). Without a gptq token the
conversion rounds to nearest, as before. A GPTQ row records the calibration's seconds (load, forward, GPTQ) and the
mean / max ratio of GPTQ's per-linear output loss to RTN's, from the manifest.
--maxima FILE keeps the calibration's maxima (torch.save of tensors, lists and strings; loaded weights_only) so a
second sweep does not calibrate again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ingot.calibrate import Maxima, calibrate_gptq, measure
from ingot.eval import evaluate
from ingot.eval.data import DataDir
from ingot.eval.runner import EvalOptions, IngotModel
from ingot.formats.gguf_import import DEFAULT_MODEL, pull
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.gptq import DEFAULT_DAMP, GptqConfig
from ingot.quant.schemes import Scheme
from ingot.quant.smooth import PAIR_KINDS, Pair, SmoothConfig, Smoothing


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


GPTQ_TOKEN = re.compile(r"gptq(=[0-9.e-]+)?|act-order|dynamic|one-pass")


def gptq_config(variant: str, smooth: SmoothConfig) -> GptqConfig | None:
    """The GptqConfig a variant's GPTQ tokens ask for (None: round to nearest): the CLI's defaults, the same
    calibration text as the smoothing's (``ingot convert`` uses its --calib-* flags for both)."""
    tokens = [t for t in variant.split(":") if GPTQ_TOKEN.fullmatch(t)]
    on = [t for t in tokens if t.startswith("gptq")]
    if not on:
        if tokens:
            raise ValueError(f"variant {variant!r}: {tokens} need a gptq token")
        return None
    damp = float(on[-1].split("=", 1)[1]) if "=" in on[-1] else DEFAULT_DAMP
    return GptqConfig(damp=damp, act_order="act-order" in tokens, scales="dynamic" if "dynamic" in tokens else "static",
                      sequential="one-pass" not in tokens, calib_path=smooth.calib_path, samples=smooth.samples,
                      seq_len=smooth.seq_len, seed=smooth.seed)


def save_maxima(m: Maxima, path: Path) -> None:
    pairs = [[p.kind, list(p.stat), list(p.producers), list(p.consumers), list(p.extra_consumers), p.groups,
              p.head_dim] for p in m.pairs]
    torch.save({"pairs": pairs, "act": m.act, "weight": m.weight, "skipped": m.skipped,
                "record": json.dumps(m.record)}, path)


def load_maxima(path: Path) -> Maxima:
    d = torch.load(path, weights_only=True)
    pairs = [Pair(k, tuple(st), tuple(pr), tuple(co), tuple(ex), g, hd) for k, st, pr, co, ex, g, hd in d["pairs"]]
    return Maxima(pairs, d["act"], d["weight"], d["skipped"], json.loads(d["record"]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/ingot-smooth-sweep")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp8-fallback", default="int8-block")
    ap.add_argument("--maxima", help="calibration maxima cache (written after calibrating, read if present)")
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
    cfg = SmoothConfig(calib_path=data_root / "gsm8k" / "train.jsonl", samples=args.calib_samples, pairs=PAIR_KINDS)
    maxima = None
    options = EvalOptions(tasks=("ppl", "kl"), limit=args.limit, seed=args.seed, fp8_fallback=args.fp8_fallback)
    ref = CachedRef(IngotModel(src, "cpu"))
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"command": " ".join([sys.executable, *sys.argv]), "git_sha": sha, "device": "cpu",
               "source": str(src), "fp8": "emulated (Fp8BlockMethod reference)" if args.fp8_emulate
               else f"fallback {args.fp8_fallback}", "limit": args.limit, "seed": args.seed, "eval_dtype": "bfloat16 (checkpoint's)",
               "calibration": None, "variants": []}
    for v in args.variant:
        scheme, alpha, *rest = [t for t in v.split(":") if not GPTQ_TOKEN.fullmatch(t)]
        gptq = gptq_config(v, cfg)
        pairs = tuple(rest[0].split(",")) if rest and rest[0] != "all" else PAIR_KINDS
        ignore, smooth, calibrate = (), None, None
        if alpha == "ignore-down" or rest[1:] == ["ignore-down"]:
            ignore = (r"mlp\.down_proj$",)
        if alpha not in ("none", "ignore-down"):
            if maxima is None:
                if args.maxima and Path(args.maxima).exists():
                    maxima = load_maxima(Path(args.maxima))
                else:
                    maxima = measure(src, cfg, "cpu", log=print)
                    if args.maxima:
                        save_maxima(maxima, Path(args.maxima))
                results["calibration"] = maxima.record["calibration"]
            a_norm, a_down = (float(a) for a in alpha.split("/")) if "/" in alpha else (float(alpha),) * 2
            one, two = maxima.smoothing(a_norm), maxima.smoothing(a_down)  # ALPHA "A/B": B for up-down pairs
            smoothing = Smoothing([f for f in one.factors if f.pair.kind != "up-down"]
                                  + [f for f in two.factors if f.pair.kind == "up-down"], one.record)
            smoothing = smoothing.only(lambda p: p.kind in pairs)
            smooth = SmoothConfig(a_norm, cfg.calib_path, cfg.samples, cfg.seq_len, cfg.seed, pairs)
            calibrate = lambda *a, s=smoothing: s  # noqa: E731
        dst = work / v.replace(":", "_").replace(",", "+").replace("=", "")
        t0 = time.perf_counter()
        manifest = convert(src, dst, ConvertOptions(Scheme.from_name(scheme), ignore=ignore, smooth=smooth, gptq=gptq,
                                                    overwrite=True),
                           progress=False, calibrate=calibrate,
                           calibrate_gptq=partial(calibrate_gptq, log=print) if gptq else None)
        t1 = time.perf_counter()
        r = evaluate(dst, options, DataDir(data_root), ref=src, ref_model=ref)
        kl, ppl = r["metrics"]["kl"], r["metrics"]["ppl"]
        row = {"variant": v, "scheme": scheme, "alpha": alpha, "pairs": list(pairs), "ignore": list(ignore),
               "gptq": gptq.job() if gptq else None,
               "ppl": ppl["ppl"], "ref_ppl": kl["ref_ppl"], "dppl_pct": kl["dppl_pct"], "kl_mean": kl["kl_mean"],
               "kl_stderr": kl["kl_stderr"], "kl_p99": kl["kl_p99"], "top1": kl["top1"], "tokens": kl["tokens"],
               "windows": kl["windows"], "bytes": manifest["totals"].get("bytes_out"),
               "seconds_convert": round(t1 - t0, 1), "seconds_eval": round(time.perf_counter() - t1, 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        if gptq:
            g = manifest["gptq"]
            row["gptq_calibration"] = {k: g["calibration"][k] for k in
                                       ("tokens", "device", "dtype", "seconds_load", "seconds_forward", "seconds_gptq")}
            row["gptq_calibration"]["seconds"] = round(sum(row["gptq_calibration"][k] for k in
                                                           ("seconds_load", "seconds_forward", "seconds_gptq")), 1)
            row["gptq_loss_ratio_mean"], row["gptq_loss_ratio_max"] = g["loss_ratio_mean"], g["loss_ratio_max"]
            row["gptq_rtn_fallback"], row["gptq_quantized"] = g["rtn_fallback"], g["quantized"]
            row["gptq_damp_used_max"] = max(x["damp"] for x in g["linears"].values())
        print(json.dumps(row), flush=True)
        results["variants"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
