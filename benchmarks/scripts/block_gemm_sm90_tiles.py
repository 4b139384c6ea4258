"""The sm_90 Gluon int8-block GEMM (ingot.kernels.block_gemm_sm90) at several tiles, against the Triton block kernel
and BF16 cuBLAS, with 3 rotating input sets (weights not L2-resident). Usage (H100, repo root, PYTHONPATH=src):
    python benchmarks/scripts/block_gemm_sm90_tiles.py 1024 4096   # M values; JSON to $OUT/sm90c.json
"""
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks/scripts")
from gemm_repeatability import graph_us  # noqa: E402

from ingot.kernels import block_gemm_sm90, int8_gemm  # noqa: E402
from ingot.kernels.tuning import GemmConfig  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (24576, 1536),
          (7168, 16384), (18432, 7168)]
VARIANTS = {"128x128s3": GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3),
            "64x128s3": GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=3),
            "64x128s4": GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4),
            "64x128s6": GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=6)}
out = {"device": torch.cuda.get_device_name(), "note": "3 rotating input sets per shape", "rows": []}
t0 = time.time()
for m in [int(a) for a in sys.argv[1:]]:
    for n, k in SHAPES:
        sets = []
        for _ in range(3):
            sets.append(dict(x=torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8),
                             w=torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                             xs=torch.rand(m, k // 128, device="cuda") / 100,
                             ws=torch.rand(n // 128, k // 128, device="cuda") / 100,
                             xb=torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                             wb=torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
                             y=torch.empty(m, n, device="cuda", dtype=torch.bfloat16)))
        def rot(fn):
            it = itertools.cycle(sets)
            return lambda: fn(next(it))
        f = rot(lambda s: torch.matmul(s["xb"], s["wb"].t())); f(); torch.cuda.synchronize()
        bf16 = graph_us(f)
        f = rot(lambda s: int8_gemm.int8_gemm_block(s["x"], s["xs"], s["w"], s["ws"], backend="triton")); f()
        torch.cuda.synchronize()
        row = {"m": m, "n": n, "k": k, "bf16_us": bf16, "triton_us": graph_us(f), "sm90": {}}
        ref = int8_gemm.int8_gemm_block(sets[0]["x"], sets[0]["xs"], sets[0]["w"], sets[0]["ws"], backend="triton")
        for name, cfg in VARIANTS.items():
            f = rot(lambda s: block_gemm_sm90.int8_block_gemm_sm90(s["x"], s["xs"], s["w"], s["ws"], None, torch.bfloat16,
                                                                      s["y"], cfg))
            try:
                y = block_gemm_sm90.int8_block_gemm_sm90(sets[0]["x"], sets[0]["xs"], sets[0]["w"], sets[0]["ws"], None,
                                                         torch.bfloat16, None, cfg)
                torch.cuda.synchronize()
                row["sm90"][name] = {"us": graph_us(f), "same_bits": bool(torch.equal(y, ref))}
            except Exception as e:  # noqa
                row["sm90"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(m, n, k, "bf16", bf16, "triton", round(bf16 / row["triton_us"], 2), "sm90",
              {kk: (v.get("us"), v.get("same_bits"), round(bf16 / v["us"], 2) if "us" in v else v["error"][:80])
               for kk, v in row["sm90"].items()}, flush=True)
        out["rows"].append(row)
out["seconds"] = round(time.time() - t0)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "sm90c.json"), "w"), indent=1)
