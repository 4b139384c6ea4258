"""Probe: does torch._scaled_mm take DeepSeek's 1x128 x 128x128 block scales on this GPU, in which scale layouts,
how fast against cuBLAS BF16 and ingot's Triton kernel, and how close to it (fp8-block-cublas-probe-*.json).

    PYTHONPATH=src python3 benchmarks/scripts/fp8_block_cublas_probe.py OUT.json
"""

import json
import sys

import torch
import triton.testing

from ingot.kernels.fp8_gemm import fp8_gemm_block
from ingot.quant import ref

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (24576, 1536),
          (7168, 16384), (18432, 7168)]


def bench(f, sets) -> float:
    """Median us of f over rotated input sets (CUDA-graph replays)."""
    state = [0]

    def call():
        f(*sets[state[0] % len(sets)])
        state[0] += 1
    return triton.testing.do_bench_cudagraph(call, rep=3, return_mode="median") * 1e3


def layouts(xs, ws):
    """Candidate (scale_a [M, K/128], scale_b [K/128, N/128]) layouts."""
    return {"a_colmajor,b=ws.t()": (xs.t().contiguous().t(), ws.t()),
            "a_colmajor,b=ws.t().contig": (xs.t().contiguous().t(), ws.t().contiguous()),
            "a_rowmajor,b=ws.t()": (xs, ws.t()),
            "a_rowmajor,b=ws.t().contig": (xs, ws.t().contiguous())}


def main() -> None:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "rows": []}
    for m in (16, 128, 1024, 4096):
        for n, k in SHAPES:
            row = {"m": m, "n": n, "k": k}
            nsets = max(2, min(16, -(-2 * 50 * 2**20 // (n * k))))  # >= 2x a 50 MB L2 of fp8 weights
            sets = []
            for _ in range(nsets):
                xq, xs = ref.quantize_act_group(torch.randn(m, k, device="cuda"), "fp8_e4m3", 128, "float")
                wq = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
                sets.append((xq, xs.contiguous(), wq, torch.rand(n // 128, k // 128, device="cuda") / 100))
            xq, xs, wq, ws = sets[0]
            ours = fp8_gemm_block(xq, xs, wq, ws, out_dtype=torch.float32, backend="triton")
            row["ours_us"] = round(bench(lambda a, b, c, d: fp8_gemm_block(a, b, c, d, backend="triton"), sets), 2)
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16),) for _ in range(nsets)]
            row["bf16_us"] = round(bench(lambda w: xb @ w.t(), wb), 2)
            for name, (sa, sb) in layouts(xs, ws).items():
                for fast in (False, True):
                    try:
                        y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                             use_fast_accum=fast)
                        torch.cuda.synchronize()

                        def f(a, b, c, d, fast=fast, name=name):
                            sa2, sb2 = layouts(b, d)[name]
                            return torch._scaled_mm(a, c.t(), scale_a=sa2, scale_b=sb2, out_dtype=torch.bfloat16,
                                                    use_fast_accum=fast)
                        row[f"{name},fast={fast}"] = {"rel_err_vs_ours": ((y.float() - ours).norm() / ours.norm()).item(),
                                                      "us": round(bench(f, sets), 2)}
                    except Exception as e:
                        row[f"{name},fast={fast}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
    json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
