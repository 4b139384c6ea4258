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
  computes a partial softmax (running max m, sum l, fp32 accumulator) over its range, and a second kernel combines
  them: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. The ranges are split on the device from each row's
  own seq_len (cdiv(seq_len, num_splits) rounded up to the KV tile), so the launch depends only on host-known
  shapes: no host sync, CUDA-graph capturable. With one split the kernel normalizes and writes the output itself.
- Shared KV (MLA) whose values fit the first key tile (512 of 576) takes them from that tile: the latent is read
  from memory once per token, not twice.
- fp32 scores, softmax and accumulation; p is cast to the cache dtype for the p @ v dot (as FlashAttention does).
- seq_len 0 rows (padding of a CUDA-graph batch) write zeros, and touch neither block table nor cache.
- ``paged_decode_attention_int8``: the same, with the output quantized to int8 for the linear that reads it
  (o_proj of an int8-channel / int8-block layer) where the splits are combined, instead of a quantization launch.

Reference: ingot.layers.attention.paged_attention (the torch version every model runs on CPU).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ingot.kernels.act_quant import _cast_rn, _quantize, _quantize_store, per_token_group_quant, per_token_quant_int8
from ingot.kernels.checks import cdiv, next_pow2

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_DOT = 16  # tl.dot's smallest M, N and K on NVIDIA tensor cores
BLOCK_H = 16  # query heads per program: a whole GQA group (4 for Llama-3-8B, 3 for SmolLM2) padded to 16
# Split-KV: aim for about this many programs per SM (a decode of B = 1, 8 kv heads would otherwise run 8 programs on
# 132 SMs), but never split below MIN_SPLIT_TOKENS of context per split, where the extra partial-result traffic
# (Dv fp32 per head per split) starts to rival the K/V bytes a split reads.
# H100, Llama-3-8B heads, batch 1 (benchmarks/scripts/decode_ops_bench.py): context 192 took 6.6 us in one split
# and 5.5 in three; context 1024 10.3 us in four splits and 6.2 in sixteen - so 64 tokens, not 256, per split.
# Batch 64 fills the SMs without splits (want = 1 below), where splits only cost (21.4 us vs 25.7 in two at 192).
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 64
MAX_SPLITS = 32
MAX_TOKEN_HEADS = 128  # a per-token quantizing combine holds a token's heads x Dv values in one program
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


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
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr,  # q [B, H, Dk], caches [NB, PS, Hkv, D], block_tables [B, MB], seq_lens [B]
    o_ptr, m_ptr, l_ptr,  # out [B, H, Dv] (NUM_SPLITS == 1) or partials: acc fp32 [B, H, S, Dv], m/l fp32 [B, H, S]
    scale,
    H, GROUP, DK, DV,  # GROUP = H // Hkv query heads per kv head
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_ms,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_BLOCKS: tl.constexpr,  # cdiv(GROUP, BLOCK_H) programs per kv head
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,  # KV tokens per step
    BLOCK_D1: tl.constexpr,  # first Dk tile (a power of two <= Dk)
    BLOCK_D2: tl.constexpr,  # second Dk tile covering Dk - BLOCK_D1 (0: none)
    BLOCK_DV: tl.constexpr,  # next_pow2(Dv)
    V_FROM_K: tl.constexpr,  # shared KV and BLOCK_DV == BLOCK_D1: values are the first key tile, already loaded
    UPCAST: tl.constexpr,  # interpreter: fp32 dots (see _dot)
    IEEE: tl.constexpr,  # fp32 operands: IEEE fp32 dots, not TF32 (see _dot)
    COMPILED: tl.constexpr,  # not the interpreter (bf16 rounding, see act_quant._cast_rn)
):
    b = tl.program_id(0)
    pid_h = tl.program_id(1)  # kv head * HEAD_BLOCKS + head block
    split = tl.program_id(2)
    kvh = pid_h // HEAD_BLOCKS
    hb = pid_h % HEAD_BLOCKS
    g = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # index inside the GQA group
    head_ok = g < GROUP
    heads = kvh * GROUP + g  # (BLOCK_H,) query heads
    heads64 = tl.where(head_ok, heads, 0).to(tl.int64)
    b64 = b.to(tl.int64)

    seq_len = tl.load(sl_ptr + b)
    # This split's token range, cut from the row's own length: cdiv(seq_len, S) rounded up to whole KV tiles.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    d1 = tl.arange(0, BLOCK_D1)
    dv = tl.arange(0, BLOCK_DV)
    d1_ok = d1 < DK
    dv_ok = dv < DV
    q_row = q_ptr + b64 * stride_qb + heads64[:, None] * stride_qh  # (BLOCK_H, 1)
    q1 = tl.load(q_row + d1[None, :] * stride_qd, mask=head_ok[:, None] & d1_ok[None, :], other=0.0)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        d2_ok = d2 < DK
        q2 = tl.load(q_row + d2[None, :] * stride_qd, mask=head_ok[:, None] & d2_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    # A for over range (software-pipelined by triton) with bounds read on the device from seq_len.
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n  # (BLOCK_N,) token positions
        t_ok = t < end
        page = tl.load(bt_ptr + b64 * stride_btb + (t // PAGE_SIZE) * stride_btn, mask=t_ok, other=0)
        # (BLOCK_N,) offset of each token's row in the cache: its page, then its slot in the page
        row = page.to(tl.int64) * stride_kb + (t % PAGE_SIZE).to(tl.int64) * stride_kt
        k1 = tl.load(k_head + row[:, None] + d1[None, :] * stride_kd, mask=t_ok[:, None] & d1_ok[None, :], other=0.0)
        s = _dot(q1, tl.trans(k1), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)  # (BLOCK_H, BLOCK_N)
        if BLOCK_D2 > 0:
            k2_mask = t_ok[:, None] & d2_ok[None, :]
            k2 = tl.load(k_head + row[:, None] + d2[None, :] * stride_kd, mask=k2_mask, other=0.0)
            s = _dot(q2, tl.trans(k2), s, UPCAST, IEEE)
        s = tl.where(t_ok[None, :], s * scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has at least one valid token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
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
        o_ptrs = o_ptr + b64 * stride_ob + heads64[:, None] * stride_oh + dv[None, :] * stride_od
        tl.store(o_ptrs, _cast_rn(out, o_ptr.dtype.element_ty, COMPILED), mask=head_ok[:, None] & dv_ok[None, :])
    else:
        o_ptrs = o_ptr + b64 * stride_ob + heads64[:, None] * stride_oh + split * stride_os + dv[None, :] * stride_od
        tl.store(o_ptrs, acc, mask=head_ok[:, None] & dv_ok[None, :])
        ml = b64 * stride_mb + heads64 * stride_mh + split * stride_ms
        tl.store(m_ptr + ml, m_i, mask=head_ok)
        tl.store(l_ptr + ml, l_i, mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    acc_ptr, m_ptr, l_ptr, o_ptr,  # acc fp32 [B, H, S, Dv], m/l fp32 [B, H, S], out [B, H, Dv]
    xq_ptr, xs_ptr,  # QUANT: x_q int8 [B, H * Dv], x_s fp32 [B, H] (act_quant._quantize_store) instead of out
    DV,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_mb, stride_mh, stride_ms,
    stride_ob, stride_oh, stride_od,
    stride_xqb, stride_xsb,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
    BLOCK_DV: tl.constexpr,
    QUANT: tl.constexpr,
    COMPILED: tl.constexpr,  # not the interpreter (bf16 rounding, see act_quant._cast_rn)
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + s * stride_ms, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + b * stride_mb + h * stride_mh + s * stride_ms, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # every split empty (seq_len 0): weights e^-inf = 0
    w = tl.exp(m - m_max)  # (BLOCK_S,); empty splits have m = -inf: weight 0
    denom = tl.sum(w * l, axis=0)
    a_ptrs = acc_ptr + b * stride_ab + h * stride_ah + s[:, None] * stride_as + dv[None, :] * stride_ad
    acc = tl.load(a_ptrs, mask=s_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_DV)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    out = _cast_rn(out, o_ptr.dtype.element_ty, COMPILED)  # what the plain path stores
    if QUANT:  # the head is one group of DV == BLOCK_DV channels h * DV + d of the token's o_proj input
        _quantize_store(out.to(tl.float32), h * DV, (h + 1) * DV, xq_ptr + b * stride_xqb, xs_ptr + b * stride_xsb,
                        BLOCK_DV, 127.0, False, False, COMPILED, BLOCK_DV)
    else:
        tl.store(o_ptr + b * stride_ob + h * stride_oh + dv * stride_od, out, mask=dv_ok)


@triton.jit
def _decode_combine_token_int8_kernel(
    acc_ptr, m_ptr, l_ptr, xq_ptr, xs_ptr,  # partials as _decode_combine_kernel; x_q int8 [B, H * Dv], x_s fp32 [B, 1]
    H, DV,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_mb, stride_mh, stride_ms,
    stride_xqb, stride_xsb,
    DTYPE: tl.constexpr,  # the model dtype the output is rounded to before it is quantized
    NUM_SPLITS: tl.constexpr,
    BLOCK_HH: tl.constexpr,  # next_pow2(H): every head of the token in one program
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """The combine for an output quantized per token (int8-channel's o_proj input): one program per token combines
    all its heads, rounds to DTYPE, and quantizes the row with one scale (the steps of per_token_quant_int8). The
    splits are summed in order 0..S-1, where _decode_combine_kernel sums a tile: the same value up to fp32 rounding."""
    b = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_HH)
    h_ok = hh < H
    s = tl.arange(0, BLOCK_S)
    hs_mask = h_ok[:, None] & (s < NUM_SPLITS)[None, :]
    ml = b * stride_mb + hh[:, None] * stride_mh + s[None, :] * stride_ms
    m = tl.load(m_ptr + ml, mask=hs_mask, other=float("-inf"))  # (BLOCK_HH, BLOCK_S)
    l = tl.load(l_ptr + ml, mask=hs_mask, other=0.0)
    m_max = tl.max(m, axis=1)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # every split empty (seq_len 0): weights e^-inf = 0
    w = tl.exp(m - m_max[:, None])
    denom = tl.sum(w * l, axis=1)  # (BLOCK_HH,)
    dv = tl.arange(0, BLOCK_DV)
    mask = h_ok[:, None] & (dv < DV)[None, :]
    out = tl.zeros((BLOCK_HH, BLOCK_DV), dtype=tl.float32)
    for j in tl.static_range(NUM_SPLITS):
        wj = tl.sum(tl.where(s[None, :] == j, w, 0.0), axis=1)  # (BLOCK_HH,) split j's weight per head
        a = tl.load(acc_ptr + b * stride_ab + hh[:, None] * stride_ah + j * stride_as + dv[None, :] * stride_ad,
                    mask=mask, other=0.0)
        out += a * wj[:, None]
    out = out / tl.where(denom > 0, denom, 1.0)[:, None]
    v = tl.where(mask, _cast_rn(out, DTYPE, COMPILED).to(tl.float32), 0.0)
    scale = tl.math.div_rn(tl.max(tl.max(tl.abs(v), axis=1), axis=0), 127.0)
    q = _quantize(v, tl.zeros((BLOCK_HH,), dtype=tl.float32) + scale, 127.0, False, COMPILED)
    tl.store(xq_ptr + b * stride_xqb + hh[:, None] * DV + dv[None, :], q, mask=mask)
    tl.store(xs_ptr + b * stride_xsb, scale)


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions that run on any device (numpy); compiled ones need CUDA tensors.
INTERPRETED = not isinstance(_decode_partial_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------------- wrappers


def _d_tiles(dk: int) -> tuple[int, int]:
    """Dk -> (BLOCK_D1, BLOCK_D2): a power-of-two first tile and a power-of-two tile for the rest (0 if none).

    576 -> (512, 64), 128 -> (128, 0), 100 -> (64, 64), 8 -> (16, 0): each at least 16 (tl.dot's K)."""
    if dk <= MIN_DOT:
        return MIN_DOT, 0
    d1 = 1 << (dk.bit_length() - 1)  # largest power of two <= dk
    rest = dk - d1
    return d1, (max(MIN_DOT, next_pow2(rest)) if rest else 0)


def default_num_splits(batch_programs: int, max_context: int, device: torch.device) -> int:
    """How many KV splits a launch of ``batch_programs`` (B x Hkv x head blocks) programs gets.

    Enough programs to give every SM PROGRAMS_PER_SM of them, without cutting ``max_context`` (the block table's
    capacity, host-known) below MIN_SPLIT_TOKENS per split. Depends only on shapes: graph replays keep it.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = cdiv(PROGRAMS_PER_SM * sms, max(1, batch_programs))
    cap = max(1, max_context // MIN_SPLIT_TOKENS)
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
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache (the token's own K/V already stored).

    q: [B, H, Dk] bf16/fp16/fp32 (any strides). k_cache: [num_blocks, block_size, Hkv, Dk], v_cache:
    [num_blocks, block_size, Hkv, head_dim_v] or None (shared KV: values = k_cache[..., :head_dim_v]), q's dtype.
    block_tables: int32 [B, max_blocks] (cache block ids of each sequence, in order). seq_lens: int32 [B] (context
    length including the new token; 0 = padding row, output zeros). scale: softmax scale (1 / sqrt(Dk) usually).
    num_splits: KV splits per sequence (default: ``default_num_splits``); block_n: KV tokens per step (default
    64 for Dk <= 128, else 32). Returns [B, H, head_dim_v] in q's dtype. No host syncs: CUDA-graph capturable.
    """
    out, _, _ = _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, None)
    return out


def int8_output_supported(head_dim_v: int, num_heads: int, group_size: int | None) -> bool:
    """Whether ``paged_decode_attention_int8`` takes these: a power-of-two head of at least MIN_DOT channels (one
    tile, BLOCK_DV == Dv), quantized per head (group_size == head_dim_v) or per token over <= MAX_TOKEN_HEADS heads."""
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v < MIN_DOT:
        return False
    if head_dim_v & (head_dim_v - 1):
        return False
    return group_size == head_dim_v or (group_size is None and num_heads <= MAX_TOKEN_HEADS)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``paged_decode_attention`` with its output quantized to int8 for the linear that reads it (o_proj), where the
    KV splits are combined (with one split there is no combine: the plain kernel, then the quantization launch).

    group_size None: one scale per token (int8-channel), x_s [B, 1]; one combine program per token takes all its
    heads (at most MAX_TOKEN_HEADS), so the result equals ``per_token_quant_int8`` of the plain output up to the
    fp32 order of the sum over splits. group_size == head_dim_v: one scale per head (int8-block's o_proj where the K
    block is the head dim, Llama's 128), x_s [B, H], bit for bit ``per_token_group_quant(out, "int8", group_size)``.
    Returns x_q int8 [B, H * head_dim_v] and x_s float32. ``int8_output_supported`` says which shapes it takes.

    Why: at batch 1 the separate quantization was one more launch per layer (~2.4 us on the H100, 32 per step of
    Llama-3-8B) in a step of latency-bound kernels."""
    if not int8_output_supported(head_dim_v, q.shape[1], group_size):
        raise ValueError(f"paged_decode_attention_int8: head_dim_v {head_dim_v} must be a power of two >= {MIN_DOT} "
                         f"(one tile a head) and group_size None (per token, at most {MAX_TOKEN_HEADS} heads) or "
                         f"head_dim_v (per head); got group_size {group_size} with {q.shape[1]} heads")
    quant = "token" if group_size is None else "head"
    _, x_q, x_s = _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, quant)
    return x_q, x_s


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, quant):
    """Check, resolve the splits and tiles, launch; (out, None, None), or with quant ("head" / "token") (None, x_q,
    x_s). With splits the combine kernel quantizes (per head: each head's output as it writes it; per token:
    ``_decode_combine_token_int8_kernel``, a token's heads in one program). With one split there is no combine, and
    the plain output is quantized by its own launch after the partial kernel (quantizing in the partial kernel's
    epilogue instead, over its 16-row head tiles of a 4-head GQA group, made Llama-3-8B int8-block batch-64 decode
    1.4% slower)."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, head_dim_v)
    b, h, dk = q.shape
    _, page_size, hkv, _ = k_cache.shape
    if block_n is None:
        block_n = 64 if dk <= 128 else 32  # MLA: a 32 x 576 bf16 K tile is already 36 KB
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")
    if num_splits is None:
        programs = b * hkv * cdiv(h // hkv, BLOCK_H)
        num_splits = default_num_splits(programs, block_tables.shape[1] * page_size, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")

    out = torch.empty((b, h, head_dim_v), dtype=q.dtype, device=q.device)
    fused = quant if num_splits > 1 else None  # quantized by the combine; with one split, after the plain output
    x_q = x_s = None
    if fused:
        x_q = torch.empty((b, h * head_dim_v), dtype=torch.int8, device=q.device)
        x_s = torch.empty((b, 1 if fused == "token" else h), dtype=torch.float32, device=q.device)
    if b and h:
        _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, fused, out,
                x_q, x_s)
    if quant and not fused:
        flat = out.view(b, h * head_dim_v)
        x_q, x_s = (per_token_quant_int8(flat) if quant == "token"
                    else per_token_group_quant(flat, "int8", group_size=head_dim_v))
    return (None, x_q, x_s) if quant else (out, None, None)


def _launch(q, k_cache, v_cache, block_tables, seq_lens, scale, head_dim_v, num_splits, block_n, fused, out, x_q, x_s):
    """The kernels of one decode, with its checked shapes and tiles: the partial kernel, then with splits the plain
    combine (into out), the per-head quantizing combine (fused "head") or the per-token one (fused "token")."""
    b, h, dk = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = h // hkv
    head_blocks = cdiv(group, BLOCK_H)
    block_d1, block_d2 = _d_tiles(dk)
    block_dv = max(MIN_DOT, next_pow2(head_dim_v))
    v = k_cache if v_cache is None else v_cache  # shared KV: the first head_dim_v channels of each key
    xq, xs = (x_q, x_s) if fused else (out, out)  # pointers the plain combine never touches
    if num_splits == 1:
        partial = out
        strides_o = (out.stride(0), out.stride(1), 0, out.stride(2))
        m = lse_l = out  # unused (NUM_SPLITS == 1 stores straight to out)
        strides_m = (0, 0, 0)
    else:
        partial = torch.empty((b, h, num_splits, head_dim_v), dtype=torch.float32, device=q.device)
        m = torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device)
        lse_l = torch.empty_like(m)
        strides_o = partial.stride()
        strides_m = m.stride()

    ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _decode_partial_kernel[(b, hkv * head_blocks, num_splits)](
            q, k_cache, v, block_tables, seq_lens,
            partial, m, lse_l,
            float(scale),
            h, group, dk, head_dim_v,
            *q.stride(),
            *k_cache.stride(),
            *v.stride(),
            *block_tables.stride(),
            *strides_o,
            *strides_m,
            PAGE_SIZE=page_size,
            NUM_SPLITS=num_splits,
            HEAD_BLOCKS=head_blocks,
            BLOCK_H=BLOCK_H,
            BLOCK_N=block_n,
            BLOCK_D1=block_d1,
            BLOCK_D2=block_d2,
            BLOCK_DV=block_dv,
            V_FROM_K=v_cache is None and block_dv == block_d1,
            UPCAST=INTERPRETED,
            IEEE=q.dtype == torch.float32,
            COMPILED=not INTERPRETED,
            num_warps=4 if block_dv <= 128 else 8,
            num_stages=2,
        )
        if fused == "token":
            _decode_combine_token_int8_kernel[(b,)](
                partial, m, lse_l, x_q, x_s,
                h, head_dim_v,
                *partial.stride(),
                *m.stride(),
                x_q.stride(0), x_s.stride(0),
                DTYPE=_TL_DTYPES[q.dtype],
                NUM_SPLITS=num_splits,
                BLOCK_HH=next_pow2(h),
                BLOCK_S=next_pow2(num_splits),
                BLOCK_DV=block_dv,
                COMPILED=not INTERPRETED,
                num_warps=8,
            )
        elif num_splits > 1:
            _decode_combine_kernel[(b, h)](
                partial, m, lse_l, out,
                xq, xs,
                head_dim_v,
                *partial.stride(),
                *m.stride(),
                *out.stride(),
                xq.stride(0), xs.stride(0),
                NUM_SPLITS=num_splits,
                BLOCK_S=next_pow2(num_splits),
                BLOCK_DV=block_dv,
                QUANT=fused == "head",
                COMPILED=not INTERPRETED,
                num_warps=4,
            )

