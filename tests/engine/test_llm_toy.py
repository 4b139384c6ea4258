"""LLM over a tiny contract-following model: greedy equals a plain loop over model.score, batching and chunked
prefill and preemption leave greedy outputs unchanged, stop conditions, streaming, the runner's inputs."""

from __future__ import annotations

import torch

from ingot.engine import LLM, SamplingParams
from ingot.engine.decode_graphs import graph_buckets
from ingot.engine.runner import build_inputs
from ingot.engine.scheduler import ScheduledSeq, SchedulerOutput
from ingot.engine.sequence import Sequence

from toy import ToyLM, greedy_reference

PROMPTS = [[1, 2, 3], [5] * 17, list(range(7, 29)), [40]]


def engine(model=None, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("max_model_len", 64)
    return LLM.from_model(model or ToyLM(), **kw)


def test_greedy_equals_score_loop_batched_and_alone():
    model = ToyLM()
    refs = [greedy_reference(model, p, 12) for p in PROMPTS]
    assert len({tuple(r) for r in refs}) > 1 and any(len(set(r)) > 2 for r in refs)  # a non-trivial model
    llm = engine(model)
    params = SamplingParams(max_tokens=12)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == refs
    assert all(o.finish_reason == "length" for o in outs)
    for p, ref in zip(PROMPTS, refs):  # each prompt alone
        assert llm.generate([p], params)[0].token_ids == ref


def test_chunked_prefill_and_preemption_keep_greedy_outputs():
    model = ToyLM()
    refs = [greedy_reference(model, p, 20) for p in PROMPTS]
    # budget 8: prompts prefilled in chunks, mixed with decodes
    chunked = engine(model, max_num_batched_tokens=8, max_num_seqs=4)
    assert [o.token_ids for o in chunked.generate(PROMPTS, SamplingParams(max_tokens=20))] == refs
    # 16 blocks of 4 = 64 tokens for four sequences that grow to 23..42 tokens: some are preempted and recomputed
    tight = engine(model, num_kv_blocks=16, max_num_seqs=4)
    outs = tight.generate(PROMPTS, SamplingParams(max_tokens=20))
    assert [o.token_ids for o in outs] == refs
    assert sum(o.num_preemptions for o in outs) > 0
    assert tight.kv_cache.allocator.num_free == 16  # every block returned


def test_stop_token_ids_eos_and_max_model_len():
    model = ToyLM()
    ref = greedy_reference(model, PROMPTS[0], 12)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    llm = engine(model)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    eos = LLM.from_model(model, eos_ids=(stop_tok,), block_size=4, max_model_len=64)
    assert eos.generate([PROMPTS[0]], SamplingParams(max_tokens=12))[0].token_ids == ref[: first + 1]
    assert eos.generate([PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids == ref
    short = engine(model, max_model_len=8)
    out = short.generate([PROMPTS[0]], SamplingParams(max_tokens=100))[0]
    assert len(out.token_ids) == 8 - len(PROMPTS[0]) and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    model = ToyLM()
    llm = engine(model)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=42)
    alone = llm.generate([PROMPTS[1]], p)[0].token_ids
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    batched = llm.generate(prompts, [SamplingParams(max_tokens=5, temperature=0.9), p, SamplingParams(), p])
    assert batched[1].token_ids == alone and batched[3].token_ids == alone  # own generators, same seed
    other = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=43))[0]
    assert other.token_ids != alone


def test_stream_yields_every_token_once_and_frees_on_early_exit():
    model = ToyLM()
    llm = engine(model)
    got: dict[int, list[int]] = {}
    reasons = {}
    for d in llm.stream(PROMPTS, SamplingParams(max_tokens=6)):
        got.setdefault(d.index, []).extend(d.token_ids)
        if d.finish_reason:
            reasons[d.index] = d.finish_reason
    assert [got[i] for i in range(len(PROMPTS))] == [greedy_reference(model, p, 6) for p in PROMPTS]
    assert reasons == {i: "length" for i in range(len(PROMPTS))}
    it = llm.stream(PROMPTS, SamplingParams(max_tokens=50))
    next(it)
    it.close()  # the consumer leaves early: every sequence is aborted and its blocks freed
    assert not llm.scheduler.has_unfinished() and llm.kv_cache.allocator.num_free == llm.kv_cache.num_blocks


