"""The embedded real model (SmolLM2-135M-Instruct: Llama, hidden 576, 9 query / 3 kv heads, tied embeddings) in BF16,
ingot vs transformers loading the same directory: top-1 agreement 100% on a chat prompt, through ``score`` and through
the paged prefill + greedy decode."""

from __future__ import annotations

import json

import pytest
import torch
from _parity import PagedRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ingot.models import build_model

DECODE_STEPS = 4


@pytest.fixture(scope="module")
def pair(embedded_model_dir):
    config = json.loads((embedded_model_dir / "config.json").read_text())
    model = build_model(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(load_file(embedded_model_dir / "model.safetensors"), strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied: the checkpoint omits it, embed_tokens fills it
    model.process_weights_after_loading()
    hf = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer briefly."}],
                                  add_generation_prompt=True, return_dict=False)
    return model, hf, list(ids)


def test_structure(pair):
    model, hf, _ = pair
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in hf.named_parameters()} - {"lm_head.weight"}
    assert model.kv_cache_spec()[0].num_kv_heads == 3 and len(model.kv_cache_spec()) == 30


def test_score_top1_matches_transformers(pair):
    model, hf, ids = pair
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits.float()
        got = model.score(x)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    # The same bf16 ops in the same order: measured 0.0 (torch 2.13 CPU). The bound leaves room for other SDPA
    # backends; logits reach ~38, where a bf16 ulp is 0.25.
    assert (ref - got).abs().max().item() <= 0.25


def test_paged_greedy_decode_matches_transformers(pair):
    """ingot generates greedily through its paged cache (prefill, then one token per step beside a padded row);
    transformers' forward over the final sequence must pick the same token at every position."""
    model, hf, ids = pair
    runner = PagedRunner(model, num_blocks=16, block_size=8, max_blocks=8)
    seq = list(ids)
    with torch.no_grad():
        picks = runner.step([(0, seq)])[0].argmax(-1).tolist()  # next-token choice after each prompt token
        for _ in range(DECODE_STEPS):
            seq.append(picks[-1])
            picks.append(int(runner.step([(0, seq[-1:])], pad_rows=1)[0].argmax()))
        ref = hf(torch.tensor([seq])).logits[0].argmax(-1).tolist()
    assert len(picks) == len(seq) == len(ids) + DECODE_STEPS
    assert picks == ref
