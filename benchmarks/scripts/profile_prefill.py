"""Where a prefill step's time goes (the TTFT question): host time to queue one eager prefill forward, wall time, and
GPU kernel time, per scheme, on a random-weight model of real shapes.

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/profile_prefill.py [--preset llama3-8b]
             [--schemes bf16 int8-channel] [--batch 1 16] [--input-len 128] [--out FILE.json]
Per (scheme, batch): the step of batch x input_len prompt tokens (``ModelRunner.execute``, as the engine runs it;
re-running it rewrites the same cache slots) is timed 20 times: host_ms = until execute returns (no sync), wall_ms =
synchronized around it; then torch.profiler over 5 steps gives the kernels' summed GPU time and launch count and the
aten/Triton ops by host (self CPU) time. host_ms close to wall_ms and well above gpu_kernel_ms: launch-bound."""
import argparse
import json
import statistics
import time

import torch

from ingot.bench.e2e import PRESETS
from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model


def profile(scheme: str, config: dict, batch: int, input_len: int) -> dict:
    model = random_model(config, scheme, torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    llm = LLM.from_model(model, None, eos_ids=(), max_num_seqs=max(batch, 1), max_model_len=input_len + 8,
                         num_kv_blocks=batch * (input_len // 16 + 2) + 16, block_size=16, cuda_graphs=False)
    for i in range(batch):
        llm._add(i, [1 + (i + j) % 1000 for j in range(input_len)], SamplingParams(max_tokens=4, ignore_eos=True))
    out = llm.scheduler.schedule()
    assert not out.is_decode and out.num_tokens == batch * input_len, out.num_tokens
    runner = llm.runner
    for _ in range(3):
        runner.execute(out)
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.execute(out)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            runner.execute(out)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(getattr(e, "device_time", None) or e.cuda_time for e in kernels) / 5
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
    top = [{"op": a.key[:100], "calls_per_step": a.count / 5, "self_cpu_us_per_step": round(a.self_cpu_time_total / 5, 1)}
           for a in ops[:20]]
    row = {"scheme": scheme, "batch": batch, "input_len": input_len,
           "host_ms_median": round(statistics.median(host), 3), "wall_ms_median": round(statistics.median(wall), 3),
           "gpu_kernel_ms": round(kernel_us / 1e3, 3), "kernels_per_step": len(kernels) // 5, "top_host_ops": top}
    print(f"{scheme} batch {batch} x {input_len}: host {row['host_ms_median']:.2f} ms, wall {row['wall_ms_median']:.2f}"
          f" ms, GPU kernels {row['gpu_kernel_ms']:.2f} ms ({row['kernels_per_step']} launches)", flush=True)
    for t in top[:8]:
        print(f"    {t['self_cpu_us_per_step']:9.1f} us  x{t['calls_per_step']:6.0f}  {t['op']}")
    del llm, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8-channel"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    config = dict(PRESETS[a.preset])
    if a.layers:
        config["num_hidden_layers"] = a.layers
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset,
               "layers": config["num_hidden_layers"], "runs": []}
    for s in a.schemes:
        for b in a.batch:
            results["runs"].append(profile(s, config, b, a.input_len))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
