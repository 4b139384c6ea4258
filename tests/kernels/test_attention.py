"""paged_decode_attention against plain attention over each sequence's gathered K/V (and, where it exists, the
model's torch reference ingot.layers.attention.paged_attention). CPU: Triton's interpreter on small shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ingot.kernels.act_quant import per_token_group_quant, per_token_quant_int8, quantize_row_chunks
from ingot.kernels import attention as attention_kernels
from ingot.kernels.attention import (NewKV, _counters, _d_tiles, default_num_splits, int8_output_supported,
                                    paged_decode_attention, paged_decode_attention_int8,
                                    paged_decode_attention_maxima)
from ingot.kernels.kv_store import rope_store_kv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(b, h, hkv, dk, dv, seq_lens, page=16, shared=False, dtype=torch.bfloat16, seed=0, device=DEV):
    """Random q and a paged cache whose blocks are handed out in shuffled order. Unused blocks hold NaN, unused
    block-table entries point past the cache: a kernel that reads beyond a row's seq_len shows it."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [math.ceil(n / page) for n in seq_lens]
    max_blocks = max(1, max(blocks_per))
    num_blocks = sum(blocks_per) + 3
    k_cache = torch.full((num_blocks, page, hkv, dk), float("nan"), dtype=dtype)
    v_cache = None if shared else torch.full((num_blocks, page, hkv, dv), float("nan"), dtype=dtype)
    block_tables = torch.full((b, max_blocks), 10**6, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=g)
    keys, values, used = [], [], 0
    for i, n in enumerate(seq_lens):
        ids = order[used : used + blocks_per[i]]
        used += blocks_per[i]
        block_tables[i, : len(ids)] = ids.to(torch.int32)
        k = torch.randn(n, hkv, dk, generator=g).to(dtype)
        v = k[..., :dv] if shared else torch.randn(n, hkv, dv, generator=g).to(dtype)
        for j in range(n):  # token j of row i: block ids[j // page], slot j % page
            k_cache[ids[j // page], j % page] = k[j]
            if not shared:
                v_cache[ids[j // page], j % page] = v[j]
        keys.append(k)
        values.append(v)
    q = torch.randn(b, h, dk, generator=g).to(dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(block_tables), to(seq), keys, values


def plain_attention(q, keys, values, scale):
    """Each row's query against its own contiguous K/V with F.scaled_dot_product_attention (fp32), GQA by repeat."""
    b, h, _ = q.shape
    dv = values[0].shape[-1] if values else 0
    out = torch.zeros(b, h, dv)
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.shape[0] == 0:
            continue
        rep = h // k.shape[1]
        kk = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)  # (H, n, Dk)
        vv = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)  # (H, n, Dv)
        out[i] = F.scaled_dot_product_attention(q[i].float().cpu()[:, None], kk, vv, scale=scale)[:, 0]
    return out


def check(q, k_cache, v_cache, bt, seq, keys, values, dv, **kw):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq, scale, dv, **kw)
    assert out.shape == (q.shape[0], q.shape[1], dv) and out.dtype == q.dtype
    ref = plain_attention(q, keys, values, scale)
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2  # bf16: p cast to bf16 for the p @ v dot (and a bf16 output)
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "h,hkv,dk,dv",
    [(9, 3, 64, 64), (4, 4, 32, 32), (8, 1, 100, 72), (20, 2, 24, 40)],  # SmolLM2 GQA, MHA, MQA ragged, group > 16
)
def test_matches_plain_attention(h, hkv, dk, dv, splits):
    case = make_case(3, h, hkv, dk, dv, [1, 37, 16], page=16, seed=h + dk)
    check(*case, dv, num_splits=splits, block_n=16)


class LaunchSpy:
    """Stands in for a triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def combine_apart(monkeypatch):
    """Every split combine runs as its own launch (_combine_kernel), as MLA's 16 x 512 head groups do at real size:
    COMBINE_ELEMS below any head group's partials. Returns the decode kernel's spy."""
    monkeypatch.setattr(attention_kernels, "COMBINE_ELEMS", 1)
    spy = LaunchSpy(attention_kernels._decode_kernel)
    monkeypatch.setattr(attention_kernels, "_decode_kernel", spy)
    return spy


@pytest.mark.parametrize("h,hkv,dk,dv", [(9, 3, 64, 64), (20, 2, 24, 40), (4, 1, 100, 72)])
def test_combine_launch_matches_plain_attention(h, hkv, dk, dv, combine_apart):
    case = make_case(3, h, hkv, dk, dv, [1, 37, 0], page=16, seed=h + dk, shared=dk == 100)
    check(*case, dv, num_splits=3, block_n=16)
    assert [c["COMBINE"] for c in combine_apart.calls] == [False]
    q, kc, vc, bt, seq, _, _ = case
    if vc is not None:  # o_proj's int8 input, quantized by its own launch after the combine
        for group in (dv, None) if dv & (dv - 1) == 0 else ():
            check_int8(q, kc, vc, bt, seq, dv, group, num_splits=3, block_n=16)


def check_int8(q, k_cache, v_cache, bt, seq, dv, group, **kw):
    """The quantizing decode against the plain decode then the linear's own quantization, per head (group = Dv) or
    per token (group None): bit for bit (one kernel combines the splits either way)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    x_q, x_s = paged_decode_attention_int8(q, k_cache, v_cache, bt, seq, scale, dv, group, **kw)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq, scale, dv, **kw)
    flat = out.flatten(1)
    want_q, want_s = per_token_quant_int8(flat) if group is None else per_token_group_quant(flat, "int8", group_size=dv)
    assert x_q.shape == (q.shape[0], q.shape[1] * dv) and x_q.dtype == torch.int8
    assert x_s.shape == want_s.shape and x_s.dtype == torch.float32
    assert torch.equal(x_q, want_q) and torch.equal(x_s, want_s)
    return x_q, x_s


