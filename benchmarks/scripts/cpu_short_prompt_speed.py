"""Short-prompt generation speed of the embedded model on CPU (src/ingot/engine/NOTES.md, "CPU regressions").

Usage: [THREADS=1] [REPS=3] [MML=8192] python benchmarks/scripts/cpu_short_prompt_speed.py
(compare trees with PYTHONPATH=<worktree>/src). SmolLM2-135M-Instruct from `ingot pull` (~/.cache/ingot), bf16,
a 16-token prompt, 64 new tokens, greedy, ignore_eos; one warm-up call, then REPS timed generate calls. Prints
tokens/s from the best wall time and from the best process CPU time (steadier on a shared machine)."""
import json, os, time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", 1)))
from ingot.engine import LLM, SamplingParams  # noqa: E402

path = Path(os.environ.get("INGOT_CACHE_DIR", Path.home() / ".cache" / "ingot")) / "smollm2-135m-instruct"
kw = {"max_model_len": int(os.environ["MML"])} if os.environ.get("MML") else {}
llm = LLM(path, device="cpu", **kw)
ids = llm.encode("The quick brown fox jumps over the lazy dog. Then the dog wakes up and")[:16]
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
llm.generate([ids], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
wall, cpu = [], []
for _ in range(int(os.environ.get("REPS", 3))):
    t, c = time.perf_counter(), time.process_time()
    out = llm.generate([ids], params)[0]
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
n = len(out.token_ids)
print(json.dumps({"threads": torch.get_num_threads(), "max_model_len": llm.max_model_len,
                  "tok_s_wall_best": round(n / min(wall), 1), "tok_s_cpu_best": round(n / min(cpu), 1),
                  "wall_s": [round(x, 2) for x in wall], "cpu_s": [round(x, 2) for x in cpu]}))
