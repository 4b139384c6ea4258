"""The bf16 lm_head GEMV (Llama-3's 128256 x 4096) as cuBLAS runs it in different call forms - F.linear, W @ h.T,
torch.mv, F.linear + .float() - at M = 1, 2, 4, timed as CUDA-graph replays: microseconds per call and GB/s of weight.

What it showed (session 20): F.linear at M = 1 already streams at the copy bandwidth's level; no call form is faster.

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/lm_head_orientations.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from ingot.bench.common import gpu_script_args, run_stamp, write_results

N, K = 128256, 4096
REP_MS = 100


def main() -> int:
    args = gpu_script_args()
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = {}
    for m in (1, 2, 4):
        h = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(h, w).float()
        forms = {"F.linear": (lambda: F.linear(h, w), False), "W @ h.T": (lambda: w @ h.t(), True),
                 "F.linear+float": (lambda: F.linear(h, w).float(), False)}
        if m == 1:
            forms["torch.mv"] = (lambda: torch.mv(w, h[0]), False)
        for name, (fn, transposed) in forms.items():
            out = fn().float()
            diff = ((out.t() if transposed else out).reshape(-1) - ref.reshape(-1)).abs().max().item()
            us = do_bench_cudagraph(fn, rep=REP_MS) * 1000
            rows[f"m{m} {name}"] = {"us": round(us, 2), "GBps": round(N * K * 2 / us / 1e3, 1),
                                    "max_abs_diff_vs_F.linear": diff}
            print(m, name, rows[f"m{m} {name}"], flush=True)
    write_results(args.out, {
        **run_stamp("lm_head_orientations", "python3 " + " ".join(sys.argv), ["cuda"], args.git_sha),
        "timer": f"triton.testing.do_bench_cudagraph(rep={REP_MS} ms), median us per call", "n": N, "k": K,
        "results": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