@pytest.mark.parametrize("group", [32, None], ids=["per-head", "per-token"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("h,hkv,dtype", [(9, 3, torch.bfloat16), (4, 4, torch.float16), (20, 2, torch.float32)])
def test_int8_output_equals_quantizing_the_output(h, hkv, dtype, splits, group):
    """One split (plain kernel, then the quantization launch) and three (the combine quantizes); GQA groups of 3
    and > 16 heads, a padding row (seq_len 0: zeros, scale 0)."""
    q, kc, vc, bt, seq, _, _ = make_case(4, h, hkv, 32, 32, [1, 37, 0, 16], page=16, dtype=dtype, seed=h)
    x_q, x_s = check_int8(q, kc, vc, bt, seq, 32, group, num_splits=splits, block_n=16)
    assert torch.equal(x_s[2], torch.zeros_like(x_s[2])) and x_q[1].abs().sum() > 0


def check_maxima(q, k_cache, v_cache, bt, seq, dv, **kw):
    """The maxima form against the plain decode: the same output bits, flattened, and maxima whose max is each row's
    max |out| - what per-token quantization needs (quantize_row_chunks from them equals per_token_quant_int8)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    flat, maxima = paged_decode_attention_maxima(q, k_cache, v_cache, bt, seq, scale, dv, **kw)
    out = paged_decode_attention(q, k_cache, v_cache, bt, seq, scale, dv, **kw)
    assert torch.equal(flat, out.flatten(1))
    assert maxima.dtype == torch.float32 and maxima.shape[0] == q.shape[0]
    assert torch.equal(maxima.amax(-1), out.flatten(1).float().abs().amax(-1))
    x_q, x_s = quantize_row_chunks(flat, maxima)
    want_q, want_s = per_token_quant_int8(out.flatten(1))
    assert torch.equal(x_q, want_q) and torch.equal(x_s, want_s)
    return maxima


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("h,hkv,dv,dtype", [(9, 3, 32, torch.bfloat16), (4, 4, 32, torch.float16),
                                            (20, 2, 40, torch.float32)])
def test_maxima_output_equals_the_plain_output(h, hkv, dv, dtype, splits):
    """Each head group's maximum in the same launch (one per group: [B, Hkv * head blocks]), GQA groups of 3 and of
    > 16 heads (two head blocks), a ragged Dv, a padding row (maxima 0)."""
    q, kc, vc, bt, seq, _, _ = make_case(4, h, hkv, 32, dv, [1, 37, 0, 16], page=16, dtype=dtype, seed=h + splits)
    maxima = check_maxima(q, kc, vc, bt, seq, dv, num_splits=splits, block_n=16)
    assert maxima.shape == (4, hkv * -(-(h // hkv) // 16)) and torch.equal(maxima[2], torch.zeros_like(maxima[2]))


def test_maxima_output_with_the_combine_launch(combine_apart):
    """Head groups combined by their own launch: one maximum per row, taken after it."""
    q, kc, vc, bt, seq, _, _ = make_case(3, 9, 3, 64, 64, [1, 37, 0], page=16, seed=7)
    assert check_maxima(q, kc, vc, bt, seq, 64, num_splits=3, block_n=16).shape == (3, 1)
    assert [c["COMBINE"] for c in combine_apart.calls] == [False, False]  # the maxima form, the plain one


def test_int8_output_checks_its_arguments():
    q, kc, vc, bt, seq, _, _ = make_case(2, 4, 2, 48, 40, [3, 5], page=8)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention_int8(q, kc, vc, bt, seq, 0.1, 40, 40)
    q, kc, vc, bt, seq, _, _ = make_case(2, 4, 2, 32, 32, [3, 5], page=8)
    with pytest.raises(ValueError, match="group_size 64"):
        paged_decode_attention_int8(q, kc, vc, bt, seq, 0.1, 32, 64)
    assert int8_output_supported(128, 128) and int8_output_supported(128, None)
    assert not int8_output_supported(8, 8)  # below one tile: BLOCK_DV would not be the head
    assert not int8_output_supported(96, 96)


def rope_case(h, hkv, d, seq_lens, page=16, dtype=torch.bfloat16, seed=0, device=DEV):
    """make_case plus a decode step's new token per row: unrotated q / k, v, cos / sin of position seq_len - 1, and
    the slot of that position (-1 for a seq_len 0 padding row). The cache's slot for it holds stale finite data."""
    q, kc, vc, bt, seq, _, _ = make_case(len(seq_lens), h, hkv, d, d, seq_lens, page=page, dtype=dtype, seed=seed,
                                         device=device)
    g = torch.Generator().manual_seed(seed + 1)
    b = len(seq_lens)
    k = torch.randn(b, hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(b, hkv, d, generator=g).to(dtype).to(device)
    pos = torch.tensor([max(n - 1, 0) for n in seq_lens], dtype=torch.float32)
    angles = pos[:, None] * (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d))[None, :]
    slots = torch.tensor([-1 if n == 0 else int(bt[i, (n - 1) // page]) * page + (n - 1) % page
                          for i, n in enumerate(seq_lens)], dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        if n:
            kc[int(bt[i, (n - 1) // page]), (n - 1) % page] = 7.0  # stale: the kernel must write the new token
            vc[int(bt[i, (n - 1) // page]), (n - 1) % page] = -7.0
    new = NewKV(k, v, angles.cos().to(device), angles.sin().to(device), slots.to(device))
    return q, kc, vc, bt, seq, new


@pytest.mark.parametrize("quant", [None, "head", "token", "maxima"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("h,hkv,d,dtype", [(9, 3, 32, torch.bfloat16), (20, 2, 16, torch.float16),
                                           (4, 4, 64, torch.bfloat16)])
def test_new_kv_equals_rope_store_kv_then_attention(h, hkv, d, dtype, splits, quant):
    """The kernel's own rotary + cache write against rope_store_kv's launch then the plain call: the same output
    bits and the same caches, GQA of 3 and of 10 heads (a group > 16: two head blocks write the same token), a
    padding row (slot -1, seq_len 0), a row whose new token opens a page."""
    q, kc, vc, bt, seq, new = rope_case(h, hkv, d, [5, 0, 33, 17], seed=h)
    scale = 1.0 / math.sqrt(d)
    kc2, vc2 = kc.clone(), vc.clone()
    q_rot, _ = rope_store_kv(q, new.k, new.v, new.cos, new.sin, kc2, vc2, new.slot_mapping)
    args, kw = (bt, seq, scale, d), dict(num_splits=splits, block_n=16)
    if quant is None:
        want = paged_decode_attention(q_rot, kc2, vc2, *args, **kw)
        got = paged_decode_attention(q, kc, vc, *args, **kw, new_kv=new)
    elif quant == "maxima":
        want = paged_decode_attention_maxima(q_rot, kc2, vc2, *args, **kw)
        got = paged_decode_attention_maxima(q, kc, vc, *args, **kw, new_kv=new)
    else:
        group = d if quant == "head" else None
        want = paged_decode_attention_int8(q_rot, kc2, vc2, *args, group, **kw)
        got = paged_decode_attention_int8(q, kc, vc, *args, group, **kw, new_kv=new)
    for a, b in zip(got if quant else (got,), want if quant else (want,)):
        assert torch.equal(a, b)
    assert torch.equal(kc.nan_to_num(), kc2.nan_to_num()) and torch.equal(vc.nan_to_num(), vc2.nan_to_num())
    assert torch.equal(kc.isnan(), kc2.isnan())  # nothing written outside the new tokens' slots


def test_new_kv_checks_its_arguments():
    q, kc, vc, bt, seq, new = rope_case(4, 2, 32, [3, 5], page=8)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        paged_decode_attention(q, kc, None, bt, seq, 0.1, 32, new_kv=new)
    with pytest.raises(ValueError, match="cos / sin must be float32"):
        paged_decode_attention(q, kc, vc, bt, seq, 0.1, 32, new_kv=new._replace(cos=new.cos[:, :8]))
    with pytest.raises(ValueError, match=r"k must be \[2, 2, 32\]"):
        paged_decode_attention(q, kc, vc, bt, seq, 0.1, 32, new_kv=new._replace(k=new.k[:, :1]))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        paged_decode_attention(q, kc, vc, bt, seq, 0.1, 32, new_kv=new._replace(slot_mapping=new.slot_mapping[:1]))
    with pytest.raises(TypeError, match="must be a NewKV"):
        paged_decode_attention(q, kc, vc, bt, seq, 0.1, 32, new_kv=tuple(new))


def test_counters_are_left_zero_and_large_batches_take_several_launches(monkeypatch):
    """Every launch resets the arrival counters it used; a batch beyond the counter buffer runs in row chunks with
    the same result (the buffer shrunk to 7 counters: 2 rows of 2 head groups + their row counters a launch)."""
    q, kc, vc, bt, seq, _, _ = make_case(5, 8, 2, 32, 32, [3, 40, 0, 17, 9], page=8, seed=2)
    scale = 0.2
    whole = paged_decode_attention_int8(q, kc, vc, bt, seq, scale, 32, None, num_splits=3, block_n=16)
    plain = paged_decode_attention(q, kc, vc, bt, seq, scale, 32, num_splits=3, block_n=16)
    assert not _counters(q.device).any()
    monkeypatch.setattr(attention_kernels, "MAX_COUNTERS", 7)
    launches = []
    launch = attention_kernels._launch
    monkeypatch.setattr(attention_kernels, "_launch", lambda q, *a: launches.append(q.shape[0]) or launch(q, *a))
    chunked = paged_decode_attention_int8(q, kc, vc, bt, seq, scale, 32, None, num_splits=3, block_n=16)
    assert launches == [2, 2, 1]
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert torch.equal(plain, paged_decode_attention(q, kc, vc, bt, seq, scale, 32, num_splits=3, block_n=16))
    assert not _counters(q.device).any()


@pytest.mark.parametrize("dk,dv", [(576, 512), (100, 40), (48, 40)])
def test_shared_kv_latent_cache(dk, dv):
    """MLA: one latent 'kv head' of 576 channels (512 + 64 rope), values its first 512, 4 query heads; values taken
    from the first key tile (100/40: masked to 40 of its 64 lanes) or loaded apart (48/40: tile of 32 < 64)."""
    case = make_case(2, 4, 1, dk, dv, [5, 21], page=8, shared=True, seed=dk)
    check(*case, dv, num_splits=2, block_n=16)


def test_float32_and_long_context_splits_agree():
    q, kc, vc, bt, seq, keys, values = make_case(2, 4, 2, 64, 64, [300, 129], page=16, dtype=torch.float32)
    one = check(q, kc, vc, bt, seq, keys, values, 64, num_splits=1, block_n=32)
    many = check(q, kc, vc, bt, seq, keys, values, 64, num_splits=7, block_n=16)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_padding_rows_give_zeros_and_do_not_disturb_others():
    q, kc, vc, bt, seq, keys, values = make_case(4, 4, 2, 32, 32, [0, 20, 0, 3], page=4)
    out = check(q, kc, vc, bt, seq, keys, values, 32, num_splits=2, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0


def test_page_size_not_multiple_of_tile():
    """Pages of 5 tokens: a 16-token KV tile spans four pages, gathered through the block table."""
    case = make_case(2, 6, 3, 48, 48, [23, 11], page=5, seed=3)
    check(*case, 48, num_splits=2, block_n=16)


def test_default_splits_and_tiles():
    assert _d_tiles(576) == (512, 64) and _d_tiles(128) == (128, 0) and _d_tiles(100) == (64, 64)
    assert _d_tiles(8) == (16, 0) and _d_tiles(24) == (16, 16)
    cpu = torch.device("cpu")
    assert default_num_splits(1000, 4096, cpu) == 1  # enough programs already
    assert default_num_splits(1, 100, cpu) == 1  # context too short to split
    assert default_num_splits(1, 4096, cpu) == 12  # 3 x 4 "SMs" on CPU, 64 splits allowed by the context
    assert default_num_splits(5, 4096, cpu) == 2  # 12 // 5: one wave, not a partial second
    assert default_num_splits(1, 4096, cpu, num_warps=8, block_n=32) == 4  # MLA: one 8-warp program a SM
    assert default_num_splits(1, 64, cpu, num_warps=8, block_n=32) == 2  # one 32-token tile a split at least


def test_matches_model_reference_paged_attention():
    """The model's torch reference (helper "models") on the same cache: the dispatch target must agree with it."""
    attention = pytest.importorskip("ingot.layers.attention")
    q, kc, vc, bt, seq, keys, values = make_case(3, 9, 3, 64, 64, [7, 33, 1], page=16, seed=5)
    # Stale but finite data in the unused blocks (the reference gathers whole padded tables and masks the scores,
    # so NaN there would reach it as 0 * NaN).
    kc, vc = (torch.where(c.isnan(), torch.randn_like(c), c) for c in (kc, vc))
    b = q.shape[0]
    meta = attention.AttnMetadata(
        cu_query_lens=torch.arange(b + 1, dtype=torch.int32, device=q.device),
        seq_lens=seq,
        slot_mapping=torch.full((b,), -1, dtype=torch.int64, device=q.device),
        block_tables=bt.clamp(max=kc.shape[0] - 1),
        max_query_len=1,
        max_seq_len=int(seq.max()),
    )
    scale = 1.0 / 8.0
    ref = attention.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), _cpu_meta(attention, meta), scale, 64)
    out = paged_decode_attention(q, kc, vc, bt, seq, scale, 64, num_splits=2, block_n=16)
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=2e-2, rtol=2e-2)


def _cpu_meta(attention, meta):
    return attention.AttnMetadata(
        cu_query_lens=meta.cu_query_lens.cpu(), seq_lens=meta.seq_lens.cpu(), slot_mapping=meta.slot_mapping.cpu(),
        block_tables=meta.block_tables.cpu(), max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
    )


def test_bad_inputs_name_the_tensor():
    q, kc, vc, bt, seq, _, _ = make_case(2, 4, 2, 32, 32, [3, 4], page=4)
    with pytest.raises(ValueError, match="heads must be a multiple"):
        paged_decode_attention(q[:, :3], kc, vc, bt, seq, 1.0, 32)
    with pytest.raises(ValueError, match="v_cache must be"):
        paged_decode_attention(q, kc, vc[..., :16], bt, seq, 1.0, 32)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        paged_decode_attention(q, kc, vc, bt, seq.long(), 1.0, 32)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(q, kc, vc, bt[:1], seq, 1.0, 32)
    with pytest.raises(TypeError, match="k_cache dtype"):
        paged_decode_attention(q, kc.float(), vc, bt, seq, 1.0, 32)
    with pytest.raises(ValueError, match="head_dim_v 40 must be <= Dk 32"):
        paged_decode_attention(q, kc, None, bt, seq, 1.0, 40)


# ------------------------------------------------------------------------------------------------ GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "h,hkv,dk,dv,shared",
    [(32, 8, 128, 128, False), (9, 3, 64, 64, False), (128, 1, 576, 512, True), (16, 1, 576, 512, True)],
    ids=["llama3-8b", "smollm2", "deepseek-v3-mla", "mla-tp8"],
)
def test_gpu_real_sizes(h, hkv, dk, dv, shared):
    seq_lens = [1, 17, 4095, 1000, 0, 2048, 513, 64]
    case = make_case(8, h, hkv, dk, dv, seq_lens, page=16, shared=shared, device="cuda")
    check(*case, dv)  # default splits and tiles
    check(*case, dv, num_splits=1)
    check(*case, dv, num_splits=5, block_n=16)
    if not shared:  # o_proj's int8 input per head (int8-block, K block = head dim), fused
        q, kc, vc, bt, seq, _, _ = case
        for splits in (None, 1, 5):
            for group in (dv, None):
                check_int8(q, kc, vc, bt, seq, dv, group, num_splits=splits)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_new_seq_lens():
    """Captured once, replayed after the seq_lens change in place (shorter, to zero, the same, inside a block): no
    host-side state baked in. (Every new length stays within its row's blocks: make_case points the rest of a block
    table past the cache, which the kernel would read - as it should - for a longer row.)"""
    q, kc, vc, bt, seq, keys, values = make_case(4, 32, 8, 128, 128, [100, 700, 5, 16], page=16, device="cuda")
    scale = 1 / math.sqrt(128)
    paged_decode_attention(q, kc, vc, bt, seq, scale, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kc, vc, bt, seq, scale, 128)
    new = torch.tensor([50, 0, 5, 3], dtype=torch.int32)
    seq.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    trimmed_k = [k[: int(n)] for k, n in zip(keys, new)]
    trimmed_v = [v[: int(n)] for v, n in zip(values, new)]
    torch.testing.assert_close(out.float().cpu(), plain_attention(q, trimmed_k, trimmed_v, scale), atol=2e-2, rtol=2e-2)
