"""Overlapped steps (EngineConfig.async_steps): step t + 1 is queued before step t's tokens are read, its pending
tokens come from the device, and the outputs are exactly those of the engine that reads every step first."""

from __future__ import annotations

import torch

from ingot.engine import LLM, SamplingParams
from ingot.engine.decode_graphs import PendingTokens
from ingot.engine.sampling import TokenReadback
from ingot.engine.sequence import Sequence

from toy import ToyLM, greedy_reference

PROMPTS = [[1, 2, 3], [5] * 17, list(range(7, 29)), [40], [3, 1, 4, 1, 5, 9, 2, 6]]


def _engine(model, overlap: bool, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_model_len", 64)
    return LLM.from_model(model, async_steps=overlap, **kw)


def _params(stop_tok: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=20),
        SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,)),  # stops early: seen one step late
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=14, temperature=1.2, top_k=10, seed=11),
        SamplingParams(max_tokens=3),
    ]


def _outputs(llm: LLM, params) -> list[tuple[list[int], str]]:
    return [(o.token_ids, o.finish_reason) for o in llm.generate(PROMPTS, params)]


def test_overlap_gives_the_same_outputs_as_reading_every_step():
    model = ToyLM()
    ref = greedy_reference(model, PROMPTS[1], 20)
    params = _params(stop_tok=ref[6])
    for kw in ({}, {"max_num_batched_tokens": 8, "max_num_seqs": 4}, {"num_kv_blocks": 16, "max_num_seqs": 4}):
        sync = _outputs(_engine(model, False, **kw), params)
        llm = _engine(model, True, **kw)
        assert _outputs(llm, params) == sync, kw
        assert sync[1][1] == "stop" and len(sync[1][0]) < 20  # the stop token did end a request early
        assert llm.kv_cache.allocator.num_free == llm.kv_cache.num_blocks  # every block returned
    assert any(o.num_preemptions for o in _engine(model, True, num_kv_blocks=16, max_num_seqs=4).generate(
        PROMPTS, params))  # the tight cache did preempt


def _computed_rows(llm: LLM, params) -> tuple[dict[int, int], list]:
    """Rows computed per sequence id over one generate, and the outputs."""
    rows: dict[int, int] = {}
    execute = llm.runner.execute

    def spy(out, pending=None):
        for s in out.scheduled:
            rows[s.seq.seq_id] = rows.get(s.seq.seq_id, 0) + s.num_new_tokens
        return execute(out, pending)

    llm.runner.execute = spy
    first = llm._next_id
    outs = llm.generate(PROMPTS, params)
    llm.runner.execute = execute
    return {k - first: v for k, v in rows.items()}, outs


def test_overlap_wastes_one_row_only_on_stops_seen_late():
    model = ToyLM()
    ref = greedy_reference(model, PROMPTS[1], 20)
    params = _params(stop_tok=ref[6])
    rows, outs = _computed_rows(_engine(model, True), params)
    for i, (o, p) in enumerate(zip(outs, params)):
        needed = len(PROMPTS[i]) + len(o.token_ids) - 1  # the last token is sampled, never fed back
        extra = 1 if o.finish_reason == "stop" else 0  # max_tokens is known ahead: nothing queued past it
        assert rows[i] == needed + extra, (i, rows[i], needed, o.finish_reason)
    sync_rows, _ = _computed_rows(_engine(model, False), params)
    assert all(sync_rows[i] == len(PROMPTS[i]) + len(o.token_ids) - 1 for i, o in enumerate(outs))


def test_the_next_step_is_queued_before_the_tokens_are_read():
    model = ToyLM()
    llm = _engine(model, True)
    events = []
    execute, read = llm.runner.execute, TokenReadback.read

    def spy_execute(out, pending=None):
        events.append(("execute", pending is not None))
        return execute(out, pending)

    def spy_read(self):
        events.append(("read", None))
        return read(self)

    llm.runner.execute = spy_execute
    TokenReadback.read = spy_read
    try:
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=5))[0]
    finally:
        TokenReadback.read = read
    assert out.token_ids == greedy_reference(model, PROMPTS[0], 5)
    # prefill, then 4 decodes each queued (with the token still pending) before the previous step is read
    assert events == [("execute", False)] + [("execute", True), ("read", None)] * 4 + [("read", None)]


def test_pending_tokens_copy_in_any_order():
    a, b, c = (Sequence(i, [1], SamplingParams()) for i in range(3))
    pending = PendingTokens(torch.tensor([10, 11, 12]), [a, b, c])
    ids = torch.zeros(4, dtype=torch.int64)
    pending.copy_into(ids, [0, 1, 2], [a, b, c])  # steady decoding: one slice copy
    assert ids.tolist() == [10, 11, 12, 0]
    ids.zero_()
    pending.copy_into(ids, [3, 0], [a, c])  # other rows, other order
    assert ids.tolist() == [12, 0, 0, 10]
    stranger = Sequence(9, [1], SamplingParams())
    try:
        pending.copy_into(ids, [1], [stranger])
    except RuntimeError as error:
        assert "did not sample" in str(error)
    else:
        raise AssertionError("a pending token from nowhere was accepted")
