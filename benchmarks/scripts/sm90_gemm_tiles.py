"""The sm_90 Gluon int8 GEMMs (ingot.kernels.gemm_sm90) at several tiles, against the Triton kernel of the same op and
BF16 cuBLAS, with 3 rotating input sets (weights not L2-resident) and 0.5 s idle before each timing (the H100 caps its
clocks under load; kernels/NOTES.md, session 10). Usage (H100, repo root, PYTHONPATH=src):
    python benchmarks/scripts/sm90_gemm_tiles.py block 1024 4096     # op, M values; JSON to $OUT/sm90-block.json
    python benchmarks/scripts/sm90_gemm_tiles.py channel 512 1024    # the channel tiles, and the one channel_config picks
"""
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks/scripts")
from gemm_repeatability import graph_us  # noqa: E402

from ingot.kernels import gemm_sm90, int8_gemm  # noqa: E402
from ingot.kernels.tuning import GemmConfig, num_sms  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (24576, 1536),
          (7168, 16384), (18432, 7168)]
VARIANTS = {
    "block": {"128x128s5": GemmConfig(128, 128, 128, group_m=8, num_warps=4, num_stages=5),
              "128x128s4": GemmConfig(128, 128, 128, group_m=8, num_warps=4, num_stages=4),
              "128x128s6": GemmConfig(128, 128, 128, group_m=8, num_warps=4, num_stages=6),
              "128x128s5g16": GemmConfig(128, 128, 128, group_m=16, num_warps=4, num_stages=5)},
    "channel": {"128x256s4": GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=4),
                "128x256s3": GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3),
                "128x128s4": GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4),
                "64x128s6": GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=6)},
}


def timed(f) -> float:
    f()
    torch.cuda.synchronize()
    time.sleep(0.5)
    return round(graph_us(f), 2)


def main(op: str, ms: list[int]) -> None:
    channel = op == "channel"
    sm90 = gemm_sm90.int8_channel_gemm_sm90 if channel else gemm_sm90.int8_block_gemm_sm90
    triton_gemm = int8_gemm.int8_gemm_channel if channel else int8_gemm.int8_gemm_block
    out = {"device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv), "op": op,
           "note": "3 rotating input sets per shape; graph_us; 0.5 s idle before each timing", "rows": []}
    t0 = time.time()
    for m in ms:
        for n, k in SHAPES:
            sets = []
            for _ in range(3):
                sets.append(dict(x=torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8),
                                 w=torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                                 xs=torch.rand(m, 1 if channel else k // 128, device="cuda") / 100,
                                 ws=torch.rand(n, 1, device="cuda") / 100 if channel
                                 else torch.rand(n // 128, k // 128, device="cuda") / 100,
                                 xb=torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                 wb=torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
                                 y=torch.empty(m, n, device="cuda", dtype=torch.bfloat16)))

            def rot(fn):
                it = itertools.cycle(sets)
                return lambda: fn(next(it))

            bf16 = timed(rot(lambda s: torch.matmul(s["xb"], s["wb"].t())))
            triton_us = timed(rot(lambda s: triton_gemm(s["x"], s["xs"], s["w"], s["ws"], out=s["y"], backend="triton")))
            row = {"m": m, "n": n, "k": k, "bf16_us": bf16, "triton_us": triton_us,
                   "triton_x_bf16": round(bf16 / triton_us, 3), "sm90": {}}
            if channel:
                picked = gemm_sm90.channel_config(m, n, num_sms(torch.device("cuda", 0)))
                row["channel_config"] = f"{picked.block_m}x{picked.block_n}s{picked.num_stages}"
            ref = triton_gemm(sets[0]["x"], sets[0]["xs"], sets[0]["w"], sets[0]["ws"], backend="triton")
            for name, cfg in VARIANTS[op].items():
                try:
                    y = sm90(sets[0]["x"], sets[0]["xs"], sets[0]["w"], sets[0]["ws"], None, torch.bfloat16, None, cfg)
                    us = timed(rot(lambda s, cfg=cfg: sm90(s["x"], s["xs"], s["w"], s["ws"], None, torch.bfloat16,
                                                           s["y"], cfg)))
                    row["sm90"][name] = {"us": us, "x_bf16": round(bf16 / us, 3), "same_bits": bool(torch.equal(y, ref))}
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result too
                    row["sm90"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(m, n, k, "bf16", bf16, "triton", row["triton_x_bf16"], row.get("channel_config", ""),
                  {kk: (v.get("us"), v.get("x_bf16"), v.get("same_bits")) for kk, v in row["sm90"].items()},
                  flush=True)
            out["rows"].append(row)
    out["seconds"] = round(time.time() - t0)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"sm90-{op}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]])
