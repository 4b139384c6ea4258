"""Paged attention (torch reference) against a naive float64 attention over each sequence's full K/V.

Caches are filled with NaN before use and blocks are handed out in shuffled order: reading an unwritten slot, or a
block of another sequence, changes the result. Covers mixed prefill/decode batches, chunked prefill over cached
context, GQA, MLA's shared latent cache, sliding windows, padded rows, and the decode path's graph-safety (it runs on
the meta device, where any host sync or data-dependent shape raises).
"""

from __future__ import annotations

import math

import pytest
import torch

from ingot.layers.attention import (
    Attention,
    AttnMetadata,
    KVSpec,
    _prefill_attention,
    causal_attention,
    paged_attention,
    store_kv,
)

BS = 4  # tokens per cache block: small, so sequences span several blocks


def _batch(ctx_lens, q_lens, h, hkv, dk, dv, shared=False, pad_rows=0, window=None, dtype=torch.float32, seed=0):
    """Random K/V for every context token, written into a NaN-filled paged cache through store_kv; q for the last
    q_lens[b] tokens of each sequence. Returns (q, k_cache, v_cache, meta, k_full, v_full)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // BS) for c in ctx_lens) + 3
    k_cache = torch.full((num_blocks, BS, hkv, dk), float("nan"), dtype=dtype)
    v_cache = None if shared else torch.full((num_blocks, BS, hkv, dv), float("nan"), dtype=dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-c // BS) for c in ctx_lens) + 1
    k_full, v_full, tables, new_slots, qs = [], [], [], [], []
    for ctx, n in zip(ctx_lens, q_lens):
        k = torch.randn(ctx, hkv, dk, generator=g).to(dtype)
        v = k[..., :dv] if shared else torch.randn(ctx, hkv, dv, generator=g).to(dtype)
        blocks = [free.pop() for _ in range(-(-ctx // BS))]
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(ctx)])
        store_kv(k, None if shared else v, k_cache, v_cache, slots)
        k_full.append(k)
        v_full.append(v)
        tables.append(blocks + [blocks[0]] * (max_blocks - len(blocks)))  # padding entries point at a real block
        new_slots.append(slots[ctx - n :])
        qs.append(torch.randn(n, h, dk, generator=g).to(dtype))
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    seq_lens = list(ctx_lens)
    for _ in range(pad_rows):
        qs.append(torch.randn(1, h, dk, generator=g).to(dtype))
        new_slots.append(torch.tensor([-1]))
        cu.append(cu[-1] + 1)
        seq_lens.append(0)
        tables.append([0] * max_blocks)
    meta = AttnMetadata(
        cu_query_lens=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.cat(new_slots).long(),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(b - a for a, b in zip(cu, cu[1:])),
        max_seq_len=max(seq_lens),
    )
    return torch.cat(qs), k_cache, v_cache, meta, k_full, v_full


def _naive(q, k_full, v_full, q_lens, scale, window=None, pad_rows=0):
    """Float64 softmax(q k^T * scale) v per sequence; query i of a sequence of context c sits at c - n + i."""
    outs, start = [], 0
    for k, v, n in zip(k_full, v_full, q_lens):
        ctx, hkv = k.shape[0], k.shape[1]
        qb = q[start : start + n].double()
        start += n
        rep = qb.shape[1] // hkv
        kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qb, kk) * scale
        qpos = torch.arange(ctx - n, ctx)[:, None]
        kpos = torch.arange(ctx)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
    dv = v_full[0].shape[-1]
    outs.extend(torch.zeros(1, q.shape[1], dv, dtype=torch.float64) for _ in range(pad_rows))
    return torch.cat(outs)


def _scale(dk):
    return 1 / math.sqrt(dk)


def test_mixed_batch_prefill_chunk_and_decode_gqa():
    # fresh prefill of 5, a 3-token chunk over 6 cached tokens, two decodes (one of a 1-token sequence)
    ctx, qn = (5, 9, 11, 1), (5, 3, 1, 1)
    q, kc, vc, meta, kf, vf = _batch(ctx, qn, h=4, hkv=2, dk=16, dv=16, pad_rows=1)
    out = paged_attention(q, kc, vc, meta, _scale(16), 16)
    assert out.shape == (q.shape[0], 4, 16) and out.dtype == torch.float32
    ref = _naive(q, kf, vf, qn, _scale(16), pad_rows=1)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the padded row


@pytest.mark.parametrize("h, hkv, dk, dv, shared", [(4, 4, 16, 16, False), (8, 2, 32, 24, False), (4, 1, 24, 16, True)])
def test_decode_path_matches_naive_and_prefill_path(h, hkv, dk, dv, shared):
    ctx = (1, 4, 5, 13)
    q, kc, vc, meta, kf, vf = _batch(ctx, (1,) * 4, h, hkv, dk, dv, shared=shared, pad_rows=2)
    out = paged_attention(q, kc, vc, meta, _scale(dk), dv)  # max_query_len 1: the decode path
    ref = _naive(q, kf, vf, (1,) * 4, _scale(dk), pad_rows=2)
    assert out.shape == (6, h, dv)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    other = _prefill_attention(q, kc, vc, meta, _scale(dk), dv, None)
    assert (out - other).abs().max().item() < 1e-5


@pytest.mark.parametrize("qn", [(1, 1, 1), (6, 2, 1)])
def test_sliding_window(qn):
    ctx, window = (6, 10, 13), 3
    q, kc, vc, meta, kf, vf = _batch(ctx, qn, h=4, hkv=2, dk=16, dv=16)
    out = paged_attention(q, kc, vc, meta, _scale(16), 16, window=window)
    assert (out.double() - _naive(q, kf, vf, qn, _scale(16), window=window)).abs().max().item() < 1e-5
    assert (out.double() - _naive(q, kf, vf, qn, _scale(16))).abs().max().item() > 1e-3  # the window mattered


def test_bf16_decode():
    ctx = (3, 17, 30)
    q, kc, vc, meta, kf, vf = _batch(ctx, (1, 1, 1), h=8, hkv=2, dk=64, dv=64, dtype=torch.bfloat16)
    out = paged_attention(q, kc, vc, meta, _scale(64), 64)
    assert out.dtype == torch.bfloat16
    assert (out.double() - _naive(q, kf, vf, (1, 1, 1), _scale(64))).abs().max().item() < 2e-2  # bf16 output rounding


def test_store_kv_skips_padding_rows():
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(5, BS, 2, 8, generator=g), torch.randn(5, BS, 2, 6, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 6, generator=g)
    slots = torch.tensor([-1, 7, -1, 0])  # padding first: the redirect must not depend on row order
    store_kv(k, v, k_cache, v_cache, slots)
    fk, fv, bk, bv = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 6), before_k.view(-1, 2, 8), before_v.view(-1, 2, 6)
    assert torch.equal(fk[7], k[1]) and torch.equal(fk[0], k[3]) and torch.equal(fv[7], v[1]) and torch.equal(fv[0], v[3])
    untouched = [s for s in range(fk.shape[0]) if s not in (0, 7)]
    assert torch.equal(fk[untouched], bk[untouched]) and torch.equal(fv[untouched], bv[untouched])
    # an all-padding step (a CUDA-graph batch with no real rows) writes nothing at all
    store_kv(k, v, k_cache, v_cache, torch.full((4,), -1))
    assert torch.equal(fk[untouched], bk[untouched]) and torch.equal(fk[7], k[1]) and torch.equal(fk[0], k[3])


def test_store_kv_shared_and_errors():
    k_cache = torch.zeros(2, BS, 1, 6)
    k = torch.randn(3, 1, 6)
    store_kv(k, None, k_cache, None, torch.tensor([5, 6, -1]))
    assert torch.equal(k_cache.view(-1, 1, 6)[5:7], k[:2])
    with pytest.raises(ValueError, match="both"):
        store_kv(k, k, k_cache, None, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping has 2"):
        store_kv(k, None, k_cache, None, torch.tensor([0, 1]))


def test_decode_path_has_no_host_sync():
    """On the meta device every tensor has a shape but no data: .item(), .tolist(), nonzero or boolean-mask indexing
    raise there. The decode path (what a CUDA graph captures) runs; the prefill path, which loops on the host, does not."""
    b, h, hkv, dk, dv, blocks = 5, 8, 2, 32, 32, 7
    meta_dev = torch.device("meta")
    md = AttnMetadata(
        cu_query_lens=torch.empty(b + 1, dtype=torch.int32, device=meta_dev),
        seq_lens=torch.empty(b, dtype=torch.int32, device=meta_dev),
        slot_mapping=torch.empty(b, dtype=torch.int64, device=meta_dev),
        block_tables=torch.empty(b, blocks, dtype=torch.int32, device=meta_dev),
        max_query_len=1,
        max_seq_len=blocks * BS,
    )
    k_cache = torch.empty(20, BS, hkv, dk, device=meta_dev)
    v_cache = torch.empty(20, BS, hkv, dv, device=meta_dev)
    q, k, v = (torch.empty(b, n, d, device=meta_dev) for n, d in ((h, dk), (hkv, dk), (hkv, dv)))
    store_kv(k, v, k_cache, v_cache, md.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, md, 0.1, dv)
    assert out.shape == (b, h, dv) and out.device == meta_dev
    with pytest.raises((RuntimeError, NotImplementedError)):
        _prefill_attention(q, k_cache, v_cache, md, 0.1, dv, None)


@pytest.mark.parametrize("window", [None, 4])
def test_dense_causal_attention(window):
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 9, 6, 16, generator=g), torch.randn(2, 9, 3, 16, generator=g), torch.randn(2, 9, 3, 12, generator=g)
    out = causal_attention(q, k, v, 0.25, window)
    for b in range(2):
        ref = _naive(q[b], [k[b]], [v[b]], (9,), 0.25, window)
        assert (out[b].double() - ref).abs().max().item() < 1e-5


def test_attention_module_paths_and_cache_checks():
    attn = Attention(4, 2, 16, 16, 0.25)
    assert attn.spec == KVSpec(2, 16, 16, False)
    q, kc, vc, meta, kf, vf = _batch((6, 3), (2, 1), h=4, hkv=2, dk=16, dv=16)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        attn(q, torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), meta)
    with pytest.raises(ValueError, match="v_cache"):
        attn.bind_cache(kc, None)
    with pytest.raises(ValueError, match="k_cache"):
        attn.bind_cache(kc[..., :8], vc)
    # the module writes this step's K/V itself: hand it the new tokens' K/V, with the cache holding the past only
    new_k = torch.cat([kf[0][4:], kf[1][2:]])
    new_v = torch.cat([vf[0][4:], vf[1][2:]])
    kc.view(-1, 2, 16)[meta.slot_mapping] = float("nan")
    vc.view(-1, 2, 16)[meta.slot_mapping] = float("nan")
    attn.bind_cache(kc, vc)
    out = attn(q, new_k, new_v, meta)
    assert (out.double() - _naive(q, kf, vf, (2, 1), 0.25)).abs().max().item() < 1e-5
    mla = Attention(4, 1, 24, 16, 0.2, shared_kv=True)
    with pytest.raises(ValueError, match="v_cache must be None"):
        mla.bind_cache(torch.zeros(2, BS, 1, 24), torch.zeros(2, BS, 1, 16))
    with pytest.raises(ValueError, match="multiple"):
        Attention(6, 4, 8, 8, 1.0)
    with pytest.raises(ValueError, match="shared_kv"):
        KVSpec(1, 16, 24, True)


def _with_host_lengths(meta):
    cu = meta.cu_query_lens.tolist()
    return AttnMetadata(meta.cu_query_lens, meta.seq_lens, meta.slot_mapping, meta.block_tables, meta.max_query_len,
                        meta.max_seq_len, query_lens_host=tuple(b - a for a, b in zip(cu, cu[1:])),
                        seq_lens_host=tuple(meta.seq_lens.tolist()))


@pytest.mark.parametrize("ctx, qn", [
    ((6, 6, 6), (6, 6, 6)),  # fresh prompts of one length: one batched causal call, no mask
    ((7, 3, 12, 5, 1), (7, 3, 4, 1, 1)),  # uneven prompts, a chunk over cached context, decodes: masked + decode rows
    ((9,), (2,)),  # one chunk
])
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_plan_paths_match_naive(ctx, qn, window):
    q, kc, vc, meta, kf, vf = _batch(ctx, qn, h=4, hkv=2, dk=16, dv=12, pad_rows=1)
    ref = _naive(q, kf, vf, qn, _scale(16), window=window, pad_rows=1)
    for m in (meta, _with_host_lengths(meta)):
        out = paged_attention(q, kc, vc, m, _scale(16), 12, window=window)
        assert (out.double() - ref).abs().max().item() < 1e-5
        assert m.prefill_plan is not None  # built by the first call; a model's other layers reuse it
        assert (paged_attention(q, kc, vc, m, _scale(16), 12, window=window) - out).abs().max().item() == 0


def test_prefill_path_with_host_lengths_has_no_host_sync():
    """With the host copies of the lengths (what the engine passes), prefill and mixed steps run on the meta device:
    no .tolist() / .item() / data-dependent shape, per layer or per step."""
    meta_dev = torch.device("meta")
    qlens, ctxs = (5, 1, 3), (5, 9, 7)
    b, t, h, hkv, dk, blocks = 3, sum(qlens), 4, 2, 16, 4
    md = AttnMetadata(
        cu_query_lens=torch.empty(b + 1, dtype=torch.int32, device=meta_dev),
        seq_lens=torch.empty(b, dtype=torch.int32, device=meta_dev),
        slot_mapping=torch.empty(t, dtype=torch.int64, device=meta_dev),
        block_tables=torch.empty(b, blocks, dtype=torch.int32, device=meta_dev),
        max_query_len=5, max_seq_len=9, query_lens_host=qlens, seq_lens_host=ctxs,
    )
    k_cache = torch.empty(20, BS, hkv, dk, device=meta_dev)
    v_cache = torch.empty(20, BS, hkv, dk, device=meta_dev)
    q = torch.empty(t, h, dk, device=meta_dev)
    out = paged_attention(q, k_cache, v_cache, md, 0.1, dk)
    assert out.shape == (t, h, dk) and out.device == meta_dev


def test_prefill_groups_bound_the_padding():
    """A long chunk is not batched with many short ones (its length would pad them all): every group's padded query and
    context rows stay within PAD_FACTOR x its real rows (+ PAD_SLACK); results still match the naive attention."""
    from ingot.layers.attention import PAD_FACTOR, PAD_SLACK, PrefillPlan

    qlens, ctxs = [800] + [3] * 20, [800] + [3 + i % 4 for i in range(20)]
    groups = PrefillPlan._group(list(range(21)), qlens, ctxs)
    assert sorted(b for g in groups for b in g) == list(range(21)) and len(groups) == 2
    assert max(len(g) for g in groups) >= 19  # the short ones share one call
    for g in groups:
        assert len(g) * max(qlens[b] for b in g) <= PAD_FACTOR * sum(qlens[b] for b in g) + PAD_SLACK
        assert len(g) * max(ctxs[b] for b in g) <= PAD_FACTOR * sum(ctxs[b] for b in g) + PAD_SLACK
    ctx, qn = (300, 3, 4, 3, 310), (300, 3, 2, 3, 280)
    q, kc, vc, meta, kf, vf = _batch(ctx, qn, h=4, hkv=2, dk=16, dv=16)
    plan = PrefillPlan.build(meta)
    assert sorted(b for g in plan.groups for b in g.seqs.tolist()) == [0, 1, 2, 3, 4] and plan.decode_rows is None
    out = paged_attention(q, kc, vc, meta, _scale(16), 16)
    assert (out.double() - _naive(q, kf, vf, qn, _scale(16))).abs().max().item() < 1e-5


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_fresh_prompts_attend_over_their_own_rows(shared, window):
    """A step of whole fresh prompts of one length (a batch of new requests) attends over this step's k/v directly:
    the same output as reading the cache back, and the plan says so; any other step keeps the cache path."""
    ctx = (6, 6, 6)
    q, kc, vc, meta, kf, vf = _batch(ctx, ctx, h=4, hkv=1 if shared else 2, dk=16, dv=12, shared=shared)
    meta = _with_host_lengths(meta)
    k_new = torch.cat(kf)
    v_new = None if shared else torch.cat(vf)
    ref = _naive(q, kf, vf, ctx, _scale(16), window=window)
    via_cache = paged_attention(q, kc, vc, meta, _scale(16), 12, window=window)
    direct = paged_attention(q, kc, vc, meta, _scale(16), 12, window=window, new_kv=(k_new, v_new))
    assert meta.prefill_plan.dense == (3, 6)
    assert (direct.double() - ref).abs().max().item() < 1e-5
    assert (direct - via_cache).abs().max().item() < 1e-6
    # a padded row, or a chunk over cached context: not dense
    for c, n, pad in (((6, 6), (6, 6), 1), ((6, 9), (6, 6), 0)):
        q2, kc2, vc2, m2, kf2, vf2 = _batch(c, n, h=4, hkv=2, dk=16, dv=12, pad_rows=pad)
        m2 = _with_host_lengths(m2)
        out = paged_attention(q2, kc2, vc2, m2, _scale(16), 12, new_kv=(torch.randn(q2.shape[0], 2, 16), None))
        assert m2.prefill_plan.dense is None
        assert (out.double() - _naive(q2, kf2, vf2, n, _scale(16), pad_rows=pad)).abs().max().item() < 1e-5


def test_out_quant_is_ignored_off_the_decode_kernel():
    """Prefill steps and CPU decodes return the plain output whatever out_quant says (the linear quantizes)."""
    from ingot.layers.linear import ActQuant

    quant = ActQuant("int8", 16)
    for q_lens in ([1, 1], [3, 1]):
        q, kc, vc, meta, _, _ = _batch([6, 9], q_lens, 4, 2, 16, 16)
        out = paged_attention(q, kc, vc, meta, _scale(16), 16, out_quant=quant)
        assert isinstance(out, torch.Tensor) and out.shape == (sum(q_lens), 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [128, None, 64], ids=["per-head", "per-token", "two-heads"])
def test_cuda_decode_emits_o_projs_int8_input(group):
    """On CUDA a decode step whose out_quant is int8 per head or per token comes back quantized, bit for bit as the
    linear would have quantized the plain output; a group that spans two heads gets the plain output."""
    from ingot.kernels.act_quant import per_token_group_quant, per_token_quant_int8
    from ingot.layers.linear import ActQuant, QuantizedActivation

    q, kc, vc, meta, _, _ = _batch([30, 7, 130], [1, 1, 1], 32, 8, 128, 128, dtype=torch.bfloat16, pad_rows=1)
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    meta = AttnMetadata(**{f: getattr(meta, f).cuda() if isinstance(getattr(meta, f), torch.Tensor)
                           else getattr(meta, f) for f in ("cu_query_lens", "seq_lens", "slot_mapping",
                                                           "block_tables", "max_query_len", "max_seq_len")})
    plain = paged_attention(q, kc, vc, meta, _scale(128), 128)
    quant = ActQuant("int8", group)
    out = paged_attention(q, kc, vc, meta, _scale(128), 128, out_quant=quant)
    if group == 64:
        assert isinstance(out, torch.Tensor) and torch.equal(out, plain)
        return
    assert isinstance(out, QuantizedActivation) and out.quant == quant and out.dtype == torch.bfloat16
    flat = plain.flatten(1)
    want_q, want_s = per_token_group_quant(flat, "int8", group_size=128) if group == 128 else per_token_quant_int8(flat)
    assert torch.equal(out.x_q, want_q) and torch.equal(out.x_s, want_s)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 128, "plain"], ids=["per-token", "per-head", "plain"])
def test_cuda_decode_rotates_and_stores_in_the_attention_kernel(group, monkeypatch):
    """Attention.forward of a CUDA decode step with rope: the decode kernel's own rotary and cache write give the
    bits of rope_store_kv's launch then the kernel (the path the module took before), output and caches alike."""
    import ingot.kernels.attention as kernels
    from ingot.layers.linear import ActQuant, QuantizedActivation
    from ingot.layers.rotary import RopeScaling, RotaryEmbedding

    q, kc, vc, meta, _, _ = _batch([30, 7, 130], [1, 1, 1], 32, 8, 128, 128, dtype=torch.bfloat16, pad_rows=1)
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    meta = AttnMetadata(**{f: getattr(meta, f).cuda() if isinstance(getattr(meta, f), torch.Tensor)
                           else getattr(meta, f) for f in ("cu_query_lens", "seq_lens", "slot_mapping",
                                                           "block_tables", "max_query_len", "max_seq_len")})
    g = torch.Generator().manual_seed(7)
    k = torch.randn(q.shape[0], 8, 128, generator=g).to(torch.bfloat16).cuda()
    v = torch.randn(q.shape[0], 8, 128, generator=g).to(torch.bfloat16).cuda()
    rotary = RotaryEmbedding(128, RopeScaling.from_hf_config({"rope_theta": 500000.0}))
    rope = rotary((meta.seq_lens.long() - 1).clamp(min=0))
    quant = None if group == "plain" else ActQuant("int8", group)
    results = []
    for fused in (True, False):
        if not fused:  # the module's path before: rope_store_kv's launch, then the kernel
            monkeypatch.setattr(kernels, "rope_supported", lambda q, v_cache: False)
        attn = Attention(32, 8, 128, 128, _scale(128))
        attn.bind_cache(kc.clone(), vc.clone())
        out = attn(q, k, v, meta, rope, quant)
        assert isinstance(out, QuantizedActivation) == (quant is not None)
        results.append(((out.x_q, out.x_s) if quant else (out,), attn.k_cache, attn.v_cache))
    (outs, kc1, vc1), (want, kc2, vc2) = results
    assert all(torch.equal(a, b) for a, b in zip(outs, want))
    assert torch.equal(kc1.nan_to_num(), kc2.nan_to_num()) and torch.equal(vc1.nan_to_num(), vc2.nan_to_num())
