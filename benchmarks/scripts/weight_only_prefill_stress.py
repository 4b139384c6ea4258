"""The weight-only GEMMs at prefill sizes with a bias and a bf16 output, into NaN-poisoned outputs on fresh launches:
counts launches with a non-finite element (an unwritten or garbage tile) per config, and times each config (CUDA graph
of 20 launches replayed 10 times, gemm_repeatability.graph_us). Written after the 8-warp W8A16 tiles wrote garbage
on the H100 in session 8 (kernels/NOTES.md, weight_only.PREFILL_WARPS).

    PYTHONPATH=src python3 benchmarks/scripts/weight_only_prefill_stress.py --out OUT.json [--launches 200]
        [--git-sha SHA]
"""

from __future__ import annotations

import argparse
import json

import torch

from ingot.formats.base import pack_int32
from ingot.kernels.tuning import GemmConfig
from ingot.kernels.weight_only import w4a16_gemm, w8a16_gemm

from gemm_repeatability import graph_us  # this script's folder is on sys.path when run as a file

EIGHT_WARPS = GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)  # the old default (W4A16: still)
FOUR_WARPS = GemmConfig(128, 128, 64, group_m=8, num_warps=4, num_stages=4)  # W8A16 default since session 8
SHAPES = [(256, 28672, 4096), (1024, 28672, 4096), (4096, 28672, 4096), (1024, 4096, 4096), (1024, 4096, 14336),
          (4096, 576, 1536)]


def operands(op: str, m: int, n: int, k: int):
    x = torch.randn(m, k, device="cuda")
    x[:, :: k // 7] *= 10
    x = x.to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    if op == "w8a16":
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = torch.rand(n, 1, device="cuda") / 100
        return lambda out, cfg: w8a16_gemm(x, w, s, bias, out=out, config=cfg)
    w = pack_int32(torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda"), 4)
    s = (torch.rand(n, k // 128, device="cuda") / 100).to(torch.bfloat16)
    return lambda out, cfg: w4a16_gemm(x, w, s, k, 128, bias, out=out, config=cfg)


def non_finite_launches(fn, cfg, out: torch.Tensor, launches: int) -> int:
    bad = 0
    for _ in range(launches):
        out.fill_(float("nan"))
        fn(out, cfg)
        torch.cuda.synchronize()
        bad += int(not torch.isfinite(out).all())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--launches", type=int, default=200)
    ap.add_argument("--git-sha", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for op in ("w8a16", "w4a16"):
        for m, n, k in SHAPES:
            fn = operands(op, m, n, k)
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            for name, cfg in (("8 warps", EIGHT_WARPS), ("4 warps", FOUR_WARPS)):
                row = {"op": op, "m": m, "n": n, "k": k, "tiles": name, "config": str(cfg), "launches": args.launches,
                       "non_finite_launches": non_finite_launches(fn, cfg, out, args.launches),
                       "us": graph_us(lambda: fn(out, cfg), per_graph=20)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "git_sha": args.git_sha,
                   "command": "PYTHONPATH=src python3 benchmarks/scripts/weight_only_prefill_stress.py "
                              f"--launches {args.launches}", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
