"""Is the GPU ever idle during decoding? A CUDA-activity trace of ``LLM.generate`` on a random-weight model of real
shapes: per decode step, wall time against the GPU's busy time (the union of kernel and copy intervals), and the
largest idle gaps with the activity on either side.

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/profile_engine_steps.py [--preset llama3-8b]
             [--schemes bf16 int8-channel] [--batch 1] [--output-len 48] [--no-overlap] [--out FILE.json]
The trace covers one whole generate after a warm-up generate; "steady" numbers run from the 9th step's token read
(a device-to-host copy per step) to the third-last (the prefill and the drain excluded)."""
import argparse
import json
import time

import torch

from ingot.bench.e2e import PRESETS
from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model


def gpu_intervals(prof) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every device activity (kernels, memcpy, memset), sorted."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            start = e.time_range.start
            out.append((start, start + (getattr(e, "device_time", None) or e.cuda_time), e.name))
    return sorted(out)


def run(scheme: str, config: dict, batch: int, input_len: int, output_len: int, overlap: bool) -> dict:
    model = random_model(config, scheme, torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    llm = LLM.from_model(model, None, eos_ids=(), max_num_seqs=batch, max_model_len=input_len + output_len,
                         num_kv_blocks=batch * ((input_len + output_len) // 16 + 2) + 16, block_size=16,
                         async_steps=overlap)
    prompts = [[1 + (i + j) % 1000 for j in range(input_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    spans = gpu_intervals(prof)
    tpot = [(o.latency_s - o.ttft_s) / (output_len - 1) * 1e3 for o in outs]
    step_us = sorted(tpot)[len(tpot) // 2] * 1e3
    reads = [e for s, e, name in spans if "DtoH" in name]  # one sampled-ids copy per step
    lo, hi = reads[8], reads[-3]  # the steady window: from the 9th step's read to the third-last (prefill excluded)
    steps = len(reads) - 11
    busy, gaps, end, prev = 0.0, [], None, None
    for s, e, name in spans:
        if e <= lo or s >= hi:
            continue
        s, e = max(s, lo), min(e, hi)
        if end is None or s >= end:  # starts after everything so far: a gap (none before the first)
            if end is not None and s > end:
                gaps.append((s - end, prev, name))
            busy += e - s
            end, prev = e, name
        elif e > end:  # overlaps the busy span and extends it
            busy += e - end
            end, prev = e, name
    window = hi - lo
    gaps.sort(key=lambda g: -g[0])
    row = {"scheme": scheme, "batch": batch, "overlap": overlap, "tpot_ms_median": round(step_us / 1e3, 4),
           "wall_ms": round(wall_ms, 2), "steady_window_us": round(window, 1),
           "gpu_busy_fraction": round(busy / window, 4) if window > 0 else None,
           "steady_steps": steps, "steady_us_per_step": round(window / steps, 1),
           "idle_us_per_step": round((window - busy) / steps, 1),
           "gaps_over_5us_per_step": round(sum(1 for g in gaps if g[0] > 5) / steps, 2),
           "largest_gaps": [{"us": round(g, 1), "after": a[:90], "before": b[:90]} for g, a, b in gaps[:12]]}
    print(f"{scheme} b{batch} overlap={overlap}: TPOT {row['tpot_ms_median']:.3f} ms, GPU busy "
          f"{row['gpu_busy_fraction']}, idle {row['idle_us_per_step']} us/step", flush=True)
    for g in row["largest_gaps"][:6]:
        print(f"    gap {g['us']:8.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
    del llm, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8-channel"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    config = dict(PRESETS[a.preset])
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset, "runs": []}
    for s in a.schemes:
        for b in a.batch:
            results["runs"].append(run(s, config, b, a.input_len, a.output_len, not a.no_overlap))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
