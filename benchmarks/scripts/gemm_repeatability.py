"""Repeatability of ingot's split-K GEMM kernels on the GPU: the same inputs launched many times, counting launches
whose output differs bitwise from the first and launches with a non-finite element (kernels/NOTES.md: a W8A16
split-K race on the H100 wrote a garbage tile in 2 of 1200 launches before the fix).

    PYTHONPATH=src python3 benchmarks/scripts/gemm_repeatability.py --ops weight-only w8a8 --out OUT.json

weight-only: W8A16 and W4A16 at SmolLM2's down_proj prefill shape with split-K forced to 2 (where the race was) and
with the default config, at decode sizes with their default split-K, and at M = 1 (the GEMV kernels); also the
relative error against the fp32 reference. w8a8: int8-channel, int8-block and FP8 block GEMMs at decode sizes with
their tuned configs, and each case's kernel time (a CUDA graph of 50 launches replayed 10 times; the operands of
the smaller shapes stay in L2, so the times compare kernel versions, not HBM rates). Results:
benchmarks/results/gemm-repeatability-*.json, weight-only-repeatability-*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from ingot.formats.base import pack_int32
from ingot.kernels.fp8_gemm import fp8_gemm_block
from ingot.kernels.int8_gemm import int8_gemm_block, int8_gemm_channel
from ingot.kernels.tuning import GemmConfig
from ingot.kernels.weight_only import default_config, effective_split_k, w4a16_gemm, w8a16_gemm

PREFILL = GemmConfig(128, 128, 64, group_m=8, num_warps=4, num_stages=4)  # W8A16 prefill default tiles (W4A16: 8 warps)
WEIGHT_ONLY_CASES = [  # (M, N, K), config (None: the default), launches
    ((4096, 576, 1536), replace(PREFILL, split_k=2), 3000), ((4096, 576, 1536), None, 1500),
    ((512, 576, 1536), None, 1500), ((16, 576, 1536), None, 3000), ((64, 576, 1536), None, 3000),
    ((33, 4096, 14336), None, 500),
    ((1, 576, 1536), None, 3000), ((1, 6144, 4096), None, 2000), ((1, 4096, 14336), None, 2000),  # GEMV kernels
]
W8A8_SHAPES = [(1, 6144, 4096), (1, 4096, 14336), (16, 28672, 4096), (64, 4096, 4096), (33, 2048, 7168),
               (16, 4096, 14336)]


def repeat(f, launches: int) -> dict:
    """Launch ``f`` ``launches`` times after a first call; count outputs unlike the first, and non-finite ones."""
    first = f()
    differing = nonfinite = 0
    for _ in range(launches):
        y = f()
        differing += int(not torch.equal(y, first))
        nonfinite += int(not torch.isfinite(y).all())
    return {"launches": launches, "runs_differing": differing, "runs_nonfinite": nonfinite, "first": first}


def graph_us(f, per_graph: int = 50, replays: int = 10) -> float:
    """Microseconds per launch of ``f``, from a CUDA graph of ``per_graph`` launches replayed ``replays`` times."""
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                f()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / (per_graph * replays) * 1000, 2)


def weight_only(results: dict) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for op in ("w8a16", "w4a16"):
        for (m, n, k), config, launches in WEIGHT_ONLY_CASES:
            x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
            if op == "w8a16":
                q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
                ws = torch.rand(n, 1, device="cuda") / 100
                w = q.float() * ws
                r = repeat(lambda: w8a16_gemm(x, q, ws, config=config), launches)
            else:
                q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
                ws = torch.rand(n, k // 128, device="cuda") / 10
                wp = pack_int32(q.to(torch.int32), 4)
                w = q.float() * ws.repeat_interleave(128, 1)
                r = repeat(lambda: w4a16_gemm(x, wp, ws, k, 128, config=config), launches)
            ref = x.float() @ w.T
            r["rel_err"] = ((r.pop("first").float() - ref).norm() / ref.norm()).item()
            r["split"] = effective_split_k(k, config or default_config(f"{op}_gemm", m, n, k, sms))
            key = f"{op} {m}x{n}x{k} {'forced split 2' if config else 'default'}"
            results[key] = r
            print(key, r, flush=True)


def w8a8(results: dict) -> None:
    for m, n, k in W8A8_SHAPES:
        xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        xs, ws = torch.rand(m, 1, device="cuda") / 100, torch.rand(n, 1, device="cuda") / 100
        xsb, wsb = torch.rand(m, k // 128, device="cuda") / 100, torch.rand(n // 128, k // 128, device="cuda") / 100
        xf = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        wf = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        cases = {"int8_channel": (lambda: int8_gemm_channel(xq, xs, wq, ws), 2000),
                 "int8_block": (lambda: int8_gemm_block(xq, xsb, wq, wsb), 1000),
                 "fp8_block": (lambda: fp8_gemm_block(xf, xsb, wf, wsb), 1000)}
        for name, (f, launches) in cases.items():
            r = repeat(f, launches)
            del r["first"]
            r["us"] = graph_us(f)
            results[f"{name} {m}x{n}x{k}"] = r
            print(name, m, n, k, r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", choices=["weight-only", "w8a8"], default=["weight-only", "w8a8"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--git-sha", default=None, help="the commit measured (the device copy has no .git)")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {}
    for op in args.ops:
        {"weight-only": weight_only, "w8a8": w8a8}[op](results)
    json.dump({"command": " ".join(sys.argv), "git_sha": args.git_sha, "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "results": results},
              open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
