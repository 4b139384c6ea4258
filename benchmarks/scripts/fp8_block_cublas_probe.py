"""Probe: does torch._scaled_mm take DeepSeek's 1x128 x 128x128 block scales on this GPU, how fast, how exact."""
import json, sys, time
import torch, triton.testing
sys.path.insert(0, "src")
from ingot.kernels.fp8_gemm import fp8_gemm_block
from ingot.quant import ref

out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "rows": []}
dev = "cuda"
def bench(f, sets):
    st = [0]
    def call():
        f(*sets[st[0] % len(sets)]); st[0] += 1
    return triton.testing.do_bench_cudagraph(call, rep=3, return_mode="median") * 1e3

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (7168, 2048), (2048, 7168), (24576, 1536),
          (7168, 16384), (18432, 7168)]
# layouts to try for scale_a (M, K/128) and scale_b (K/128, N/128)
def variants(xs, ws):
    return {"a_colmajor,b=ws.t()": (xs.t().contiguous().t(), ws.t()),
            "a_colmajor,b=ws.t().contig": (xs.t().contiguous().t(), ws.t().contiguous()),
            "a_rowmajor,b=ws.t()": (xs, ws.t()),
            "a_rowmajor,b=ws.t().contig": (xs, ws.t().contiguous())}
first = True
for m in (16, 128, 1024, 4096):
    for n, k in SHAPES:
        row = {"m": m, "n": n, "k": k}
        nsets = max(2, min(16, -(-2 * 50 * 2**20 // (n * k))))
        sets = []
        for _ in range(nsets):
            x = torch.randn(m, k, device=dev)
            w = torch.randn(n, k, device=dev) * 0.02
            xq, xs = ref.quantize_act_group(x, "fp8_e4m3", 128, "float")
            wq = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            ws = torch.rand(n // 128, k // 128, device=dev) / 100
            sets.append((xq, xs.contiguous(), wq, ws))
        xq, xs, wq, ws = sets[0]
        ours = fp8_gemm_block(xq, xs, wq, ws, out_dtype=torch.float32)
        row["ours_us"] = round(bench(lambda a, b, c, d: fp8_gemm_block(a, b, c, d), sets), 2)
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
        xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        row["bf16_us"] = round(bench(lambda w: xb @ w.t(), [(w,) for w in wb]), 2)
        for name, (sa, sb) in variants(xs, ws).items():
            for fast in (False, True):
                key = f"{name},fast={fast}"
                try:
                    y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)
                    torch.cuda.synchronize()
                    err = ((y.float() - ours).norm() / ours.norm()).item()
                    def f(a, b, c, d, fast=fast, name=name):
                        sa2, sb2 = variants(b, d)[name]
                        return torch._scaled_mm(a, c.t(), scale_a=sa2, scale_b=sb2, out_dtype=torch.bfloat16, use_fast_accum=fast)
                    us = bench(f, sets)
                    row[key] = {"rel_err_vs_ours": err, "us": round(us, 2)}
                except Exception as e:
                    row[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
