"""Where a decode step's GPU time goes: per-kernel time of one decode forward (the CUDA graph's contents) of a
random-weight model of real shapes, per scheme, from torch.profiler (CUPTI kernel records of graph replays).

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/profile_decode.py [--preset llama3-8b] [--schemes bf16 int8-channel]
             [--batch 1] [--layers N] [--out FILE.json]
Prints, per scheme: graph replay time (CUDA events), the sum of kernel times, and the kernels grouped by name with
their share; writes the same as JSON."""
import argparse
import collections
import json

import torch

from ingot.bench.e2e import PRESETS
from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model


def kernel_table(prof) -> tuple[list[dict], float]:
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    rows = [{"kernel": k[:120], "calls": len(v), "total_us": round(sum(v), 1)} for k, v in by_name.items()]
    rows.sort(key=lambda r: -r["total_us"])
    return rows, sum(r["total_us"] for r in rows)


def profile_scheme(scheme: str, config: dict, batch: int, replays: int) -> dict:
    model = random_model(config, scheme, torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    llm = LLM.from_model(model, None, eos_ids=(), max_num_seqs=batch, max_model_len=256, num_kv_blocks=batch * 16 + 16,
                         block_size=16)
    prompts = [[1 + (i + j) % 1000 for j in range(128)] for i in range(batch)]
    for i, p in enumerate(prompts):
        llm._add(i, p, SamplingParams(max_tokens=64, ignore_eos=True))
    sched, runner = llm.scheduler, llm.runner
    out = sched.schedule()
    while not out.is_decode:  # prefill (maybe in chunks)
        runner.execute(out)
        sched.update(out, [7] * len(out.scheduled))
        out = sched.schedule()
    assert runner.graphs is not None, runner.graphs_error
    runner.decode.fill(out.scheduled, runner.graphs.bucket(batch))
    graph, _ = runner.graphs.graphs[runner.graphs.bucket(batch)]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_us = start.elapsed_time(end) * 1000 / 50
    # lm_head + sampling after the graph (eager): time it the way the engine runs it
    hidden = runner.graphs.replay(batch)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        model.compute_logits(hidden)
    end.record()
    torch.cuda.synchronize()
    logits_us = start.elapsed_time(end) * 1000 / 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows, total = kernel_table(prof)
    for r in rows:
        r["per_step_us"] = round(r["total_us"] / replays, 2)
        r["share"] = round(r["total_us"] / total, 4) if total else None
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    weights += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "embed_tokens" not in n)
    print(f"\n== {scheme} batch {batch}: graph replay {replay_us:.1f} us, kernels {total / replays:.1f} us/step, "
          f"logits {logits_us:.1f} us; weights+buffers read {weights / 1e9:.2f} GB", flush=True)
    for r in rows[:25]:
        print(f"  {r['per_step_us']:9.1f} us {r['share'] * 100:5.1f}%  x{r['calls'] // replays:4d}  {r['kernel']}")
    del llm, model
    torch.cuda.empty_cache()
    return {"scheme": scheme, "batch": batch, "graph_replay_us": round(replay_us, 1), "logits_us": round(logits_us, 1),
            "kernel_us_per_step": round(total / replays, 1), "weight_bytes": weights, "kernels": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8-channel"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    config = dict(PRESETS[a.preset])
    if a.layers:
        config["num_hidden_layers"] = a.layers
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": a.preset,
               "layers": config["num_hidden_layers"], "runs": []}
    for b in a.batch:
        for s in a.schemes:
            results["runs"].append(profile_scheme(s, config, b, a.replays))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
