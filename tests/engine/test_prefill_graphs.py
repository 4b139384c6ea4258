"""PrefillGraphs (engine/prefill_graphs.py): a lone whole prompt runs padded to a bucket of tokens over static
buffers - captured in a CUDA graph on the GPU, eagerly here - and must give the logits of the ordinary prefill; steps
that do not qualify (batches, chunks, prompts past the largest bucket) keep the ordinary path."""

from __future__ import annotations

import pytest
import torch

from ingot.engine import LLM, SamplingParams
from ingot.engine.prefill_graphs import prefill_buckets
from ingot.models.loader import random_model

LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def test_buckets():
    assert prefill_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(8) == [8]


def _first_logits(llm: LLM, prompts, max_tokens=6):
    """Greedy outputs, and the logits of every prefill step (the ones the prompts' first tokens come from)."""
    firsts, execute = [], llm.runner.execute

    def spy(out, pending=None):
        logits = execute(out, pending)
        if not out.is_decode:
            firsts.append(logits.float().clone())
        return logits

    llm.runner.execute = spy
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        llm.runner.execute = execute
    return [o.token_ids for o in outs], firsts


@pytest.mark.parametrize("n", [2, 5, 16, 17, 40, 64])
def test_padded_prefill_equals_the_ordinary_one(n):
    model = random_model(LLAMA, "bf16", "cpu", dtype=torch.float32, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # no near-ties between greedy candidates
    prompt = torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    plain = LLM.from_model(model, max_model_len=128, block_size=4)
    padded = LLM.from_model(model, max_model_len=128, block_size=4, prefill_graph_tokens=64)
    assert plain.runner.prefill is None and padded.runner.prefill is not None
    runs = []
    used = padded.runner.prefill.run
    calls = []
    padded.runner.prefill.run = lambda out: calls.append(1) or used(out)
    for llm in (plain, padded):
        runs.append(_first_logits(llm, [prompt]))
    (ids_a, first_a), (ids_b, first_b) = runs
    assert calls == [1]  # the one prefill took the padded path
    torch.testing.assert_close(first_b[0], first_a[0], atol=1e-4, rtol=1e-4)
    assert ids_a == ids_b  # and the cache it wrote serves the decode steps


def test_steps_that_do_not_qualify_keep_the_ordinary_path():
    model = random_model(LLAMA, "bf16", "cpu", dtype=torch.float32, seed=5)
    llm = LLM.from_model(model, max_model_len=256, block_size=4, prefill_graph_tokens=32)
    calls = []
    used = llm.runner.prefill.run
    llm.runner.prefill.run = lambda out: calls.append(1) or used(out)
    g = torch.Generator().manual_seed(0)
    llm.generate([torch.randint(0, 300, (9,), generator=g).tolist() for _ in range(2)], SamplingParams(max_tokens=2))
    llm.generate([torch.randint(0, 300, (50,), generator=g).tolist()], SamplingParams(max_tokens=2))  # > 32 tokens
    assert calls == []  # a batch of two prompts and a prompt past the largest bucket ran eagerly
    chunked = LLM.from_model(model, max_model_len=256, block_size=4, prefill_graph_tokens=32, max_num_batched_tokens=8)
    budget = chunked.plan.max_num_batched_tokens  # a prompt longer than a step's budget is chunked: never qualifies
    assert budget < 32 and chunked.runner.prefill.buckets[-1] == budget


def test_config_refuses_a_negative_size():
    from ingot.engine.config import EngineConfig

    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        EngineConfig(prefill_graph_tokens=-1)


def test_default_is_on_for_cuda_and_off_for_cpu():
    """None resolves to CUDA_PREFILL_GRAPH_TOKENS on CUDA (capped by the step budget and max_model_len) and to 0 on
    CPU, where nothing is captured; an explicit size wins; --eager (no graphs) turns them off. plan_engine with a
    fixed pool touches no CUDA API, so the CUDA branch is checked here too."""
    from ingot.engine.config import CUDA_PREFILL_GRAPH_TOKENS, EngineConfig, plan_engine

    model = random_model(LLAMA, "bf16", "cpu", dtype=torch.float32, seed=0)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def tokens(device, **kw):
        return plan_engine(model, EngineConfig(num_kv_blocks=64, **kw), device).prefill_graph_tokens

    assert tokens(cpu) == 0
    assert tokens(cuda) == min(CUDA_PREFILL_GRAPH_TOKENS, 512) == 512  # LLAMA's max_position_embeddings is 512
    assert tokens(cuda, max_model_len=200) == 200
    assert tokens(cuda, max_num_batched_tokens=96, max_num_seqs=4) == 96
    assert tokens(cuda, cuda_graphs=False) == 0
    assert tokens(cpu, prefill_graph_tokens=32) == 32
    assert tokens(cuda, prefill_graph_tokens=0) == 0
    assert LLM.from_model(model, max_model_len=128).runner.prefill is None  # CPU default: the ordinary prefill


def test_two_engines_on_one_model_each_use_their_own_cache():
    """LLM.from_model binds the model to its KV pool; a second engine on the same model rebinds it. The first one
    must rebind its own before stepping: its captured graphs hold its pool's addresses (on the GPU, an eager prefill
    into the other pool followed by graph decodes from its own gave garbage continuations)."""
    model = random_model(LLAMA, "bf16", "cpu", dtype=torch.float32, seed=0)
    first = LLM.from_model(model, max_model_len=64, num_kv_blocks=16)
    alone = first.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
    for k, v in first.kv_cache.caches:
        k.zero_(), v.zero_()
    second = LLM.from_model(model, max_model_len=64, num_kv_blocks=16)
    assert first.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids == alone
    assert any(k.abs().sum() > 0 for k, _ in first.kv_cache.caches)  # written where first reads
    assert all(k.abs().sum() == 0 for k, _ in second.kv_cache.caches)  # second never ran
    assert second.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids == alone