def test_build_inputs_slots_positions_and_sampled_rows():
    a = Sequence(0, [1, 2, 3, 4, 5, 6], SamplingParams())
    a.block_table, a.num_computed_tokens = [7, 2], 4
    b = Sequence(1, [9, 9, 9], SamplingParams())
    b.block_table = [5]
    out = SchedulerOutput((ScheduledSeq.of(a, 2), ScheduledSeq.of(b, 2)), ())  # a finishes its prompt, b does not
    x = build_inputs(out, block_size=4, device=torch.device("cpu"))
    assert x.input_ids.tolist() == [5, 6, 9, 9] and x.positions.tolist() == [4, 5, 0, 1]
    assert x.meta.slot_mapping.tolist() == [2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 0, 5 * 4 + 1]
    assert x.meta.cu_query_lens.tolist() == [0, 2, 4] and x.meta.seq_lens.tolist() == [6, 2]
    assert x.meta.block_tables.tolist() == [[7, 2], [5, 0]] and x.logits_rows.tolist() == [1]
    assert x.meta.max_query_len == 2 and x.meta.max_seq_len == 6


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(256)[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and graph_buckets(256)[-1] == 256
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_padded_decode_buffers_match_the_eager_step():
    """The CUDA-graph path's inputs, run eagerly on CPU: a batch of 3 padded to bucket 4 (slot -1, seq_len 0 rows)
    gives the exact-size step's logits for the 3 real rows, and the padded row writes no cache."""
    from ingot.engine.decode_graphs import DecodeBuffers

    model = ToyLM()
    llm = engine(model, max_num_seqs=4)
    sched = llm.scheduler
    for i, p in enumerate(PROMPTS[:3]):
        llm._add(i, p, SamplingParams(max_tokens=5))
    out = sched.schedule()  # prefill
    sched.update(out, [1, 2, 3])
    decode = sched.schedule()
    assert decode.is_decode and len(decode.scheduled) == 3
    exact = llm.runner.execute(decode)  # the runner's own decode buffers, 3 rows
    buf = DecodeBuffers(4, llm.max_model_len, llm.kv_cache.block_size, torch.device("cpu"))
    buf.fill(decode.scheduled, 4)
    assert buf.slot_mapping[3] == -1 and buf.seq_lens[3] == 0
    for i, s in enumerate(decode.scheduled):
        assert buf.block_tables[i, : len(s.seq.block_table)].tolist() == s.seq.block_table
    real = buf.slot_mapping[:3].tolist()
    for k, v in llm.kv_cache.caches:  # clear the new tokens' slots: the padded run must write exactly these back
        for t in (k, v):
            t.view(-1, *t.shape[2:])[real] = 0.0
    before = [k.clone() for k, _ in llm.kv_cache.caches]
    with torch.inference_mode():
        padded = model.compute_logits(model.forward(buf.input_ids[:4], buf.positions[:4], buf.meta(4)))
    torch.testing.assert_close(padded[:3], exact, atol=1e-5, rtol=1e-5)
    eager = build_inputs(decode, llm.kv_cache.block_size, torch.device("cpu"))  # the prefill path's inputs agree
    assert eager.meta.slot_mapping.tolist() == real and eager.input_ids.tolist() == buf.input_ids[:3].tolist()
    bs = llm.kv_cache.block_size
    for (k, _), old in zip(llm.kv_cache.caches, before):
        changed = (k != old).any(-1).any(-1).nonzero().tolist()
        assert sorted(b * bs + o for b, o in changed) == sorted(real)  # the padded row wrote nothing


def test_decode_buffers_rewrite_tables_when_rows_change():
    """Table columns are cached per row: a sequence that gains a block, a row taken by another sequence and a
    preempted sequence re-admitted with new blocks of the same count are all rewritten."""
    from ingot.engine.decode_graphs import DecodeBuffers

    buf = DecodeBuffers(2, 64, 4, torch.device("cpu"))

    def seq(i, blocks, n):
        s = Sequence(i, list(range(n)), SamplingParams())
        s.block_table, s.num_computed_tokens = list(blocks), n - 1
        return s

    a, b = seq(0, [3, 4], 6), seq(1, [7], 2)
    buf.fill((ScheduledSeq.of(a, 1), ScheduledSeq.of(b, 1)), 2)
    assert buf.block_tables[0, :2].tolist() == [3, 4] and buf.block_tables[1, :1].tolist() == [7]
    a.block_table.append(9)
    a.token_ids += [1] * 4
    a.num_computed_tokens = 9
    buf.fill((ScheduledSeq.of(b, 1), ScheduledSeq.of(a, 1)), 2)  # a moved to row 1 and grew
    assert buf.block_tables[0, :1].tolist() == [7] and buf.block_tables[1, :3].tolist() == [3, 4, 9]
    assert buf.slot_mapping.tolist() == [7 * 4 + 1, 9 * 4 + 1] and buf.seq_lens.tolist() == [2, 10]
    b.block_table, b.num_preemptions = [5], 1  # recomputed after a preemption: same block count, new block
    buf.fill((ScheduledSeq.of(b, 1),), 2)
    assert buf.block_tables[0, :1].tolist() == [5] and buf.slot_mapping.tolist() == [5 * 4 + 1, -1]
    assert buf.seq_lens.tolist() == [2, 0]


def test_plan_engine_cpu_defaults_overrides_and_refusals():
    import pytest

    from ingot.engine.config import CPU_MAX_NUM_SEQS, EngineConfig, plan_engine

    model = ToyLM(max_pos=256)
    cpu = torch.device("cpu")
    plan = plan_engine(model, EngineConfig(block_size=16), cpu)
    assert plan.max_num_seqs == CPU_MAX_NUM_SEQS and plan.max_model_len == 256  # the model's limit under 2048
    assert plan.num_blocks == CPU_MAX_NUM_SEQS * 256 // 16 and plan.cache_dtype == torch.float32
    small = plan_engine(model, EngineConfig(block_size=4, num_kv_blocks=10, max_num_seqs=2), cpu)
    assert small.num_blocks == 10 and small.max_model_len == 40  # capped by the pool
    assert small.max_num_batched_tokens >= small.max_num_seqs
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len 100"):
        plan_engine(model, EngineConfig(block_size=4, num_kv_blocks=10, max_model_len=100), cpu)
    with pytest.raises(ValueError, match="mem_fraction"):
        EngineConfig(mem_fraction=0.0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_one_token_chunks_beside_decodes_keep_greedy_outputs():
    """A budget of 2 with 2 sequences: a decode plus a 1-token chunk of the next prompt makes an all-one-token
    ("decode") step in which one row does not sample; only the sampling rows reach the sampler."""
    model = ToyLM()
    refs = [greedy_reference(model, p, 6) for p in PROMPTS[:3]]
    llm = engine(model, max_num_batched_tokens=2, max_num_seqs=2)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], SamplingParams(max_tokens=6))] == refs


def test_dequant_scratch_bytes_is_the_largest_weight_only_linear():
    """The engine's memory reserve holds the largest BF16 copy a weight-only linear makes at prefill sizes
    (the MLP's 96 x 64 weights here, x 2 bytes); other schemes make none."""
    from ingot.engine.config import dequant_scratch_bytes
    from ingot.models.loader import random_model

    llama = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    for scheme in ("int4-group", "int8-weight"):
        model = random_model(llama, scheme, "cpu", dtype=torch.bfloat16, seed=0)
        assert dequant_scratch_bytes(model) == 96 * 64 * 2, scheme
    assert dequant_scratch_bytes(random_model(llama, "int8-channel", "cpu", dtype=torch.bfloat16, seed=0)) == 0
