"""LLM end to end on the embedded SmolLM2-135M-Instruct (CPU): greedy generation equals a plain greedy loop over
model.score token for token, batched equals alone, text equals the tokenizer's decode, stop strings, chat."""

from __future__ import annotations

import pytest
import torch

from ingot.engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived a"]
N = 12


def greedy_by_score(model, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """What a plain greedy loop over model.score picks after the prompt and each prefix of ``generated``: one
    score call over the whole sequence gives them all (causal: position p sees tokens <= p only). Equal to
    ``generated`` exactly when ``generated`` is the greedy continuation."""
    ids = prompt_ids + generated
    with torch.inference_mode():
        logits = model.score(torch.tensor([ids]))[0]  # (T, vocab)
    return logits[len(prompt_ids) - 1 : len(ids) - 1].argmax(-1).tolist()


@pytest.fixture(scope="module")
def llm(embedded_model_dir):
    # float32: the paged path and score's dense path then agree to ~1e-6, far below any greedy near-tie
    return LLM(embedded_model_dir, device="cpu", dtype=torch.float32, max_model_len=128, max_num_seqs=4)


def test_greedy_matches_score_loop_batched_and_alone(llm):
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    batched = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, batched):
        ids = llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        assert out.token_ids == greedy_by_score(llm.model, ids, out.token_ids), prompt
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == "length" and len(out.token_ids) == N
    assert [llm.generate([p], params)[0].token_ids for p in PROMPTS] == [o.token_ids for o in batched]
    assert "Paris" in batched[0].text


def test_stop_string_truncates_and_streams_the_same_text(llm):
    full = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=N, ignore_eos=True))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.index(stop)
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=N, stop=[stop]))[0]
    assert out.text == full[:cut] and out.finish_reason == "stop"
    streamed = "".join(d.text for d in llm.stream([PROMPTS[2]], SamplingParams(max_tokens=N, stop=[stop])))
    assert streamed == out.text


def test_chat_template_and_eos(llm):
    ids = llm.chat_prompt([{"role": "user", "content": "What is 2 + 2? Answer with one number."}])
    assert llm.tokenizer.decode(ids).rstrip().endswith("assistant")
    out = llm.generate([ids], SamplingParams(max_tokens=40))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.eos_ids  # the instruct model ends its turn
    assert "4" in out.text
