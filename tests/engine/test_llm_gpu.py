"""The engine on CUDA (run on the GPU machine): CUDA-graph decode equals the score loop, padded buckets, batches
that shrink and grow across buckets, memory sizing, a quantized checkpoint."""

from __future__ import annotations

import pytest
import torch

from ingot.engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived a",
           "1, 2, 3, 4,", "The quick brown fox"]


def score_logits(model, prompt_ids, generated):
    ids = prompt_ids + generated
    with torch.inference_mode():
        return model.score(torch.tensor([ids], device="cuda"))[0, len(prompt_ids) - 1 : len(ids) - 1].float()


LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel", "int8-block"])
def test_random_llama_graphs_equal_score_path(scheme):
    """No embedded model needed: a random Llama (fp32 activations) whose greedy tokens through CUDA-graph decode
    (buckets 1..16, batches shrinking as requests finish) equal the score path's argmax at every step."""
    from ingot.models.loader import random_model

    model = random_model(LLAMA, scheme, "cuda", dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # spread N(0, 0.02) logits: no near-ties
    llm = LLM.from_model(model, max_model_len=256, max_num_seqs=16)
    assert llm.runner.graphs is not None, llm.runner.graphs_error
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 33, 16, 90, 3, 64, 5, 12)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (20, 5, 12, 1, 8, 30, 2, 17, 9)]
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        assert out.token_ids == score_logits(model, p, out.token_ids).argmax(-1).tolist()
    assert len({tuple(o.token_ids) for o in outs}) > 1


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel"])
def test_random_llama_bf16_graphs_follow_the_score_path(scheme):
    """BF16 activations: the decode graph runs the Triton RMSNorm, rotary and KV-store kernels (fp32 keeps torch's),
    and prefill/mixed steps the batched attention plan. Every engine token is the score path's argmax up to bf16
    noise: a wrong slot, position, norm or rotation puts the chosen logit several logit std (~16 here) below the max.
    (On CPU, where the torch paths run, the gap is 0 at every step.)"""
    from ingot.models.loader import random_model

    model = random_model(LLAMA, scheme, "cuda", dtype=torch.bfloat16, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    llm = LLM.from_model(model, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)  # chunks, mixed
    assert llm.runner.graphs is not None, llm.runner.graphs_error
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 33, 16, 90, 3, 64, 5, 12)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (20, 5, 12, 1, 8, 30, 2, 17, 9)]
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        logits = score_logits(model, p, out.token_ids)
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max() < 1.0
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_fp32_graphs_greedy_equals_score_and_batch_equals_alone(embedded_model_dir):
    llm = LLM(embedded_model_dir, device="cuda", dtype=torch.float32, max_model_len=256, max_num_seqs=8)
    assert llm.runner.graphs is not None and llm.runner.graphs.buckets == [1, 2, 4, 8]
    # different max_tokens: the batch shrinks from 5 (bucket 8) to 1 as requests finish
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (16, 3, 9, 1, 12)]
    outs = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        assert len(out.token_ids) == p.max_tokens
        want = score_logits(llm.model, out.prompt_token_ids, out.token_ids).argmax(-1).tolist()
        assert out.token_ids == want, prompt
        assert llm.generate([prompt], p)[0].token_ids == out.token_ids
    assert "Paris" in outs[0].text


def test_bf16_graphs_follow_the_model(embedded_model_dir):
    """BF16: the engine's choice at every step is the score path's argmax up to bf16 noise (a wrong slot, position
    or block table would put it far off)."""
    llm = LLM(embedded_model_dir, device="cuda", max_model_len=512, max_num_seqs=32)
    outs = llm.generate(PROMPTS * 5, SamplingParams(max_tokens=24, ignore_eos=True))  # 25 rows: bucket 32
    for out in outs:
        logits = score_logits(llm.model, out.prompt_token_ids, out.token_ids)
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max() < 0.5


def test_kv_pool_sized_from_memory(embedded_model_dir):
    llm = LLM(embedded_model_dir, device="cuda", mem_fraction=0.5, max_num_seqs=16)
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < llm.kv_cache.nbytes < 0.5 * total
    assert llm.max_model_len == 8192  # SmolLM2's max_position_embeddings fits the pool


