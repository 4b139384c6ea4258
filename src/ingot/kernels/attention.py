"""Paged decode attention: one new query token per sequence against its paged KV cache (flash-decoding).

``paged_decode_attention(q [B, H, Dk], k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v) -> [B, H, Dv]``

- Cache layout (ingot.layers.attention.KVSpec): k_cache [num_blocks, block_size, Hkv, Dk], v_cache
  [num_blocks, block_size, Hkv, Dv], or v_cache None for MLA's shared latent cache, where the values are the first
  Dv channels of the keys (DeepSeek-V3: Dk = 576 = 512 latent + 64 rope, Dv = 512).
- GQA/MQA: the H / Hkv query heads of one kv head are one tile of BLOCK_H rows (padded with masked rows to 16, the
  smallest tl.dot M), so each K/V tile is loaded once for the whole group: tensor-core dots q @ k^T and p @ v.
- Head dims that are not powers of two are two tiles each masked, not one padded to the next power of two: 576 =
  512 + 64 loads 576 channels, where a 1024-wide tile would waste 44% of the registers and dot work. Dk = 128 and
  64 are a single tile; Dv is one tile of next_pow2(Dv) lanes (512, 128, 64) masked past Dv.
- Split-KV: each (sequence, kv head, head block) is cut into ``num_splits`` ranges of the sequence, each program
  computes a partial softmax (running max m, sum l, fp32 accumulator) over its range, and the program that finishes
  a head group last (an arrival counter per group, as split-K GEMMs count their splits) combines them in the same
  launch: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits that hold tokens. The ranges are
  split on the device from each row's own seq_len (cdiv(seq_len, num_splits) rounded up to the KV tile), so the
  launch depends only on host-known shapes: no host sync, CUDA-graph capturable. With one split the kernel
  normalizes and writes the output itself. (A second combine kernel cost a launch per layer: Llama-3-8B batch-1
  decode on the H100 spent 49 us per step in it, 117 us in its per-token quantizing form, session-18 profile.)
- Shared KV (MLA) whose values fit the first key tile (512 of 576) takes them from that tile: the latent is read
  from memory once per token, not twice.
- fp32 scores, softmax and accumulation; p is cast to the cache dtype for the p @ v dot (as FlashAttention does).
- seq_len 0 rows (padding of a CUDA-graph batch) write zeros, and touch neither block table nor cache.
- ``paged_decode_attention_int8``: the same, with the output quantized to int8 for the linear that reads it
  (o_proj of an int8-channel / int8-block layer): per head where the splits are combined, per token by the head
  group that finishes the row last (a second counter per row), instead of a quantization launch.
  ``paged_decode_attention_maxima``: the plain output and each head group's max |out|, for an o_proj GEMV that
  quantizes per token itself (batch 1, ``int8_gemm.int8_gemm_channel_rowmax``).
- ``new_kv`` (``NewKV``): a Llama decode step's rotary embedding of q and of the new key, and the cache write of
  that key and value, done by the kernel (the split holding the new token writes it before it reads the cache)
  instead of ``kv_store.rope_store_kv``'s launch before it (93 us of the same profile).

Reference: ingot.layers.attention.paged_attention (the torch version every model runs on CPU).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ingot.kernels.act_quant import _cast_rn, _quantize, per_token_group_quant, per_token_quant_int8
from ingot.kernels.checks import arrival_counters, cdiv, next_pow2

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_DOT = 16  # tl.dot's smallest M, N and K on NVIDIA tensor cores
BLOCK_H = 16  # query heads per program: a whole GQA group (4 for Llama-3-8B, 3 for SmolLM2) padded to 16
# Split-KV: as many programs as one wave of WARPS_PER_SM warps a SM runs (a decode of B = 1, 8 kv heads would
# otherwise run 8 programs on 132 SMs), rounded down - three 4-warp programs a SM (Dk <= 128), one 8-warp program
# (MLA's 576) - but never less than one KV tile of context per split (block_n: 64 tokens for Dk <= 128, 32 for MLA).
# H100 (benchmarks/scripts/decode_ops_bench.py, Llama-3-8B heads): batch 1, context 192 took 6.6 us in one split and
# 5.5 in three; context 1024 26.2 us in one, 6.4 in sixteen. Batch 16 (128 programs), context 1024 / 4096: 30.6 /
# 95.2 us in three splits, 32.0 / 99.7 in two. Batch 64 fills the SMs without splits (21.5 us at 192, 26.8 in two).
# DeepSeek-V3 MLA (128 heads, 8 head blocks; benchmarks/scripts/mla_decode_bench.py): batch 1, context 1024 / 4096,
# 17.0 / 45.4 us in 16 splits, 20.0 / 48.3 in 32; 11.3 us at context 256 in 8 splits of 32 tokens, 15.8 in 4 of 64;
# batch 8 (64 programs) 28.3 us in two splits, 32.6 in four.
WARPS_PER_SM = 12
MAX_SPLITS = 32
# The epilogue's tiles: at most this many fp32 values in flight per load (the combine's SPLIT_CHUNK splits of a head
# group, a per-token quantization's ROW_H heads): a Llama-3 row of 32 x 128 channels in one step, 16 per thread.
# A head group whose one split holds more (MLA: 16 heads x 512) is combined by its own launch instead, one program
# per head reading up to COMBINE_KERNEL_ELEMS values at once: the last-arriving program, reading its 16 x 512 fp32
# split by split, took 14.4 us against 11.3 at batch 1 in 8 splits, 24.6 against 17.0 in 16 (H100, context 256 /
# 1024, mla_decode_bench.py).
COMBINE_ELEMS = 4096
COMBINE_KERNEL_ELEMS = 16384


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b in fp32. UPCAST (interpreter only): triton 3.6's interpreter multiplies bf16 operands as their raw
    uint16 bit patterns (np.matmul on the storage; a 16x16 bf16 dot comes out ~1e10 off), so it gets fp32 copies.
    IEEE (fp32 caches): full fp32 products; tl.dot's default on fp32 operands is TF32 (10-bit mantissa, ~1e-3
    relative error), which would make an fp32 model's attention less exact than its torch reference."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _rotate_half(x, row_ptr, d, stride_d, mask, c, s, HALF):
    """x (R, BLOCK_D) = channels d of the rows at row_ptr (R, 1), rotated: channel d < HALF pairs with d + HALF (read
    again here, mask ``mask``), c / s (1, BLOCK_D) the token's cos / sin of channel d % HALF in x's dtype (as fp32).
    Rounded as kernels.norm_rope._rotate (each product to x's dtype, then the sum): the same bits as rope_store_kv.
    The select between the two sums keeps the sum in fp32, so no fma swallows a product's rounding even with fp
    fusion on (the rotary kernels, written as one expression, launch with it off; norm_rope's docstring)."""
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)
    xp = tl.load(row_ptr + partner[None, :] * stride_d, mask=mask, other=0.0)
    dt = x.dtype
    a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
    b = (xp.to(tl.float32) * s).to(dt).to(tl.float32)
    return tl.where(first[None, :], a - b, a + b).to(dt)


@triton.jit
def _per_split(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens of a row's split: cdiv(seq_len, NUM_SPLITS) rounded up to whole KV tiles."""
    return tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr,  # q [B, H, Dk], caches [NB, PS, Hkv, D], block_tables [B, MB], seq_lens [B]
    kn_ptr, vn_ptr, cos_ptr, sin_ptr, slot_ptr,  # ROPE: new k [B, Hkv, Dk] / v [B, Hkv, Dv], cos/sin fp32 [B, Dk/2]
    acc_ptr, m_ptr, l_ptr,  # NUM_SPLITS > 1, contiguous partials: acc fp32 [B, H, S, Dv], m / l fp32 [B, H, S]
    o_ptr, xq_ptr, xs_ptr,  # contiguous: out [B, H, Dv]; QUANT: x_q int8 [B, H * Dv], x_s fp32 [B, H] / [B, 1]
    cnt_ptr,  # int32 arrival counters, 0 between launches: [B * P] per (row, head group), then [B] per row
    amax_ptr,  # QUANT 2, 3: fp32 [B, P], each head group's max |output|
    scale,
    B, H, GROUP, DK, DV,  # GROUP = H // Hkv query heads per kv head
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
    stride_cb, stride_cp, stride_sb, stride_sp,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_BLOCKS: tl.constexpr,  # cdiv(GROUP, BLOCK_H) programs per kv head
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,  # KV tokens per step
    BLOCK_D1: tl.constexpr,  # first Dk tile (a power of two <= Dk)
    BLOCK_D2: tl.constexpr,  # second Dk tile covering Dk - BLOCK_D1 (0: none)
    BLOCK_DV: tl.constexpr,  # next_pow2(Dv)
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
    SPLIT_CHUNK: tl.constexpr,  # splits whose accumulators the combine loads at once
    COMBINE_H: tl.constexpr,  # next_pow2(GROUP) within [2, BLOCK_H]: the head rows the combine holds
    ROW_H: tl.constexpr,  # QUANT 2: heads of a row quantized at once
    BLOCK_P: tl.constexpr,  # QUANT 2: next_pow2(P)
    V_FROM_K: tl.constexpr,  # shared KV and BLOCK_DV == BLOCK_D1: values are the first key tile, already loaded
    ROPE: tl.constexpr,  # rotate q and the new key (Dk == BLOCK_D1), and write the new k / v into the caches first
    COMBINE: tl.constexpr,  # NUM_SPLITS > 1: the last-arriving split combines (else _combine_kernel, launched after)
    QUANT: tl.constexpr,  # 0: out; 1: x_q / x_s, one scale per head; 2: one scale per row (over all its heads);
    # 3: out and each head group's max |out| (amax_ptr), the row left unquantized
    UPCAST: tl.constexpr,  # interpreter: fp32 dots (see _dot)
    IEEE: tl.constexpr,  # fp32 operands: IEEE fp32 dots, not TF32 (see _dot)
    COMPILED: tl.constexpr,  # not the interpreter (bf16 rounding, see act_quant._cast_rn)
):
    b = tl.program_id(0)
    pid_h = tl.program_id(1)  # kv head * HEAD_BLOCKS + head block
    split = tl.program_id(2)
    groups = tl.num_programs(1)  # P = Hkv * HEAD_BLOCKS head groups per row
    kvh = pid_h // HEAD_BLOCKS
    hb = pid_h % HEAD_BLOCKS
    g = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # index inside the GQA group
    head_ok = g < GROUP
    heads = kvh * GROUP + g  # (BLOCK_H,) query heads
    heads64 = tl.where(head_ok, heads, 0).to(tl.int64)
    b64 = b.to(tl.int64)

    seq_len = tl.load(sl_ptr + b)
    # This split's token range, cut from the row's own length: cdiv(seq_len, S) rounded up to whole KV tiles.
    per_split = _per_split(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    d1 = tl.arange(0, BLOCK_D1)
    dv = tl.arange(0, BLOCK_DV)
    d1_ok = d1 < DK
    dv_ok = dv < DV
    q_row = q_ptr + b64 * stride_qb + heads64[:, None] * stride_qh  # (BLOCK_H, 1)
    q_mask = head_ok[:, None] & d1_ok[None, :]
    q1 = tl.load(q_row + d1[None, :] * stride_qd, mask=q_mask, other=0.0)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        d2_ok = d2 < DK
        q2 = tl.load(q_row + d2[None, :] * stride_qd, mask=head_ok[:, None] & d2_ok[None, :], other=0.0)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    if ROPE:  # rope_store_kv's work: the split holding the new token (position seq_len - 1) writes its k and v
        half = DK // 2
        c = tl.load(cos_ptr + b64 * stride_cb + (d1 % half) * stride_cp).to(q1.dtype).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + b64 * stride_sb + (d1 % half) * stride_sp).to(q1.dtype).to(tl.float32)[None, :]
        q1 = _rotate_half(q1, q_row, d1, stride_qd, q_mask, c, s, half)
        pos = seq_len - 1
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if (pos >= start) & (pos < end) & (slot >= 0):
            kn_row = kn_ptr + b64 * stride_knb + kvh.to(tl.int64) * stride_knh + tl.zeros((1, 1), tl.int64)
            kn = tl.load(kn_row + d1[None, :] * stride_knd)
            # v loaded before k's store: after it, the compiler cannot move the load up (it may alias the cache)
            vn = tl.load(vn_ptr + b64 * stride_vnb + kvh.to(tl.int64) * stride_vnh + dv * stride_vnd, mask=dv_ok)
            kn = _rotate_half(kn, kn_row, d1, stride_knd, d1[None, :] < DK, c, s, half)
            page_row = (slot // PAGE_SIZE) * stride_kb + (slot % PAGE_SIZE) * stride_kt
            tl.store(k_head + page_row + d1[None, :] * stride_kd, kn.to(k_ptr.dtype.element_ty))
            page_row = (slot // PAGE_SIZE) * stride_vb + (slot % PAGE_SIZE) * stride_vt
            tl.store(v_head + page_row + dv * stride_vd, vn.to(v_ptr.dtype.element_ty), mask=dv_ok)
        tl.debug_barrier()  # the block's stores before its loads of the cache below

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # A for over range (software-pipelined by triton) with bounds read on the device from seq_len.
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n  # (BLOCK_N,) token positions
        t_ok = t < end
        page = tl.load(bt_ptr + b64 * stride_btb + (t // PAGE_SIZE) * stride_btn, mask=t_ok, other=0)
        # (BLOCK_N,) offset of each token's row in the cache: its page, then its slot in the page
        row = page.to(tl.int64) * stride_kb + (t % PAGE_SIZE).to(tl.int64) * stride_kt
        k1 = tl.load(k_head + row[:, None] + d1[None, :] * stride_kd, mask=t_ok[:, None] & d1_ok[None, :], other=0.0)
        sc = _dot(q1, tl.trans(k1), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
        if BLOCK_D2 > 0:
            k2_mask = t_ok[:, None] & d2_ok[None, :]
            k2 = tl.load(k_head + row[:, None] + d2[None, :] * stride_kd, mask=k2_mask, other=0.0)
            sc = _dot(q2, tl.trans(k2), sc, UPCAST, IEEE)
        sc = tl.where(t_ok[None, :], sc * scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(sc, axis=1))  # finite: every tile has at least one valid token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_FROM_K:  # MLA: the 512 latent channels are both keys and values; read them from memory once
            v = tl.where(dv_ok[None, :], k1, 0.0).to(k1.dtype)
        else:
            vrow = page.to(tl.int64) * stride_vb + (t % PAGE_SIZE).to(tl.int64) * stride_vt
            v_mask = t_ok[:, None] & dv_ok[None, :]
            v = tl.load(v_head + vrow[:, None] + dv[None, :] * stride_vd, mask=v_mask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0: an empty row (seq_len 0), acc is 0
        _finish(out, b64 * H + heads64, head_ok, b64, pid_h, groups, B, o_ptr, xq_ptr, xs_ptr, amax_ptr, cnt_ptr,
                H, DV, dv, dv_ok, QUANT, ROW_H, BLOCK_P, COMPILED)
    else:
        # Split-KV in one launch (the semaphore of int8_gemm._split_k_sum): every split stores its partial softmax,
        # then bumps its head group's counter; the split that arrives last combines them all and resets the counter.
        # (Not COMBINE: the partials only, for _combine_kernel.)
        ml = (b64 * H + heads64) * NUM_SPLITS + split
        tl.store(acc_ptr + ml[:, None] * DV + dv[None, :], acc, mask=head_ok[:, None] & dv_ok[None, :],
                 cache_modifier=".cg")
        tl.store(m_ptr + ml, m_i, mask=head_ok, cache_modifier=".cg")
        tl.store(l_ptr + ml, l_i, mask=head_ok, cache_modifier=".cg")
        if COMBINE:
            tl.debug_barrier()
            counter = cnt_ptr + b64 * groups + pid_h
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                # the group's real heads only (COMBINE_H rows, not the 16 of the dot tiles)
                gc = hb * BLOCK_H + tl.arange(0, COMBINE_H)
                c_ok = gc < GROUP
                bh = b64 * H + tl.where(c_ok, kvh * GROUP + gc, 0).to(tl.int64)
                used = tl.cdiv(seq_len, tl.maximum(per_split, 1))  # splits past it are empty (weight e^-inf = 0)
                out = _combine(acc_ptr, m_ptr, l_ptr, bh, c_ok, used, DV, dv, dv_ok, NUM_SPLITS, BLOCK_S,
                               SPLIT_CHUNK, COMBINE_H, BLOCK_DV)
                _finish(out, bh, c_ok, b64, pid_h, groups, B, o_ptr, xq_ptr, xs_ptr, amax_ptr, cnt_ptr,
                        H, DV, dv, dv_ok, QUANT, ROW_H, BLOCK_P, COMPILED)


@triton.jit
def _combine(acc_ptr, m_ptr, l_ptr, bh, ok, used, DV, dv, dv_ok, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
             SPLIT_CHUNK: tl.constexpr, R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out (R, BLOCK_DV) = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s for the heads at rows bh (R,) of the
    partials, over the ``used`` splits that hold tokens. The accumulators are read SPLIT_CHUNK splits at a time (a
    split-at-a-time loop waited on memory once per split; Llama-3 at batch 1 takes all its splits in one step)."""
    si = tl.arange(0, BLOCK_S)
    hs_mask = ok[:, None] & (si < used)[None, :]
    m_s = tl.load(m_ptr + bh[:, None] * NUM_SPLITS + si[None, :], mask=hs_mask, other=float("-inf"),
                  cache_modifier=".cg")
    l_s = tl.load(l_ptr + bh[:, None] * NUM_SPLITS + si[None, :], mask=hs_mask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m_s, axis=1)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # no split holds tokens (seq_len 0): weights 0
    denom = tl.sum(tl.exp(m_s - m_max[:, None]) * l_s, axis=1)  # (R,)
    out = tl.zeros((R, BLOCK_DV), dtype=tl.float32)
    for c0 in range(0, used, SPLIT_CHUNK):  # not unrolled: BLOCK_S / SPLIT_CHUNK copies of a tile would spill
        sj = c0 + tl.arange(0, SPLIT_CHUNK)
        mask = ok[:, None] & (sj < used)[None, :]
        m_c = tl.load(m_ptr + bh[:, None] * NUM_SPLITS + sj[None, :], mask=mask, other=float("-inf"),
                      cache_modifier=".cg")
        w_c = tl.exp(m_c - m_max[:, None])  # (R, SPLIT_CHUNK)
        rows = bh[:, None, None] * NUM_SPLITS + sj[None, :, None]
        a = tl.load(acc_ptr + rows * DV + dv[None, None, :], mask=mask[:, :, None] & dv_ok[None, None, :], other=0.0,
                    cache_modifier=".cg")
        out += tl.sum(a * w_c[:, :, None], axis=1)
    return out / tl.where(denom > 0, denom, 1.0)[:, None]


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, sl_ptr, o_ptr,  # the partials of _decode_kernel (COMBINE off), seq_lens [B], out [B, H, Dv]
    H, DV,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the decode launch's KV tile: its split ranges
    BLOCK_S: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """The split combine as its own launch, one program per (row, head): for head groups whose partials are too
    large for one program to combine in the decode launch (MLA's 16 heads x 512 channels)."""
    b64 = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b64)
    used = tl.cdiv(seq_len, tl.maximum(_per_split(seq_len, NUM_SPLITS, BLOCK_N), 1))
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    bh = b64 * H + h + tl.zeros((1,), dtype=tl.int64)  # one head: (1,) rows for _combine
    real = tl.full((1,), True, dtype=tl.int1)  # the head exists (the in-kernel combine masks GQA padding rows)
    out = _combine(acc_ptr, m_ptr, l_ptr, bh, real, used, DV, dv, dv_ok, NUM_SPLITS, BLOCK_S, SPLIT_CHUNK, 1, BLOCK_DV)
    tl.store(o_ptr + bh[:, None] * DV + dv[None, :], _cast_rn(out, o_ptr.dtype.element_ty, COMPILED),
             mask=dv_ok[None, :])


@triton.jit
def _finish(out, bh, ok, b64, pid_h, groups, B, o_ptr, xq_ptr, xs_ptr, amax_ptr, cnt_ptr, H, DV, dv, dv_ok,
            QUANT: tl.constexpr, ROW_H: tl.constexpr, BLOCK_P: tl.constexpr, COMPILED: tl.constexpr):
    """Store a head group's normalized output out (R, BLOCK_DV) fp32 (heads at rows bh (R,) of [B * H, Dv], valid
    where ok): rounded to the model dtype (what the plain output holds), or quantized from those bits - per head
    (QUANT 1: each head one group of Dv == BLOCK_DV channels, per_token_group_quant's steps), or per row (QUANT 2:
    the group stores its bits and their amax, and the group that finishes the row last quantizes all of it with the
    row's scale, per_token_quant_int8's steps, ROW_H heads at a time), or left to o_proj (QUANT 3: the bits and
    the group's amax, which int8_gemm.int8_gemm_channel_rowmax quantizes from as it reads them)."""
    rounded = _cast_rn(out, o_ptr.dtype.element_ty, COMPILED)
    mask = ok[:, None] & dv_ok[None, :]
    o_ptrs = o_ptr + bh[:, None] * DV + dv[None, :]
    if QUANT == 1:
        vals = rounded.to(tl.float32)
        head_scale = tl.math.div_rn(tl.max(tl.abs(vals), axis=1), 127.0)
        q = _quantize(vals, head_scale, 127.0, False, COMPILED)
        tl.store(xq_ptr + bh[:, None] * DV + dv[None, :], q, mask=mask)
        tl.store(xs_ptr + bh, head_scale, mask=ok)
    elif QUANT == 0:
        tl.store(o_ptrs, rounded, mask=mask)
    else:
        tl.store(o_ptrs, rounded, mask=mask, cache_modifier=".cg")
        group_amax = tl.max(tl.max(tl.where(mask, tl.abs(rounded.to(tl.float32)), 0.0), axis=1), axis=0)
        tl.store(amax_ptr + b64 * groups + pid_h, group_amax, cache_modifier=".cg")
    if QUANT == 2:
        tl.debug_barrier()
        row_counter = cnt_ptr + B * groups + b64
        if tl.atomic_add(row_counter, 1, sem="acq_rel", scope="gpu") == groups - 1:
            tl.atomic_xchg(row_counter, 0, sem="relaxed", scope="gpu")
            gi = tl.arange(0, BLOCK_P)
            amax = tl.max(tl.load(amax_ptr + b64 * groups + gi, mask=gi < groups, other=0.0, cache_modifier=".cg"),
                          axis=0)
            row_scale = tl.math.div_rn(amax, 127.0)
            for h0 in range(0, H, ROW_H):
                hh = h0 + tl.arange(0, ROW_H)
                row_mask = (hh < H)[:, None] & dv_ok[None, :]
                vals = tl.load(o_ptr + (b64 * H + hh)[:, None] * DV + dv[None, :], mask=row_mask, other=0.0,
                               cache_modifier=".cg").to(tl.float32)
                q = _quantize(vals, tl.zeros((ROW_H,), dtype=tl.float32) + row_scale, 127.0, False, COMPILED)
                tl.store(xq_ptr + b64 * H * DV + hh[:, None] * DV + dv[None, :], q, mask=row_mask)
            tl.store(xs_ptr + b64, row_scale)


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions that run on any device (numpy); compiled ones need CUDA tensors.
INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------------- wrappers


def _d_tiles(dk: int) -> tuple[int, int]:
    """Dk -> (BLOCK_D1, BLOCK_D2): a power-of-two first tile and a power-of-two tile for the rest (0 if none).

    576 -> (512, 64), 128 -> (128, 0), 100 -> (64, 64), 8 -> (16, 0): each at least 16 (tl.dot's K)."""
    if dk <= MIN_DOT:
        return MIN_DOT, 0
    d1 = 1 << (dk.bit_length() - 1)  # largest power of two <= dk
    rest = dk - d1
    return d1, (max(MIN_DOT, next_pow2(rest)) if rest else 0)


def default_num_splits(batch_programs: int, max_context: int, device: torch.device, num_warps: int = 4,
                       block_n: int = 64) -> int:
    """How many KV splits a launch of ``batch_programs`` (B x Hkv x head blocks) programs of ``num_warps`` warps
    gets.

    As many programs as one wave of WARPS_PER_SM warps on every SM runs, rounded down (a partial second wave cost MLA
    at batch 8 37.1 us in 3 splits against 28.3 in 2; kernels/NOTES.md, session 21), without cutting ``max_context``
    (the block table's capacity, host-known) below one ``block_n``-token KV tile per split. Depends only on shapes:
    graph replays keep it.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, WARPS_PER_SM // num_warps) * sms // max(1, batch_programs)
    cap = max(1, max_context // block_n)
    return max(1, min(want, cap, MAX_SPLITS))


def _check(q, k_cache, v_cache, block_tables, seq_lens, head_dim_v) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, Dk], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, Dk], got shape {tuple(k_cache.shape)}")
    b, h, dk = q.shape
    _, page_size, hkv, dk_cache = k_cache.shape
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be one of {DTYPES}, got {q.dtype}")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} must equal q's {q.dtype}")
    if dk_cache != dk:
        raise ValueError(f"k_cache head dim {dk_cache} (shape {tuple(k_cache.shape)}) != q's Dk {dk}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"q's {h} heads must be a multiple of k_cache's {hkv} kv heads")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v < 1:
        raise ValueError(f"head_dim_v must be a positive int, got {head_dim_v!r}")
    if v_cache is None:
        if head_dim_v > dk:
            raise ValueError(f"shared KV (v_cache None): head_dim_v {head_dim_v} must be <= Dk {dk}")
    else:
        if not isinstance(v_cache, torch.Tensor):
            raise TypeError(f"v_cache must be a torch.Tensor or None, got {type(v_cache).__name__}")
        if v_cache.dtype != q.dtype:
            raise TypeError(f"v_cache dtype {v_cache.dtype} must equal q's {q.dtype}")
        expected = (k_cache.shape[0], page_size, hkv, head_dim_v)
        if tuple(v_cache.shape) != expected:
            raise ValueError(f"v_cache must be {expected} (k_cache blocks, block size, kv heads, head_dim_v), "
                             f"got {tuple(v_cache.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be int32 [B={b}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (b,):
        raise ValueError(f"seq_lens must be int32 [B={b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, k_cache, block_tables, seq_lens) + ((v_cache,) if v_cache is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"q, caches, block_tables and seq_lens must share one device, got {sorted(map(str, devices))}")
    if not INTERPRETED and q.device.type != "cuda":
        raise ValueError(f"q must be on a CUDA device (any device under TRITON_INTERPRET=1), got {q.device}")


class NewKV(NamedTuple):
    """A decode step's new token per row, for the attention kernel to rotate and store itself (the work of
    ``kv_store.rope_store_kv``, without its launch): k [B, Hkv, Dk] and v [B, Hkv, Dv] as the projections give them
    (k not yet rotated; any strides), cos / sin float32 [B, Dk / 2] (the token's angles, rotate-half layout: channel
    i pairs with i + Dk / 2), slot_mapping [B] (where the token's k / v go in the cache; -1 writes nothing)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor


def rope_supported(q: torch.Tensor, v_cache: torch.Tensor | None) -> bool:
    """Whether the kernel takes a ``NewKV`` for this q: bf16/fp16, separate values, and a head dim that is one
    power-of-two tile (Llama's 128 / 64)."""
    dk = q.shape[-1]
    return (v_cache is not None and q.dtype in (torch.bfloat16, torch.float16) and dk >= MIN_DOT
            and dk & (dk - 1) == 0)


def _check_new_kv(new_kv: NewKV, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                  head_dim_v: int) -> None:
    if not isinstance(new_kv, NewKV):
        raise TypeError(f"new_kv must be a NewKV, got {type(new_kv).__name__}")
    if not rope_supported(q, v_cache):
        raise ValueError(f"new_kv (rotate and store in the kernel) needs bf16/fp16 q, a v_cache and a power-of-two "
                         f"head dim >= {MIN_DOT}; got {q.dtype}, v_cache {'None' if v_cache is None else 'given'}, "
                         f"Dk {q.shape[-1]}")
    b, _, dk = q.shape
    hkv = k_cache.shape[2]
    k, v, cos, sin, slots = new_kv
    if tuple(k.shape) != (b, hkv, dk) or tuple(v.shape) != (b, hkv, head_dim_v):
        raise ValueError(f"new_kv: k must be [{b}, {hkv}, {dk}] and v [{b}, {hkv}, {head_dim_v}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"new_kv: k and v must be {q.dtype} as q, got {k.dtype} and {v.dtype}")
    if tuple(cos.shape) != (b, dk // 2) or tuple(sin.shape) != (b, dk // 2) or cos.dtype != torch.float32 or \
            sin.dtype != torch.float32:
        raise ValueError(f"new_kv: cos / sin must be float32 [{b}, {dk // 2}], got {cos.dtype} {tuple(cos.shape)} and "
                         f"{sin.dtype} {tuple(sin.shape)}")
    if slots.dim() != 1 or slots.shape[0] != b or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"new_kv: slot_mapping must be int32/int64 [{b}], got {slots.dtype} {tuple(slots.shape)}")
    if len({t.device for t in (q, k, v, cos, sin, slots)}) != 1:
        raise ValueError("new_kv: k, v, cos, sin and slot_mapping must be on q's device")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    head_dim_v: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    new_kv: NewKV | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q: [B, H, Dk] bf16/fp16/fp32 (any strides). k_cache: [num_blocks, block_size, Hkv, Dk], v_cache:
    [num_blocks, block_size, Hkv, head_dim_v] or None (shared KV: values = k_cache[..., :head_dim_v]), q's dtype.
    block_tables: int32 [B, max_blocks] (cache block ids of each sequence, in order). seq_lens: int32 [B] (context
    length including the new token; 0 = padding row, output zeros). scale: softmax scale (1 / sqrt(Dk) usually).
    num_splits: KV splits per sequence (default: ``default_num_splits``); block_n: KV tokens per step (default
    64 for Dk <= 128, else 32). new_kv None: the cache already holds the new token's k / v (and q is rotated);
    a ``NewKV`` (``rope_supported`` shapes): q and k are rotated here and k / v written into the cache at its
    slots before they are read - bit for bit ``rope_store_kv`` and then this call without it.
    Returns [B, H, head_dim_v] in q's dtype. No host syncs: CUDA-graph capturable (the first call on a device must
    not be inside a capture: it makes the device's arrival counters).
    """
    out, _, _ = _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, None,
                        new_kv)
    return out


def int8_output_supported(head_dim_v: int, group_size: int | None) -> bool:
    """Whether ``paged_decode_attention_int8`` takes these: a power-of-two head of at least MIN_DOT channels (one
    tile, BLOCK_DV == Dv), quantized per head (group_size == head_dim_v) or per token (group_size None)."""
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v < MIN_DOT:
        return False
    if head_dim_v & (head_dim_v - 1):
        return False
    return group_size == head_dim_v or group_size is None


def paged_decode_attention_int8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    head_dim_v: int,
    group_size: int | None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    new_kv: NewKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``paged_decode_attention`` with its output quantized to int8 for the linear that reads it (o_proj), in the
    same launch.

    group_size None: one scale per token (int8-channel), x_s [B, 1]: the head group that finishes a row last
    quantizes the whole row. group_size == head_dim_v: one scale per head (int8-block's o_proj where the K block is
    the head dim, Llama's 128), x_s [B, H], quantized where the KV splits are combined (with one split there is no
    combine: the plain output, then the quantization launch). Either way bit for bit ``per_token_quant_int8`` /
    ``per_token_group_quant(out, "int8", group_size)`` of the plain output. Returns x_q int8 [B, H * head_dim_v]
    and x_s float32. ``int8_output_supported`` says which shapes it takes.

    Why: at batch 1 the separate quantization was one more launch per layer (~2.4 us on the H100, 32 per step of
    Llama-3-8B) in a step of latency-bound kernels."""
    if not int8_output_supported(head_dim_v, group_size):
        raise ValueError(f"paged_decode_attention_int8: head_dim_v {head_dim_v} must be a power of two >= {MIN_DOT} "
                         f"(one tile a head) and group_size None (per token) or head_dim_v (per head); got "
                         f"group_size {group_size}")
    quant = "token" if group_size is None else "head"
    _, x_q, x_s = _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, quant,
                          new_kv)
    return x_q, x_s


def paged_decode_attention_maxima(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    head_dim_v: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    new_kv: NewKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``paged_decode_attention`` flattened to [B, H * head_dim_v], with the max |out| of each head group's channels
    from the same launch: maxima float32 [B, P] (P head groups of a row; [B, 1] where the splits are combined by
    their own launch, taken after it) - the input of ``int8_gemm.int8_gemm_channel_rowmax``, whose M = 1 GEMV
    quantizes the row per token as it reads it. Against ``paged_decode_attention_int8``'s per-token form this skips
    the second arrival (over the row's head groups) and the last group's pass over the row."""
    _, out, maxima = _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n,
                             "maxima", new_kv)
    return out, maxima


# The arrival counters of the split combine and the per-row quantization (checks.arrival_counters: one buffer per
# device, zero between launches). A launch takes B * (P + 1) of them (P head groups per row): larger batches run in
# several launches.
MAX_COUNTERS = 65536


def _counters(device: torch.device) -> torch.Tensor:
    return arrival_counters(device, MAX_COUNTERS, "paged decode attention")


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, quant, new_kv):
    """Check, resolve the splits and tiles, launch; (out, None, None), or with quant ("head" / "token") (None, x_q,
    x_s), or with quant "maxima" (None, out flattened to [B, H * Dv], its maxima [B, P] or [B, 1]). One kernel does it all (``_decode_kernel``): the splits' combine, and the quantization per token, or per
    head where splits are combined. Per head with one split the plain output is quantized by its own launch after
    it (quantizing in that kernel's epilogue, over its 16-row head tiles of a 4-head GQA group, made Llama-3-8B
    int8-block batch-64 decode 1.4% slower). Head groups too large to combine in the decode launch
    (``_combined_apart``) take ``_combine_kernel`` after it, and a quantization launch after that."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, head_dim_v)
    if new_kv is not None:
        _check_new_kv(new_kv, q, k_cache, v_cache, head_dim_v)
    b, h, dk = q.shape
    _, page_size, hkv, _ = k_cache.shape
    if block_n is None:
        block_n = 64 if dk <= 128 else 32  # MLA: a 32 x 576 bf16 K tile is already 36 KB
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")
    groups = hkv * cdiv(h // hkv, BLOCK_H)  # programs per row and split
    if num_splits is None:
        num_splits = default_num_splits(b * groups, block_tables.shape[1] * page_size, q.device,
                                        _num_warps(head_dim_v), block_n)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")

    out = torch.empty((b, h, head_dim_v), dtype=q.dtype, device=q.device)
    apart = _combined_apart(h // hkv, head_dim_v, num_splits)
    # quantized (or the maxima taken) in the kernel
    fused = quant if (quant in ("token", "maxima") or num_splits > 1) and not apart else None
    x_q = x_s = None
    if fused == "maxima":
        x_s = torch.empty((b, groups), dtype=torch.float32, device=q.device)
    elif fused:
        x_q = torch.empty((b, h * head_dim_v), dtype=torch.int8, device=q.device)
        x_s = torch.empty((b, 1 if fused == "token" else h), dtype=torch.float32, device=q.device)
    if b and h:
        rows = MAX_COUNTERS // (groups + 1)
        for r0 in range(0, b, rows):
            r = slice(r0, r0 + rows)
            _launch(q[r], k_cache, v_cache, block_tables[r], seq_lens[r], scale, head_dim_v, num_splits, block_n,
                    fused, out[r], None if x_q is None else x_q[r], None if x_s is None else x_s[r],
                    None if new_kv is None else NewKV(*(t[r] for t in new_kv)))
    flat = out.view(b, h * head_dim_v)
    if quant == "maxima":  # combined apart: one maximum per row, taken by torch
        return None, flat, x_s if fused else flat.float().abs().amax(-1, keepdim=True)
    if quant and not fused:
        x_q, x_s = (per_token_quant_int8(flat) if quant == "token"
                    else per_token_group_quant(flat, "int8", group_size=head_dim_v))
    return (None, x_q, x_s) if quant else (out, None, None)


def _block_dv(head_dim_v: int) -> int:
    return max(MIN_DOT, next_pow2(head_dim_v))


def _num_warps(head_dim_v: int) -> int:
    return 4 if _block_dv(head_dim_v) <= 128 else 8


def _combine_h(group: int) -> int:
    """The head rows the in-kernel combine holds: next_pow2(GROUP) within [2, BLOCK_H]."""
    return min(BLOCK_H, max(2, next_pow2(group)))


def _combined_apart(group: int, head_dim_v: int, num_splits: int) -> bool:
    """Whether the splits are combined by ``_combine_kernel`` after the decode launch rather than by the split that
    arrives last in it: where a head group's partials of one split exceed COMBINE_ELEMS (see there)."""
    return num_splits > 1 and _combine_h(group) * _block_dv(head_dim_v) > COMBINE_ELEMS


def _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, fused, out, x_q, x_s,
            new_kv):
    """One launch of _decode_kernel over these rows, with their checked shapes and tiles."""
    b, h, dk = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = h // hkv
    head_blocks = cdiv(group, BLOCK_H)
    block_d1, block_d2 = _d_tiles(dk)
    block_dv = _block_dv(head_dim_v)
    apart = _combined_apart(group, head_dim_v, num_splits)
    v = k_cache if v_cache is None else v_cache  # shared KV: the first head_dim_v channels of each key
    if num_splits == 1:
        partial = m = lse_l = out  # unused: the one split normalizes in place
    else:
        partial = torch.empty((b, h, num_splits, head_dim_v), dtype=torch.float32, device=q.device)
        m = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
        lse_l = torch.empty_like(m)
    counters = _counters(q.device)
    groups = hkv * head_blocks
    if fused == "maxima":
        amax = x_s  # the output's maxima [B, P]: x_s of this launch
    else:
        amax = torch.empty((b, groups), dtype=torch.float32, device=q.device) if fused == "token" else partial
    combine_h = _combine_h(group)
    block_s = max(2, next_pow2(num_splits))
    if new_kv is None:
        kn, vn, cos, sin, slots = q, q, partial, partial, seq_lens  # never read (ROPE off)
        new_strides = (0,) * 10
    else:
        kn, vn, cos, sin, slots = new_kv
        new_strides = (*kn.stride(), *vn.stride(), *cos.stride(), *sin.stride())

    ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _decode_kernel[(b, groups, num_splits)](
            q, k_cache, v, block_tables, seq_lens,
            kn, vn, cos, sin, slots,
            partial, m, lse_l,
            out, out if x_q is None else x_q, out if x_s is None or fused == "maxima" else x_s,
            counters, amax,
            float(scale),
            b, h, group, dk, head_dim_v,
            *q.stride(),
            *k_cache.stride(),
            *v.stride(),
            *block_tables.stride(),
            *new_strides,
            PAGE_SIZE=page_size,
            NUM_SPLITS=num_splits,
            HEAD_BLOCKS=head_blocks,
            BLOCK_H=BLOCK_H,
            BLOCK_N=block_n,
            BLOCK_D1=block_d1,
            BLOCK_D2=block_d2,
            BLOCK_DV=block_dv,
            BLOCK_S=block_s,
            SPLIT_CHUNK=max(1, min(block_s, COMBINE_ELEMS // (combine_h * block_dv))),
            COMBINE_H=combine_h,
            ROW_H=max(1, min(next_pow2(h), COMBINE_ELEMS // block_dv)),
            BLOCK_P=max(2, next_pow2(groups)),
            V_FROM_K=v_cache is None and block_dv == block_d1,
            ROPE=new_kv is not None,
            COMBINE=not apart,
            QUANT={None: 0, "head": 1, "token": 2, "maxima": 3}[fused],
            UPCAST=INTERPRETED,
            IEEE=q.dtype == torch.float32,
            COMPILED=not INTERPRETED,
            num_warps=_num_warps(head_dim_v),
            num_stages=2,
        )
        if apart:
            _combine_kernel[(b, h)](
                partial, m, lse_l, seq_lens, out,
                h, head_dim_v,
                NUM_SPLITS=num_splits,
                BLOCK_N=block_n,
                BLOCK_S=block_s,
                SPLIT_CHUNK=max(1, min(block_s, COMBINE_KERNEL_ELEMS // block_dv)),
                BLOCK_DV=block_dv,
                COMPILED=not INTERPRETED,
                num_warps=8,
            )
