"""W8A8 / FP8 block GEMMs at decode sizes with their default (tuned) configs: repeatability over many launches and
kernel time (a CUDA graph of 50 launches, replayed 10 times). Run once per tree (before / after):

    PYTHONPATH=src python3 benchmarks/scripts/int8_gemm_repeatability.py OUT.json

Not yet run on a GPU (written for the check kernels/NOTES.md asks for: commit 8d26359 against its parent)."""
import json, sys, torch
from ingot.kernels.int8_gemm import int8_gemm_channel, int8_gemm_block
from ingot.kernels.fp8_gemm import fp8_gemm_block
torch.manual_seed(0)
out = {}
def case(name, f, reps):
    y0 = f(); diff = nonfin = 0
    for _ in range(reps):
        y = f(); diff += int(not torch.equal(y, y0)); nonfin += int(not torch.isfinite(y).all())
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(50): f()
    g.replay(); torch.cuda.synchronize()
    t, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t.record()
    for _ in range(10): g.replay()
    e.record(); torch.cuda.synchronize()
    out[name] = dict(reps=reps, runs_differing=diff, runs_nonfinite=nonfin, us=round(t.elapsed_time(e) / 500 * 1000, 2))
    print(name, out[name], flush=True)
for m, n, k in [(1, 6144, 4096), (1, 4096, 14336), (16, 28672, 4096), (64, 4096, 4096), (33, 2048, 7168), (16, 4096, 14336)]:
    xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8); xs = torch.rand(m, 1, device="cuda") / 100
    wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8); ws = torch.rand(n, 1, device="cuda") / 100
    case(f"int8_channel {m}x{n}x{k}", lambda: int8_gemm_channel(xq, xs, wq, ws), 2000)
    xsb = torch.rand(m, k // 128, device="cuda") / 100; wsb = torch.rand(n // 128, k // 128, device="cuda") / 100
    case(f"int8_block {m}x{n}x{k}", lambda: int8_gemm_block(xq, xsb, wq, wsb), 1000)
    xf = (torch.randn(m, k, device="cuda")).to(torch.float8_e4m3fn); wf = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    case(f"fp8_block {m}x{n}x{k}", lambda: fp8_gemm_block(xf, xsb, wf, wsb), 1000)
json.dump(out, open(sys.argv[1], "w"), indent=1)