def test_int8_checkpoint_through_the_engine(embedded_model_dir, tmp_path):
    from ingot.quant.convert import ConvertOptions, convert
    from ingot.quant.schemes import Scheme

    for scheme in ("int8-channel", "int8-block"):
        dst = tmp_path / scheme
        convert(embedded_model_dir, dst, ConvertOptions(scheme=Scheme.from_name(scheme), device="cuda"), progress=False)
        # a fixed pool: the first scheme's engine is still alive while the second one sizes its own
        llm = LLM(dst, device="cuda", max_model_len=256, max_num_seqs=4, num_kv_blocks=64)
        outs = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=12, ignore_eos=True))
        for out in outs:
            logits = score_logits(llm.model, out.prompt_token_ids, out.token_ids)
            chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
            assert (logits.max(-1).values - chosen).max() < 0.5, scheme
        assert "Paris" in outs[0].text, scheme


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel"])
def test_overlapped_steps_equal_reading_every_step(scheme):
    """async_steps on CUDA (graph decode, pinned copies, pending ids copied on the device) gives the outputs of the
    engine that reads every step first: greedy, seeded sampling, a stop id seen one step late, chunked prefills."""
    from ingot.models.loader import random_model

    model = random_model(LLAMA, scheme, "cuda", dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 33, 16, 90, 3, 64, 5, 12)]
    probe = LLM.from_model(model, max_model_len=256, max_num_seqs=16, num_kv_blocks=256, async_steps=False)
    stop = probe.generate([prompts[4]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids[5]
    del probe
    params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=t, seed=s, stop_token_ids=(stop,))
              for m, t, s in ((20, 0, None), (5, 0.7, 1), (12, 0, None), (1, 0, None), (8, 0, None), (30, 1.0, 2),
                              (2, 0, None), (17, 0.5, 3), (9, 0, None))]
    results = []
    for overlap in (False, True):
        llm = LLM.from_model(model, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                             num_kv_blocks=256, async_steps=overlap)
        assert llm.runner.graphs is not None, llm.runner.graphs_error
        results.append([(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)])
        assert llm.kv_cache.allocator.num_free == llm.kv_cache.num_blocks
        del llm
    assert results[0] == results[1]
    assert results[1][4][1] == "stop"


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel"])
def test_prefill_graphs_equal_eager_prefill(scheme):
    """A lone prompt's prefill replayed from a captured bucket (engine/prefill_graphs.py) gives the eager prefill's
    first-token logits and the same greedy continuation; a batch of prompts still runs eagerly."""
    from ingot.models.loader import random_model

    model = random_model(LLAMA, scheme, "cuda", dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    eager = LLM.from_model(model, max_model_len=256, max_num_seqs=4, num_kv_blocks=64, prefill_graph_tokens=0)
    graphs = LLM.from_model(model, max_model_len=256, max_num_seqs=4, num_kv_blocks=64, prefill_graph_tokens=128)
    assert graphs.runner.prefill is not None and set(graphs.runner.prefill.graphs) == {16, 32, 64, 128}
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for n in (3, 16, 37, 128):
        prompt = torch.randint(0, 512, (n,), generator=g).tolist()
        firsts = []
        for llm in (eager, graphs):
            execute = llm.runner.execute
            logits = []
            llm.runner.execute = lambda out, pending=None, ex=execute, acc=logits: acc.append(ex(out, pending)) or acc[-1]
            try:
                ids = llm.generate([prompt], params)[0].token_ids
            finally:
                llm.runner.execute = execute
            firsts.append((ids, logits[0].float().cpu()))
        (ids_e, first_e), (ids_g, first_g) = firsts
        torch.testing.assert_close(first_g, first_e, atol=1e-3, rtol=1e-3)
        assert ids_g == ids_e, n
    outs = graphs.generate([[1, 2, 3], [4, 5, 6, 7]], params)  # two prompts: the eager path, as before
    assert [len(o.token_ids) for o in outs] == [8, 8]
