"""After the fix: repeatability of weight-only GEMMs - forced split 2 at SmolLM2's down_proj prefill shape (where
split 2 raced before), the new default (unsplit), and decode sizes with their default split-K."""
import json, sys, torch
from dataclasses import replace
from ingot.kernels.weight_only import w8a16_gemm, w4a16_gemm, default_config, effective_split_k
from ingot.kernels.tuning import GemmConfig
from ingot.formats.base import pack_int32
torch.manual_seed(0)
out = {}
base = GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)
runs = [((4096, 576, 1536), replace(base, split_k=2), 3000), ((4096, 576, 1536), None, 1500),
        ((512, 576, 1536), None, 1500), ((16, 576, 1536), None, 3000), ((64, 576, 1536), None, 3000),
        ((33, 4096, 14336), None, 500)]
for op in ("w8a16", "w4a16"):
    for (m, n, k), cfg, reps in runs:
        x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
        q = torch.randint(-8 if op == "w4a16" else -127, 8 if op == "w4a16" else 128, (n, k), device="cuda", dtype=torch.int8)
        if op == "w8a16":
            ws = torch.rand(n, 1, device="cuda") / 100
            f = lambda: w8a16_gemm(x, q, ws, config=cfg)
            w = q.float() * ws
        else:
            ws = torch.rand(n, k // 128, device="cuda") / 10
            wp = pack_int32(q.to(torch.int32), 4)
            f = lambda: w4a16_gemm(x, wp, ws, k, 128, config=cfg)
            w = q.float() * ws.repeat_interleave(128, 1)
        ref = x.float() @ w.T
        y0 = f()
        diff = nonfin = 0
        for _ in range(reps):
            y = f()
            diff += int(not torch.equal(y, y0))
            nonfin += int(not torch.isfinite(y).all())
        err = ((y0.float() - ref).norm() / ref.norm()).item()
        split = effective_split_k(k, cfg or default_config(op + "_gemm", m, n, k, torch.cuda.get_device_properties(0).multi_processor_count))
        key = f"{op} {m}x{n}x{k} {'forced split 2' if cfg else 'default'}"
        out[key] = dict(reps=reps, split=split, runs_differing=diff, runs_nonfinite=nonfin, rel_err=err)
        print(key, out[key], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
