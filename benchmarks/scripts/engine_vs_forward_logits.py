"""Engine logits (prefill + decode, prompts batched as `ingot eval --tasks gsm8k` batches them) against one
full-sequence forward (model.score) of the same model, and against a float32 full forward, on GSM8K prompts
(src/ingot/engine/NOTES.md, "CPU regressions").

Usage: [DT=bf16|fp32] [NQ=5] [NEW=40] INGOT_DATA_DIR=../shared/data \
    python benchmarks/scripts/engine_vs_forward_logits.py
Per prompt: max / mean |logit difference| over the NEW greedy positions, where the argmaxes differ and the reference's
top-2 margin there, and whether greedy equals the full forward's argmax at every position."""
import json, os
from pathlib import Path

import torch

torch.set_num_threads(1)
from ingot.engine import LLM, SamplingParams  # noqa: E402
from ingot.eval import gsm8k as G  # noqa: E402
from ingot.eval.data import DataDir, seeded_subset  # noqa: E402
from ingot.models.loader import load_model  # noqa: E402

path = Path(os.environ.get("INGOT_CACHE_DIR", Path.home() / ".cache" / "ingot")) / "smollm2-135m-instruct"
nq, new = int(os.environ.get("NQ", 5)), int(os.environ.get("NEW", 40))
data = DataDir(Path(os.environ["INGOT_DATA_DIR"]))
train, test = data.gsm8k("train"), data.gsm8k("test")
exemplars = [train[i] for i in G.fewshot_indices(len(train))]
chosen = seeded_subset(len(test), 8, 0)[:nq]  # the first of `--limit 8 --seed 0`
prompts = [G.build_prompt(exemplars, test[i]["question"]) for i in chosen]
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[os.environ.get("DT", "bf16")]
llm = LLM(path, device="cpu", dtype=dtype)
rows: dict[int, list[torch.Tensor]] = {}
execute = llm.runner.execute


def spy(out):
    logits = execute(out)
    for s, row in zip([s for s in out.scheduled if s.samples], logits):
        rows.setdefault(s.seq.seq_id, []).append(row.float().clone())
    return logits


llm.runner.execute = spy
outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
ref32 = load_model(path, device=torch.device("cpu"), dtype=torch.float32)


def compare(a, b):
    dis = (a.argmax(-1) != b.argmax(-1)).nonzero().flatten().tolist()
    top2 = b.topk(2, -1).values
    return {"max_abs": round(float((a - b).abs().max()), 4), "mean_abs": round(float((a - b).abs().mean()), 5),
            "argmax_differs_at": dis, "ref_margin_there": [round(float(top2[i, 0] - top2[i, 1]), 4) for i in dis]}


items = []
for k, o in enumerate(outs):
    engine = torch.stack(rows[k])
    ids = o.prompt_token_ids + o.token_ids
    cut = slice(len(o.prompt_token_ids) - 1, len(ids) - 1)
    with torch.inference_mode():
        same = llm.model.score(torch.tensor([ids]))[0, cut].float()
        exact = ref32.score(torch.tensor([ids]))[0, cut].float()
    items.append({"question": chosen[k], "prompt_tokens": len(o.prompt_token_ids),
                  "engine_vs_forward": compare(engine, same), "engine_vs_forward_fp32": compare(engine, exact),
                  "forward_vs_forward_fp32": compare(same, exact),
                  "greedy_equals_forward": same.argmax(-1).tolist() == o.token_ids})
print(json.dumps({"dtype": str(dtype), "new": new, "items": items}, indent=1))
