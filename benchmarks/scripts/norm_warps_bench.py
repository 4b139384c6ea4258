"""RMSNorm (+ residual add, optionally + per-token int8 quantization) on rows of 4096 channels, by num_warps: 64
launches back to back in one CUDA graph (the decode step's 65 norms), microseconds per launch.

What it decided: ``norm_rope._num_warps`` (16 warps for rows over 2048 channels; kernels/NOTES.md, session 20).

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/norm_warps_bench.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench_cudagraph

from ingot.kernels import norm_rope

N = 4096
LAUNCHES = 64


def run(m: int, quant: bool, warps: int) -> float:
    dev = torch.device("cuda")
    xs = [torch.randn(m, N, device=dev, dtype=torch.bfloat16) for _ in range(LAUNCHES)]
    rs = [torch.randn(m, N, device=dev, dtype=torch.bfloat16) for _ in range(LAUNCHES)]
    w = torch.randn(N, device=dev, dtype=torch.bfloat16)
    ro, out = (torch.empty(m, N, device=dev, dtype=torch.bfloat16) for _ in range(2))
    x_q = torch.empty(m, N, device=dev, dtype=torch.int8)
    x_s = torch.empty(m, 1, device=dev, dtype=torch.float32)

    def chain():
        for i in range(LAUNCHES):
            norm_rope._rms_norm_kernel[(m,)](
                xs[i], rs[i], w, out, ro, x_q, x_s, N, N, N, N, N, N, 1, 1.0 / N, 1e-5,
                HAS_RESIDUAL=True, QUANT=quant, GROUP=N, QMAX=127.0, IS_FP8=False, UE8M0=False, COMPILED=True,
                BLOCK=N, num_warps=warps)

    chain()
    torch.cuda.synchronize()
    return round(do_bench_cudagraph(chain, rep=100) * 1000 / LAUNCHES, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--git-sha")
    args = ap.parse_args()
    res = {}
    for m in (1, 64):
        for quant in (False, True):
            for warps in (2, 4, 8, 16):
                key = f"m{m} quant {quant} warps {warps}"
                res[key] = run(m, quant, warps)
                print(key, res[key], flush=True)
    result = {"bench": "norm_warps", "command": "python3 " + " ".join(sys.argv), "git_sha": args.git_sha,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "timer": "triton.testing.do_bench_cudagraph(rep=100 ms) over 64 launches, median", "n": N,
              "results_us_per_launch": res}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
