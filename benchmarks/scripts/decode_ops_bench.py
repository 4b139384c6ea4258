"""Small decode-time ops on the GPU, variant against variant, timed as CUDA-graph replays (as the engine runs them):

- silu*up + per-token int8 quantization (down_proj's input): each row spread over 1024-column programs (two launches,
  ``silu_mul.SPLIT_ROWS_MAX``) against one program per row, M = 1 ... 256, I = 14336 (Llama-3-8B), 18432 (DeepSeek-V3);
- a Llama layer's rotary of q and k and its KV-cache write: ``rope_store_kv`` (one launch) against ``rotary`` x 2 +
  ``store_kv_cache`` (three launches: keys, then values inside one call), T = 1 and 64;
- paged decode attention at short and long context: KV splits 1 ... 16 (Llama-3-8B heads, B = 1, 8, 16, 64).

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/decode_ops_bench.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import json
import time

import torch

from ingot.bench.common import gpu_script_args, graph_replay_us
from ingot.kernels import silu_mul as silu_module
from ingot.kernels.attention import paged_decode_attention
from ingot.kernels.kv_store import rope_store_kv, store_kv_cache
from ingot.kernels.norm_rope import rotary

DEV = torch.device("cuda")
REP_MS = 50


def bench(fn) -> float:
    return graph_replay_us(fn, REP_MS)


def silu_rows() -> list[dict]:
    rows = []
    for n in (14336, 18432):
        for m in (1, 16, 64, 128, 256):
            gate_up = torch.randn(m, 2 * n, device=DEV, dtype=torch.bfloat16)
            gate, up = gate_up.chunk(2, dim=-1)
            row = {"op": "silu_mul_quant_int8_per_token", "m": m, "i": n}
            saved = silu_module.SPLIT_ROWS_MAX
            try:
                silu_module.SPLIT_ROWS_MAX = 1 << 30
                row["split_rows_us"] = bench(lambda: silu_module.silu_mul_quant(gate, up))
                silu_module.SPLIT_ROWS_MAX = 0
                row["one_program_per_row_us"] = bench(lambda: silu_module.silu_mul_quant(gate, up))
            finally:
                silu_module.SPLIT_ROWS_MAX = saved
            row["silu_mul_only_us"] = bench(lambda: silu_module.silu_mul(gate, up))
            rows.append(row)
            print(row, flush=True)
    return rows


def rope_rows() -> list[dict]:
    rows = []
    h, hkv, d, page = 32, 8, 128, 16
    blocks = 512
    kc = torch.zeros(blocks, page, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    for t in (1, 64):
        qkv = torch.randn(t, (h + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
        ang = torch.randn(t, d // 2, device=DEV)
        cos, sin = ang.cos(), ang.sin()
        slots = torch.arange(t, device=DEV) * 7

        def unfused():
            qr, kr = rotary(q, cos, sin), rotary(k, cos, sin)
            store_kv_cache(kr, v, kc, vc, slots)
            return qr

        row = {"op": "rope_and_kv_store", "t": t, "heads": h, "kv_heads": hkv, "head_dim": d,
               "fused_us": bench(lambda: rope_store_kv(q, k, v, cos, sin, kc, vc, slots)),
               "unfused_us": bench(unfused)}
        rows.append(row)
        print(row, flush=True)
    return rows


def attention_rows() -> list[dict]:
    rows = []
    h, hkv, d, page = 32, 8, 128, 16
    for b in (1, 8, 16, 64):
        for ctx in (192, 1024, 4096):
            width = (ctx + page - 1) // page
            kc = torch.randn(b * width + 1, page, hkv, d, device=DEV, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tables = torch.arange(b * width, device=DEV, dtype=torch.int32).view(b, width)
            lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
            q = torch.randn(b, h, d, device=DEV, dtype=torch.bfloat16)
            row = {"op": "paged_decode_attention", "b": b, "context": ctx, "us_by_splits": {}}
            for splits in (1, 2, 3, 4, 5, 6, 8, 16):
                if splits * 16 > ctx:
                    continue
                row["us_by_splits"][splits] = bench(
                    lambda: paged_decode_attention(q, kc, vc, tables, lens, d ** -0.5, d, num_splits=splits))
            row["default_us"] = bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, d ** -0.5, d))
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> int:
    args = gpu_script_args()
    t0 = time.time()
    result = {
        "bench": "decode_ops", "command": "PYTHONPATH=src python3 benchmarks/scripts/decode_ops_bench.py",
        "git_sha": args.git_sha, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "timer": f"triton.testing.do_bench_cudagraph(rep={REP_MS} ms), median us per call",
        "silu_mul_quant": silu_rows(), "rope_store_kv": rope_rows(), "attention": attention_rows(),
    }
    result["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
