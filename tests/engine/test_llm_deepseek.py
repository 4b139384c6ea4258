"""The engine over a tiny random DeepSeek-V3 (MLA's shared latent cache: v_cache None; MoE): greedy equals the
score path token for token, batched equals alone, preemption keeps outputs. CPU, and CUDA on the GPU machine
(where the fused MoE path and a dense variant capture decode graphs, and MoE forced onto its per-expert loop, whose
host sync makes graph capture fall back to eager decode, does not)."""

from __future__ import annotations

import pytest
import torch

from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model

DSV3 = dict(model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=128)
PROMPTS = [[3, 4, 5], [9] * 13, list(range(20, 41)), [77]]


def tiny(device, **change):
    model = random_model({**DSV3, **change}, "bf16", device, dtype=torch.float32, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # N(0, 0.02) weights give near-flat logits; spread them
    return model


def teacher_forced(model, prompt, generated):
    ids = torch.tensor([prompt + generated], device=next(model.parameters()).device)
    with torch.inference_mode():
        return model.score(ids)[0, len(prompt) - 1 : -1].argmax(-1).tolist()


def check(llm, max_tokens=10):
    specs = llm.model.kv_cache_spec()
    assert all(s.shared_kv for s in specs) and all(v is None for _, v in llm.kv_cache.caches)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        assert out.token_ids == teacher_forced(llm.model, p, out.token_ids)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert [llm.generate([p], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0].token_ids
            for p in PROMPTS] == [o.token_ids for o in outs]
    return outs


def test_cpu_mla_moe():
    model = tiny("cpu")
    outs = check(LLM.from_model(model, block_size=4, max_model_len=64, max_num_seqs=4))
    tight = LLM.from_model(model, block_size=4, max_model_len=64, max_num_seqs=4, num_kv_blocks=16)
    again = tight.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert sum(o.num_preemptions for o in again) > 0  # 78 tokens in all, 64 slots


@pytest.mark.gpu
@pytest.mark.parametrize("moe", ["fused", "loop", None])
def test_cuda_mla(moe):
    from ingot.layers.moe import MoE

    model = tiny("cuda", **({} if moe else {"n_routed_experts": None}))
    for m in model.modules():
        if isinstance(m, MoE):
            m.use_fused = None if moe == "fused" else False
    llm = LLM.from_model(model, block_size=16, max_model_len=128, max_num_seqs=8)
    if moe == "loop":
        assert llm.runner.graphs is None and llm.runner.graphs_error  # the loop's host sync: eager decode
    else:
        assert llm.runner.graphs is not None and llm.runner.graphs_error is None
    check(llm)
