"""Host time per engine step on CPU, split by phase; the model forward is timed apart (wrapped). See
src/ingot/engine/NOTES.md.

Usage: python benchmarks/scripts/engine_step_overhead.py [batch ...]. Tiny random Llama (2 layers, hidden 32, vocab 256, fp32) so the forward
and lm_head cost little; prompts of 128 tokens, 64 output tokens, greedy, ignore_eos. Each configuration runs REPS
times; the report is the run with the lowest median decode step (the machine is shared)."""
import statistics, sys, time
import torch
from ingot.engine import LLM, SamplingParams
from ingot.engine import runner as R
from ingot.models.loader import random_model

TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
REPS = 5


def _timed(obj, name, sink):
    orig = getattr(obj, name)
    def wrapper(*a, **k):
        t0 = time.perf_counter(); r = orig(*a, **k); sink.append(time.perf_counter() - t0); return r
    setattr(obj, name, wrapper)


def run(batch, input_len=128, output_len=64):
    torch.manual_seed(0)
    model = random_model(TINY, "bf16", "cpu", dtype=torch.float32)
    llm = LLM.from_model(model, max_num_seqs=batch, max_model_len=input_len + output_len,
                         max_num_batched_tokens=8192, block_size=16)
    if not hasattr(R, "DecodeBuffers"):  # the old runner: emulate its CUDA decode path (fill + padded buffers)
        g = R._DecodeGraphs(model, R.RunnerConfig(batch, input_len + output_len), 16, torch.device("cpu"))
        g.replay = lambda out: g._run(g.fill(out))[: len(out.scheduled)]
        llm.runner.graphs = g
    t = {k: [] for k in ("step", "forward", "schedule", "execute", "sample", "update", "logits")}
    _timed(model, "forward", t["forward"]); _timed(model, "compute_logits", t["logits"])
    _timed(llm.scheduler, "schedule", t["schedule"]); _timed(llm.runner, "execute", t["execute"])
    _timed(llm.sampler, "sample", t["sample"]); _timed(llm.scheduler, "update", t["update"])
    _timed(llm, "_step", t["step"])
    prompts = torch.randint(0, 256, (batch, input_len), generator=torch.Generator().manual_seed(1)).tolist()
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    for v in t.values(): v.clear()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=output_len, ignore_eos=True))
    wall = time.perf_counter() - t0
    # steps after the prefill ones are decodes: the first steps hold the prefills (8192-token budget)
    nmix = len(t["step"]) - (output_len - 1)
    dec = slice(nmix, None)
    med = lambda xs: 1e3 * statistics.median(xs)
    r = {"wall_s": wall, "mixed_steps": nmix, "mixed_step_ms": 1e3 * sum(t["step"][:nmix]) / nmix,
         "mixed_forward_ms": 1e3 * sum(t["forward"][:nmix]) / nmix}
    for k in t:
        r[k] = med(t[k][dec])
    r["outside_forward"] = statistics.median([a - b for a, b in zip(t["step"][dec], t["forward"][dec])]) * 1e3
    r["execute_minus_forward_and_logits"] = statistics.median(
        [a - b - c for a, b, c in zip(t["execute"][dec], t["forward"][dec], t["logits"][dec])]) * 1e3
    return r


if __name__ == "__main__":
    torch.set_num_threads(1)
    for b in [int(x) for x in (sys.argv[1:] or ["1", "256"])]:
        best = min((run(b) for _ in range(REPS)), key=lambda r: r["step"])
        print(f"batch {b}: decode step {best['step']:.3f} ms = forward {best['forward']:.3f} + outside {best['outside_forward']:.3f} "
              f"[schedule {best['schedule']:.3f}, inputs {best['execute_minus_forward_and_logits']:.3f}, "
              f"lm_head {best['logits']:.3f}, sample {best['sample']:.3f}, update {best['update']:.3f}] | "
              f"{best['mixed_steps']} prefill/mixed steps {best['mixed_step_ms']:.1f} ms each (forward {best['mixed_forward_ms']:.1f}) | "
              f"generate wall {best['wall_s']:.3f} s")
