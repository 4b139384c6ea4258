"""RMSNorm after the residual add, plain (``fused_add_rms_norm``) and with per-token int8 output
(``rms_norm_quant``), on rows of 4096 channels, by the launch's num_warps (``norm_rope._num_warps`` patched): 64
calls back to back in one CUDA graph (a decode step runs 65 norms), microseconds per call.

What it decided: ``norm_rope._num_warps`` (16 warps for rows over 2048 channels; kernels/NOTES.md, session 20).

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/norm_warps_bench.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import sys
from unittest import mock

import torch
from triton.testing import do_bench_cudagraph

from ingot.bench.common import gpu_script_args, run_stamp, write_results
from ingot.kernels import norm_rope

N = 4096
CALLS = 64
REP_MS = 100


def bench(m: int, quant: bool, warps: int) -> float:
    """Median microseconds of one call (of CALLS in a graph), at ``warps`` warps."""
    xs = [torch.randn(m, N, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
    rs = [torch.randn(m, N, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def chain():
        for x, r in zip(xs, rs):
            if quant:
                norm_rope.rms_norm_quant(x, w, 1e-5, residual=r)
            else:
                norm_rope.fused_add_rms_norm(x, r, w, 1e-5)

    with mock.patch.object(norm_rope, "_num_warps", lambda n: warps):
        chain()
        torch.cuda.synchronize()
        return round(do_bench_cudagraph(chain, rep=REP_MS) * 1000 / CALLS, 3)


def main() -> int:
    args = gpu_script_args()
    us = {}
    for m in (1, 64):
        for quant in (False, True):
            for warps in (2, 4, 8, 16):
                key = f"m{m} {'int8 per token' if quant else 'plain'} warps {warps}"
                us[key] = bench(m, quant, warps)
                print(key, us[key], flush=True)
    write_results(args.out, {
        **run_stamp("norm_warps", "python3 " + " ".join(sys.argv), ["cuda"], args.git_sha),
        "timer": f"triton.testing.do_bench_cudagraph(rep={REP_MS} ms) of {CALLS} calls, median, per call",
        "n": N, "us_per_call": us,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
