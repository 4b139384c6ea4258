"""What an eager decode step (CPU, or CUDA without graphs) computes, counted rather than timed: every prompt token
goes through the model once, a decode step forwards one token per sequence, and its attention reads the step's own
blocks, not max_model_len of them.

Guards the CPU regression of e771a9a: the persistent decode buffers handed the eager forward a block table of
max_model_len / block_size columns (128 with the CPU default of 2048), and the torch decode attention gathers and
masks every column it is given: a 16-token prompt attended over 2048 slots in every layer of every step
(SmolLM2-135M, 64 new tokens: 18.5 against 30.8 tokens/s before that commit; 5.9 against 29.7 at
max_model_len 8192; src/ingot/engine/NOTES.md)."""

from __future__ import annotations

import math

import pytest

import ingot.layers.attention as attention
from ingot.engine import LLM, SamplingParams

from toy import ToyLM, greedy_reference

BS = 4


@pytest.mark.parametrize("batch", [1, 3])
def test_eager_decode_attends_over_its_own_blocks(monkeypatch, batch):
    model = ToyLM(max_pos=256)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 16)), [40, 41]][:batch]
    new = 10
    decodes: list[tuple[int, int, int, int]] = []  # (rows, table columns, max_seq_len, longest context)
    inner = attention._decode_attention

    def spy(q, k_cache, v_cache, meta, scale, head_dim_v, window):
        decodes.append((q.shape[0], meta.block_tables.shape[1], meta.max_seq_len, int(meta.seq_lens.max())))
        return inner(q, k_cache, v_cache, meta, scale, head_dim_v, window)

    monkeypatch.setattr(attention, "_decode_attention", spy)
    forwarded: list[int] = []
    forward = model.forward

    def counting_forward(input_ids, positions, meta):
        forwarded.append(input_ids.shape[0])
        return forward(input_ids, positions, meta)

    monkeypatch.setattr(model, "forward", counting_forward)
    llm = LLM.from_model(model, block_size=BS, max_model_len=256, max_num_seqs=4)
    assert llm.runner.graphs is None and llm.runner.decode.max_blocks == 64
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, new) for p in prompts]

    # one prefill step of every prompt, then new - 1 decode steps of one token per sequence: nothing recomputed
    assert forwarded == [sum(map(len, prompts))] + [batch] * (new - 1)
    assert len(decodes) == (new - 1) * len(model.blocks)
    for rows, width, max_seq_len, longest in decodes:
        assert rows == batch
        assert width == math.ceil(longest / BS), (width, longest)  # the widest table of the step, not 64 columns
        assert max_seq_len == longest


def test_graph_metadata_keeps_the_full_table():
    """CUDA graphs capture DecodeBuffers.meta(b) once and replay it for every later step: it must span every table
    column and max_model_len (only the eager decode narrows it)."""
    from ingot.engine.decode_graphs import DecodeBuffers
    import torch

    buf = DecodeBuffers(4, 256, BS, torch.device("cpu"))
    full = buf.meta(2)
    assert tuple(full.block_tables.shape) == (2, 64) and full.max_seq_len == 256
    narrow = buf.meta(2, 3, 10)
    assert tuple(narrow.block_tables.shape) == (2, 3) and narrow.max_seq_len == 10
    assert narrow.block_tables.data_ptr() == full.block_tables.data_ptr()  # a view of the same buffer
