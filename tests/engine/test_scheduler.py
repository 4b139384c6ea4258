"""BlockAllocator and Scheduler: requests join and leave between steps, token budget and chunked prefill,
max_num_seqs, preemption by recompute when blocks run out."""

from __future__ import annotations

import pytest

from ingot.engine.kv_cache import BlockAllocator, kv_bytes_per_token
from ingot.engine.sampling import SamplingParams
from ingot.engine.scheduler import Scheduler, SchedulerConfig
from ingot.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_model_len=32):
    alloc = BlockAllocator(num_blocks)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, block_size), alloc), alloc


def seq(i, n):
    return Sequence(i, list(range(100 * i, 100 * i + n)), SamplingParams())


def step(sched, token=1):
    """schedule, then pretend the model sampled `token` for every sequence that samples."""
    out = sched.schedule()
    sched.update(out, [token] * sum(s.samples for s in out.scheduled))
    return out


def plan(out):
    return [(s.seq.seq_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def test_allocator():
    a = BlockAllocator(3)
    ids = a.allocate(2)
    assert len(set(ids)) == 2 and a.num_free == 1
    with pytest.raises(RuntimeError, match="3 blocks asked, 1 free"):
        a.allocate(3)
    a.free(ids)
    assert a.num_free == 3
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free([ids[0]])


def test_kv_bytes_per_token():
    from types import SimpleNamespace as S

    llama = [S(num_kv_heads=8, head_dim_k=128, head_dim_v=128, shared_kv=False)] * 32
    mla = [S(num_kv_heads=1, head_dim_k=576, head_dim_v=512, shared_kv=True)] * 61
    import torch

    assert kv_bytes_per_token(llama, torch.bfloat16) == 131072
    assert kv_bytes_per_token(mla, torch.bfloat16) == 61 * 576 * 2


def test_join_and_leave_between_steps():
    sched, alloc = make()
    a, b = seq(1, 5), seq(2, 3)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [(1, 0, 5, True), (2, 0, 3, True)]  # both prefilled in one step
    assert len(a.block_table) == 2 and len(b.block_table) == 1  # 5 tokens in blocks of 4
    assert plan(step(sched)) == [(1, 5, 1, True), (2, 3, 1, True)]  # both decode
    c = seq(3, 6)
    sched.add(c)
    out = step(sched)
    assert plan(out) == [(1, 6, 1, True), (2, 4, 1, True), (3, 0, 6, True)]  # c joins: mixed prefill + decode
    assert not out.is_decode
    free_before = alloc.num_free
    blocks_b = len(b.block_table)
    sched.finish(b, "stop")  # b leaves
    assert b.status is SequenceStatus.FINISHED and alloc.num_free == free_before + blocks_b
    out = step(sched)
    assert plan(out) == [(1, 7, 1, True), (3, 6, 1, True)] and out.is_decode


def test_token_budget_chunks_long_prompts():
    sched, _ = make(budget=10)
    a, b = seq(1, 8), seq(2, 8)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [(1, 0, 8, True), (2, 0, 2, False)]  # b's prompt cut at the budget, no sample
    assert b.num_computed_tokens == 2 and b.num_output_tokens == 0
    assert plan(step(sched)) == [(1, 8, 1, True), (2, 2, 6, True)]  # the rest of b's prompt, then it samples
    assert b.num_output_tokens == 1
    sched2, _ = make(budget=4)
    sched2.add(seq(1, 10))
    assert [plan(step(sched2)) for _ in range(3)] == [[(1, 0, 4, False)], [(1, 4, 4, False)], [(1, 8, 2, True)]]


def test_max_num_seqs_keeps_the_rest_waiting():
    sched, _ = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(i, 2))
    assert [p[0] for p in plan(step(sched))] == [0, 1]
    assert len(sched.waiting) == 1
    sched.finish(sched.running[0], "stop")
    assert [p[0] for p in plan(step(sched))] == [1, 2]


def test_preemption_recomputes_the_latest_and_keeps_its_tokens():
    # 4 blocks of 4 tokens: two 7-token prompts take 2 blocks each; computing position 8 needs a 5th block.
    sched, alloc = make(num_blocks=4, block_size=4, max_model_len=16)
    a, b = seq(1, 7), seq(2, 7)
    sched.add(a)
    sched.add(b)
    step(sched, token=11)  # both prefilled (positions 0-6); each now has 8 tokens (7 + 1 sampled)
    step(sched, token=12)  # both compute position 7, the last slot of their 2nd block
    assert alloc.num_free == 0
    out = step(sched, token=13)  # a computes position 8 -> needs a 3rd block: b (latest admitted) is preempted
    assert [s.seq_id for s in out.preempted] == [2] and plan(out) == [(1, 8, 1, True)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.token_ids == list(range(200, 207)) + [11, 12] and b.num_preemptions == 1  # its tokens are kept
    assert sched.waiting[0] is b and alloc.num_free == 1
    out = step(sched, token=14)  # a decodes; b needs 3 blocks for its 9 tokens, 1 is free: it keeps waiting
    assert plan(out) == [(1, 9, 1, True)]
    sched.finish(a, "length")
    out = step(sched, token=15)
    assert plan(out) == [(2, 0, 9, True)]  # b recomputes prompt + its 2 earlier tokens, then samples the next
    assert b.output_token_ids == [11, 12, 15]


def test_the_last_running_sequence_preempts_itself():
    # 3 blocks of 4: a and b take one each for their 4-token prompts; both need a 2nd for position 4, one is free.
    sched, alloc = make(num_blocks=3, block_size=4, max_model_len=12)
    a, b = seq(1, 4), seq(2, 4)
    sched.add(a)
    sched.add(b)
    step(sched)
    out = step(sched)
    assert plan(out) == [(1, 4, 1, True)] and [s.seq_id for s in out.preempted] == [2]
    assert len(a.block_table) == 2 and alloc.num_free == 1 and sched.waiting[0] is b


def test_refuses_pools_and_prompts_that_cannot_finish():
    with pytest.raises(ValueError, match="fewer than max_model_len 64"):
        make(num_blocks=4, block_size=4, max_model_len=64)
    sched, _ = make(max_model_len=8)
    with pytest.raises(ValueError, match="prompt of 8 tokens"):
        sched.add(seq(1, 8))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(4, 0, 8, 4)
