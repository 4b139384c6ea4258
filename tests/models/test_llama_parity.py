"""Llama-family parity with transformers: tiny random configs of each family, float32, logits via ``score`` and via
the paged forward (prefill, chunked prefill over cached context, mixed steps, decode with a padded row).

Bound: max |logit diff| <= 1e-4 in float32 (measured ~1e-6: the same math, other summation orders) and 100% top-1
agreement on every compared token.
"""

from __future__ import annotations

import pytest
import torch
from _parity import load_from_hf, paged_vs_hf
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ingot.models import build_model

TOL = 1e-4
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

CASES = {
    # Llama 3.1: llama3 rope scaling, GQA, attention and MLP biases (attention_bias covers q, k, v and o)
    "llama3.1": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)),
    # SmolLM2 / Llama 3.2 small: tied embeddings, MHA, linear rope scaling
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=4,
                                                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    # Qwen2.5: q/k/v biases, no o bias; sliding window on layer 1 (use_sliding_window, max_window_layers 1)
    "qwen2-window": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=1)),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 != hidden / heads = 16, yarn rope without mscale
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1000000.0})),
    # Mistral v0.1: sliding window on every layer (6 < the 11-token prompts)
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=6)),
}


def _pair(case: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, **extra})
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).float().eval()
    model = build_model(cfg.to_dict(), dtype=torch.float32)
    load_from_hf(model, hf)
    return model, hf


def _prompts(vocab: int, lengths=(11, 9, 3), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("case", list(CASES))
def test_score_matches_transformers(case):
    model, hf = _pair(case)
    ids = torch.tensor(_prompts(TINY["vocab_size"], lengths=(13, 13)))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = model.score(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (ref - got).abs().max().item() <= TOL
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_paged_forward_matches_transformers(case):
    model, hf = _pair(case)
    with torch.no_grad():
        diff, agree, n = paged_vs_hf(model, hf, _prompts(TINY["vocab_size"]))
    assert n == 11 + 9 + 3 + 1 + 3 * 3  # every fed token compared
    assert diff <= TOL, f"max |logit diff| {diff:.3g}"
    assert agree == n


def test_windows_change_the_result():
    """The window cases would pass vacuously if the window never cut anything: without it, logits differ."""
    model, hf = _pair("mistral-window")
    ids = torch.tensor(_prompts(TINY["vocab_size"], lengths=(13,)))
    for layer in model.model.layers:
        layer.self_attn.attn.window = None
    with torch.no_grad():
        assert (hf(ids).logits[0, -1] - model.score(ids)[0, -1]).abs().max().item() > 1e-3


def test_legacy_rope_scaling_config_is_read_the_same():
    """config.json files on the Hub carry ``rope_scaling`` + ``rope_theta`` (transformers 4.x); transformers 5 reads
    them into ``rope_parameters``. Both spellings must build the same model."""
    model, hf = _pair("llama3.1")
    legacy = hf.config.to_dict()
    rope = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    old = build_model(legacy, dtype=torch.float32)
    old.load_state_dict(model.state_dict())
    ids = torch.tensor(_prompts(TINY["vocab_size"], lengths=(40,)))
    with torch.no_grad():
        assert torch.equal(old.score(ids), model.score(ids))
        # and the scaling matters at these positions: plain RoPE gives other logits
        plain = build_model({**legacy, "rope_scaling": None}, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain.score(ids), model.score(ids), atol=1e-3)
