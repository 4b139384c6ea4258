"""The bf16 lm_head GEMV (Llama-3's 128256 x 4096) as cuBLAS runs it in different call forms - F.linear, W @ h.T,
torch.mv, F.linear + .float() - at M = 1, 2, 4: 50 calls in one CUDA graph, microseconds per call and GB/s of weight.

What it showed (session 20): F.linear at M = 1 already streams at ~2.83 TB/s in a graph; no call form is faster.

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/lm_head_orientations.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

N, K = 128256, 4096
CALLS = 50


def graph_us(fn) -> float:
    """Median of 5 replays of a graph of CALLS calls, us per call."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--git-sha")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    res = {}
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
            us = graph_us(fn)
            res[f"m{m} {name}"] = {"us": round(us, 2), "GBps": round(N * K * 2 / us / 1e3, 1),
                                   "max_abs_diff_vs_F.linear": diff}
            print(m, name, res[f"m{m} {name}"], flush=True)
    result = {"bench": "lm_head_orientations", "command": "python3 " + " ".join(sys.argv), "git_sha": args.git_sha,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "N": N, "K": K,
              "results": res}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
