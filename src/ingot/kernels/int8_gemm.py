"""W8A8 INT8 GEMMs: y [M, N] = dequant(x_q) [M, K] @ dequant(w_q).T [K, N], int8 tensor-core dots.

Two scale layouts (ingot.quant.schemes presets):

- ``int8_gemm_channel`` (int8-channel): x_s per token [M, 1], w_s per output channel [N, 1]. The whole K loop
  accumulates int8 x int8 products in int32 (exact), and the scales are applied once in the epilogue:
  y = acc * x_s * w_s (+ bias).
- ``int8_gemm_block`` (int8-block, DeepSeek-style): x_s per token per 128-group [M, cdiv(K, 128)], w_s per 128x128
  block [cdiv(N, 128), cdiv(K, 128)]. The scales change every 128 columns of K, so each K step of exactly one
  block is an int32 dot that is promoted to fp32 and scaled before it joins the fp32 accumulator.

At M = 1 both run a GEMV instead when the config has block_m 1 (the default there, and the tuned H100 tables):
no tensor cores, one dp4a per four int8 products (``_int8_gemv_channel_kernel`` / ``_int8_gemv_block_kernel``).

References with the same signatures: ``ingot.quant.ref.int8_gemm_channel_ref`` / ``int8_gemm_block_ref``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch
import triton
import triton.language as tl

from ingot.kernels.act_quant import X_DTYPES, _quantize, _row_scale, quantize_row_chunks
from ingot.kernels.checks import (
    arrival_counters, backend_failed, cdiv, check_device, check_epilogue, check_tensor, next_pow2,
)
from ingot.kernels import tuning
from ingot.kernels.tuning import GemmConfig

# An int32 accumulator holds K products of at most 128 * 128 = 2^14 (-128 * -128; the symmetric quantizers stop at
# +-127, 16129): K below 2^31 / 2^14 = 131072 can never overflow, whatever the values.
MAX_K_CHANNEL = 2**31 // (128 * 128)


# Default tiles by M bucket (upper bound on M, config), used where no tuned table (ingot.kernels.tuning) has the
# shape. Decode (M <= 64) is weight-bandwidth bound: the [N, K] int8 weight is read once (16.8 MB for 4096 x 4096:
# ~5.6 us at 3 TB/s), so BLOCK_M stays small and BLOCK_N narrow for many programs, and split-K (``_split_k``)
# multiplies them until each SM has ~40 KB of loads in flight (Little's law: 3 TB/s x ~1.5 us latency / 132 SMs).
# Prefill is tensor-core bound: 128x128x128 tiles, 8 warps (two warpgroups), 4 stages of 32 KB of shared memory.
# BLOCK_K = 128 everywhere: one 128-byte row segment of int8 per load, and the block kernel's K step must be one
# quantization block.
_CONFIGS: tuple[tuple[int, GemmConfig], ...] = (
    (16, GemmConfig(16, 32, 128, group_m=1, num_warps=4, num_stages=5)),
    (32, GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=5)),
    (64, GemmConfig(64, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (2**62, GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4)),
)
MAX_SPLIT_K = 16
SPLIT_K_TARGET_PROGRAMS = 2  # per SM

# M = 1, int8 operands: the dp4a GEMV (block_m 1). `ingot tune` on the H100 picked it over every tensor-core tile
# for all 9 Llama-3-8B / DeepSeek-V3 shapes of both ops (benchmarks/results/tune-gemv-m1-*.log). Channel: 16 rows x
# 512 bytes per step, 8 warps, no split won 8 of 9. Block (K step = the 128-column block): the winners were 16-64
# rows with split-K to ~2-4 programs per SM; the default takes 32 rows, split to GEMV_BLOCK_PROGRAMS per SM, at
# least 4 K blocks per split (as the tensor-core default).
GEMV_CHANNEL = GemmConfig(1, 16, 512, group_m=1, num_warps=8, num_stages=1)
GEMV_BLOCK = GemmConfig(1, 32, 128, group_m=1, num_warps=4, num_stages=1)
GEMV_BLOCK_PROGRAMS = 4  # per SM
GEMV_OPS = ("int8_gemm_channel", "int8_gemm_block")
# int8_gemm_channel_rowmax's GEMV steps through K at least this many bytes at a time (the channel tables' 512 where
# K allows): each step's quantization is a fixed cost that longer steps amortize. H100, M = 1, 8 warps, 16 rows
# (kernels/NOTES.md, session 22): 4096x4096 8.99 -> 8.46 us, 4096x14336 25.3 -> 22.8, 6144x4096 11.5 -> 11.1.
QUANT_X_BLOCK_K = 1024
# SMs assumed when there is no CUDA device (the interpreter): an H100's, so CPU tests take the same split decisions.
NOMINAL_SMS = 132


def default_config(m: int, n: int | None = None, k: int | None = None, num_sms: int | None = None,
                   op: str | None = None) -> GemmConfig:
    """The untuned tile config for an [m, k] x [n, k] GEMM (both kernels). With n, k and the SM count, decode
    shapes whose output tiles alone cannot fill the GPU get split-K: each split streams K / split_k of the weight.
    With ``op`` int8_gemm_channel / int8_gemm_block, M = 1 gets the GEMV (the wrappers fall back to the tensor-core
    tiles where the operands cannot be read as int32 words)."""
    if m == 1 and op in GEMV_OPS and n and k:
        if op == "int8_gemm_channel":
            return GEMV_CHANNEL
        tiles = cdiv(n, GEMV_BLOCK.block_n)
        split = min(8, max(1, GEMV_BLOCK_PROGRAMS * (num_sms or NOMINAL_SMS) // tiles),
                    max(1, cdiv(k, GEMV_BLOCK.block_k) // 4))
        return replace(GEMV_BLOCK, split_k=split)
    config = next(cfg for bound, cfg in _CONFIGS if m <= bound)
    if n is None or k is None or not num_sms or m > 64:
        return config
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    k_tiles = cdiv(k, config.block_k)
    split = min(MAX_SPLIT_K, max(1, (SPLIT_K_TARGET_PROGRAMS * num_sms) // tiles), max(1, k_tiles // 4))
    return replace(config, split_k=split) if split > 1 else config


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """(pid_m, pid_n, pid_k, tile): grouped ordering - consecutive tiles cover GROUP_M row tiles x all column tiles
    (L2 reuse of W) - and SPLIT_K consecutive programs per tile, each taking one slice of K."""
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n, pid_k, tile


@triton.jit
def _k_range(K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(first, steps, k_tiles): split pid_k covers K tiles [first, first + steps) clipped to k_tiles - contiguous
    slices of cdiv(K tiles, SPLIT_K) tiles (the last may be short or empty; an empty slice contributes a zero
    partial). ``steps`` is the same in every program: the loops run it and mask the steps past k_tiles to zeros,
    because loops bounded per program (range(first, last)) gave rare garbage tiles in the weight-only kernels on
    the H100 (kernels/NOTES.md, session 6)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    steps = tl.cdiv(k_tiles, SPLIT_K)
    return pid_k * steps, steps, k_tiles


@triton.jit
def _operand_tiles(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """This program's output tile and K slice: (rows, cols, offs_m, offs_n, offs_k, kt_first, steps, k_tiles,
    x_ptrs (BM, BK), w_ptrs (BK, BN) at K tile kt_first, pid_n, pid_k, tile) - see _k_range. Out-of-range
    rows/columns wrap onto valid ones so the loads need no M/N mask; their results are never stored."""
    pid_m, pid_n, pid_k, tile = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    kt_first, steps, k_tiles = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (kt_first * BLOCK_K + offs_k[None, :]) * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (kt_first * BLOCK_K + offs_k[:, None]) * stride_wk
    return rows, cols, offs_m, offs_n, offs_k, kt_first, steps, k_tiles, x_ptrs, w_ptrs, pid_n, pid_k, tile


@triton.jit
def _load_k_tile(x_ptrs, w_ptrs, offs_k, K, kt, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr):
    """The (BM, BK) activation and (BK, BN) weight tiles of K tile kt; a ragged last tile loads its missing columns
    as zeros, and so does a whole tile past K (a short split's surplus step; fp8 takes a float zero: an int 0 does not
    cast to fp8)."""
    if EVEN_K:
        a = tl.load(x_ptrs)
        b = tl.load(w_ptrs)
    elif FP8:
        k_left = K - kt * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    else:
        k_left = K - kt * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
    return a, b


@triton.jit
def _store_tile(y_ptr, y, rows, cols, M, N, stride_ym, stride_yn):
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, M, N,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K in one launch: every split stores its partial tile, then bumps the tile's counter; the split that
    arrives last (counter == SPLIT_K - 1) sums all partials (int32 partials stay exact), resets the counter to 0 for
    the next launch and runs the epilogue. Returns (sum, is_last); only is_last's sum is complete.

    Ordering: the barrier makes the program's stores precede its counter bump, which is acq_rel at GPU scope (the
    CUTLASS semaphore pattern); the last split reads the partials with .cg loads (L2, never a stale L1 line)."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(part_ptr + (pid_k * num_tiles + tile).to(tl.int64) * tile_elems + offs, acc, cache_modifier=".cg")
    tl.debug_barrier()
    count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    is_last = count == SPLIT_K - 1
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
    if is_last:
        for s in tl.static_range(SPLIT_K):
            total += tl.load(part_ptr + (s * num_tiles + tile).to(tl.int64) * tile_elems + offs, cache_modifier=".cg")
        tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    return total, is_last


@triton.jit
def _int8_gemm_channel_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # int8 [M, K], fp32 [M, 1], int8 [N, K], fp32 [N, 1], [N], [M, N]
    part_ptr, lock_ptr,  # split-K: int32 partial tiles [SPLIT_K, tiles, BLOCK_M * BLOCK_N], int32 counters [tiles]
    M, N, K,
    stride_xm, stride_xk, stride_xsm,
    stride_wn, stride_wk, stride_wsn,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # no K mask (see _launch)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rows, cols, offs_m, offs_n, offs_k, kt_first, steps, k_tiles, x_ptrs, w_ptrs, pid_n, pid_k, tile = _operand_tiles(
        x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # A `for` over range, not a `while`: triton software-pipelines only for loops (num_stages of loads in flight).
    for i in range(0, steps):
        kt = kt_first + i
        a, b = _load_k_tile(x_ptrs, w_ptrs, offs_k, K, kt, BLOCK_K, EVEN_K, False)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    is_last = True
    if SPLIT_K > 1:
        acc, is_last = _split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    if is_last:
        xs = tl.load(xs_ptr + offs_m * stride_xsm)  # (BLOCK_M,)
        ws = tl.load(ws_ptr + offs_n * stride_wsn)  # (BLOCK_N,)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        _store_tile(y_ptr, y, rows, cols, M, N, stride_ym, stride_yn)


@triton.jit
def _block_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # q [M, K], fp32 [M, KB], q [N, K], fp32 [NB, KB], [N], [M, N]
    part_ptr, lock_ptr,  # split-K: fp32 partial tiles [SPLIT_K, tiles, BLOCK_M * BLOCK_N], int32 counters [tiles]
    M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    SCALE_N: tl.constexpr,  # weight block rows (128)
    WS_PER_COLUMN: tl.constexpr,  # the N tile spans several weight block rows (BLOCK_N does not divide SCALE_N)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,  # operands are float8_e4m3fn (fp32 dot) instead of int8 (int32 dot)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """int8-block and fp8-block: BLOCK_K is the K quantization block (the wrappers check it), so K step kt uses
    scale column kt; each step's dot is promoted to fp32 and scaled before it joins the fp32 accumulator."""
    rows, cols, offs_m, offs_n, offs_k, kt_first, steps, k_tiles, x_ptrs, w_ptrs, pid_n, pid_k, tile = _operand_tiles(
        x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)
    xs_ptrs = xs_ptr + offs_m * stride_xsm  # (BLOCK_M,): column 0 of this tile's token scales
    if WS_PER_COLUMN:
        # (BLOCK_N,): each column's weight block row (BLOCK_N = 256 spans two). The gather costs BLOCK_N loads and
        # registers per K step: 28672x4096 at M = 4096 took 1728 us with it and 1269 us with one scalar (ingot tune,
        # H100, same 128x128x128 default tiles), so only where tiles need it.
        ws_ptrs = ws_ptr + (offs_n // SCALE_N) * stride_wsn
    else:
        ws_ptrs = ws_ptr + ((pid_n * BLOCK_N) // SCALE_N) * stride_wsn  # scalar: the tile's one block row

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The scales are loaded one K step ahead of their use, so their latency overlaps a step's MMA instead of
    # stalling the promotion: -1% to +16% (median 4%) at M = 1024 / 4096 on the H100 (kernels/NOTES.md, session 9).
    # A step past K (dot = 0) reads the last scale column, not past the scales.
    ks = tl.minimum(kt_first, k_tiles - 1)
    xs_next = tl.load(xs_ptrs + ks * stride_xsk)  # (BLOCK_M,)
    ws_next = tl.load(ws_ptrs + ks * stride_wsk)  # (BLOCK_N,) or scalar
    for i in range(0, steps):
        kt = kt_first + i
        xs = xs_next
        ws = ws_next
        ks = tl.minimum(kt + 1, k_tiles - 1)
        xs_next = tl.load(xs_ptrs + ks * stride_xsk)
        ws_next = tl.load(ws_ptrs + ks * stride_wsk)
        a, b = _load_k_tile(x_ptrs, w_ptrs, offs_k, K, kt, BLOCK_K, EVEN_K, FP8)
        if FP8:
            dot = tl.dot(a, b, out_dtype=tl.float32)
        else:
            dot = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)  # |dot| <= 128 * 2^14 = 2^21: exact in fp32
        if WS_PER_COLUMN:
            acc += dot * (xs[:, None] * ws[None, :])
        else:
            acc += dot * (xs[:, None] * ws)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    is_last = True
    if SPLIT_K > 1:
        acc, is_last = _split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    if is_last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        _store_tile(y_ptr, acc, rows, cols, M, N, stride_ym, stride_yn)


@triton.jit
def _dp4a(w, x, acc, ASM: tl.constexpr):
    """acc + the dot products of the four signed bytes packed in each int32 of w and x (elementwise, broadcast).
    ASM: one ``dp4a.s32.s32`` per word (sm_61+); otherwise the bytes are sign-extended by shifts (the interpreter,
    which cannot run inline PTX). Both are exact integer sums."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            acc += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _gemv_words(x_ptr, w_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The GEMV program's rows and K slice over the int32 views of x_q [1, K / 4] and w_q [N, K / 4] (4 int8 per
    word, unit stride along K): (cols, offs_n, offs_w, kt_first, steps, k_tiles, x_ptrs (BLOCK_K / 4,), w_ptrs
    (BLOCK_N, BLOCK_K / 4), pid_n, pid_k, tile) - see _k_range. BLOCK_K counts bytes of K; a K step reads BLOCK_K / 4
    words per row."""
    pid_m, pid_n, pid_k, tile = _tile_ids(1, N, 1, BLOCK_N, 1, SPLIT_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = (cols % N).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_K // 4)
    kt_first, steps, k_tiles = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    x_ptrs = x_ptr + kt_first * (BLOCK_K // 4) + offs_w
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (kt_first * (BLOCK_K // 4) + offs_w)[None, :]
    return cols, offs_n, offs_w, kt_first, steps, k_tiles, x_ptrs, w_ptrs, pid_n, pid_k, tile


@triton.jit
def _gemv_step(x_ptrs, w_ptrs, acc, offs_w, K, kt, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DP4A: tl.constexpr):
    """acc (BLOCK_N, BLOCK_K / 4) int32 + the word-wise byte dot products of K step kt; words past K load as 0."""
    if EVEN_K:
        a = tl.load(x_ptrs)
    else:
        a = tl.load(x_ptrs, mask=offs_w < K // 4 - kt * (BLOCK_K // 4), other=0)
    return _gemv_dot(a, w_ptrs, acc, offs_w, K, kt, BLOCK_K, EVEN_K, DP4A)


@triton.jit
def _gemv_dot(a, w_ptrs, acc, offs_w, K, kt, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DP4A: tl.constexpr):
    """acc + the byte dot products of x's words a (BLOCK_K / 4,) with the weight words of K step kt."""
    if EVEN_K:
        b = tl.load(w_ptrs)
    else:
        b = tl.load(w_ptrs, mask=(offs_w < K // 4 - kt * (BLOCK_K // 4))[None, :], other=0)
    return _dp4a(b, a[None, :], acc, DP4A)


@triton.jit
def _quantized_words(xe_ptrs, s, left, EVEN_K: tl.constexpr, COMPILED: tl.constexpr):
    """x's int8 words for one K step, quantized here: xe_ptrs (BLOCK_K / 4, 4) point at the step's model-dtype
    elements (word w holds elements 4w .. 4w + 3, byte i = element 4w + i: x_q's int32 view), s (1,) the row's
    scale; ``per_token_quant_int8``'s steps (act_quant._quantize), so the words are those of its x_q. Elements at or
    past ``left`` (K minus the step's first element) are 0."""
    j = tl.arange(0, 4)[None, :]
    if EVEN_K:
        xv = tl.load(xe_ptrs)
    else:
        e = tl.arange(0, xe_ptrs.shape[0])[:, None] * 4 + j
        xv = tl.load(xe_ptrs, mask=e < left, other=0.0)
    q = _quantize(xv.to(tl.float32), s, 127.0, False, COMPILED).to(tl.int32)
    return tl.sum((q & 0xFF) << (j * 8), axis=1)


@triton.jit
def _int8_gemv_channel_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # int32 views: x_q [1, K / 4], w_q [N, K / 4]; the rest as GEMM
    part_ptr, lock_ptr,
    M, N, K,
    stride_xsm, stride_wn, stride_wsn, stride_yn,
    C,  # QUANT_X: the number of maxima at xs_ptr
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,  # BLOCK_M, GROUP_M: 1
    SPLIT_K: tl.constexpr,
    DP4A: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    QUANT_X: tl.constexpr = False,  # x_ptr: the model-dtype row x [1, K]; xs_ptr: C maxima of its column ranges
    BLOCK_C: tl.constexpr = 2,  # QUANT_X: next_pow2(C)
    COMPILED: tl.constexpr = True,  # QUANT_X: libdevice rounding (not the interpreter)
):
    """int8_gemm_channel at M = 1 (config.block_m == 1): no tensor cores and no 16-row padding of x. Each program
    streams a (BLOCK_N, BLOCK_K) int8 weight tile per K step as int32 words, dp4a's them against x's words into an
    int32 accumulator of the tile's shape (no cross-thread reduction inside the loop), and sums along K once at the
    end. The integer sum is exact, so y is bit-identical to the tensor-core kernel's. Split-K as the GEMM kernel.

    QUANT_X (``int8_gemm_channel_rowmax``): x arrives unquantized with the maxima of its column ranges, and every
    program quantizes the K steps it reads (the row's scale from the maxima): the words per_token_quant_int8 would
    have stored, without its launch - or, after the decode attention, without the row-wide pass (a second arrival
    chain over its head groups) that per-token quantization of a many-program producer needs.

    The epilogue's scales (and bias) are loaded before the K loop: issued after it, their latency (the weight scales
    come from HBM) followed the loop's last step in every program, a serial round trip at the end of each launch."""
    cols, offs_n, offs_w, kt_first, steps, _, x_ptrs, w_ptrs, pid_n, pid_k, tile = _gemv_words(
        x_ptr, w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K)
    if QUANT_X:
        xs = _row_scale(xs_ptr, C, BLOCK_C)  # (1,)
        xe_ptrs = x_ptr + kt_first * BLOCK_K + offs_w[:, None] * 4 + tl.arange(0, 4)[None, :]
    else:
        xs = tl.load(xs_ptr)
    ws = tl.load(ws_ptr + offs_n * stride_wsn)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.int32)
    for i in tl.range(0, steps, num_stages=LOOP_STAGES):  # LOOP_STAGES > 1: the loads pipelined (cp.async)
        if QUANT_X:
            a = _quantized_words(xe_ptrs, xs, K - (kt_first + i) * BLOCK_K, EVEN_K, COMPILED)
            acc = _gemv_dot(a, w_ptrs, acc, offs_w, K, kt_first + i, BLOCK_K, EVEN_K, DP4A)
            xe_ptrs += BLOCK_K
        else:
            acc = _gemv_step(x_ptrs, w_ptrs, acc, offs_w, K, kt_first + i, BLOCK_K, EVEN_K, DP4A)
            x_ptrs += BLOCK_K // 4
        w_ptrs += BLOCK_K // 4
    dot = tl.sum(acc, axis=1)[None, :]  # (1, BLOCK_N)

    is_last = True
    if SPLIT_K > 1:
        dot, is_last = _split_k_sum(dot, part_ptr, lock_ptr, tile, pid_k, 1, N, SPLIT_K, 1, BLOCK_N)
    if is_last:
        y = dot.to(tl.float32) * xs * ws[None, :]
        if HAS_BIAS:
            y += bias[None, :]
        _store_tile(y_ptr, y, tl.arange(0, 1), cols, 1, N, 0, stride_yn)


@triton.jit
def _int8_gemv_block_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # int32 views of x_q, w_q as the channel GEMV; scales as GEMM
    part_ptr, lock_ptr,
    M, N, K,
    stride_xsk, stride_wn, stride_wsn, stride_wsk, stride_yn,
    SCALE_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,  # BLOCK_M, GROUP_M: 1
    SPLIT_K: tl.constexpr,
    DP4A: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """int8_gemm_block at M = 1: as the channel GEMV, but BLOCK_K is the K quantization block, so each step's integer
    dot is summed along K, promoted to fp32 and scaled by x_s[0, kt] * w_s[n // SCALE_N, kt] before it joins the
    fp32 accumulator (the same products, in the same order, as the tensor-core kernel)."""
    cols, offs_n, offs_w, kt_first, steps, k_tiles, x_ptrs, w_ptrs, pid_n, pid_k, tile = _gemv_words(
        x_ptr, w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, SPLIT_K)
    ws_ptrs = ws_ptr + (offs_n // SCALE_N) * stride_wsn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=LOOP_STAGES):
        kt = kt_first + i
        words = _gemv_step(x_ptrs, w_ptrs, tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.int32), offs_w, K, kt,
                           BLOCK_K, EVEN_K, DP4A)
        ks = tl.minimum(kt, k_tiles - 1)  # a step past K (dot = 0) reads the last scale column
        xs = tl.load(xs_ptr + ks * stride_xsk)
        ws = tl.load(ws_ptrs + ks * stride_wsk)
        acc += tl.sum(words, axis=1).to(tl.float32) * (xs * ws)
        x_ptrs += BLOCK_K // 4
        w_ptrs += BLOCK_K // 4
    acc2 = acc[None, :]

    is_last = True
    if SPLIT_K > 1:
        acc2, is_last = _split_k_sum(acc2, part_ptr, lock_ptr, tile, pid_k, 1, N, SPLIT_K, 1, BLOCK_N)
    if is_last:
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        _store_tile(y_ptr, acc2, tl.arange(0, 1), cols, 1, N, 0, stride_yn)


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions that run on any device (numpy); compiled ones need CUDA tensors.
INTERPRETED = not isinstance(_int8_gemm_channel_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------------- wrappers


def _check_operands(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    qdtype: torch.dtype = torch.int8,
) -> tuple[int, int, int]:
    """Checks shared by the W8A8 GEMMs; returns (M, N, K). Scale shapes are checked by each op."""
    check_tensor("x_q", x_q, (qdtype,), 2)
    check_tensor("x_s", x_s, (torch.float32,), 2, contiguous=False)  # may be the act quantizer's column-major view
    check_tensor("w_q", w_q, (qdtype,), 2)
    check_tensor("w_s", w_s, (torch.float32,), 2)
    m, k = x_q.shape
    n, kw = w_q.shape
    if kw != k:
        raise ValueError(
            f"x_q [M, K] = {tuple(x_q.shape)} and w_q [N, K] = {tuple(w_q.shape)} disagree on K: {k} != {kw}"
        )
    if k == 0 or n == 0:
        raise ValueError(f"empty GEMM: K = {k}, N = {n} (x_q {tuple(x_q.shape)}, w_q {tuple(w_q.shape)})")
    check_epilogue(m, n, bias, out, out_dtype)
    check_device({"x_q": x_q, "x_s": x_s, "w_q": w_q, "w_s": w_s, "bias": bias, "out": out}, INTERPRETED)
    return m, n, k


def resolve_config(op: str, config: GemmConfig | None, m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """The config a launch uses: the caller's, else the tuned table's (ingot.kernels.tuning), else the default."""
    return tuning.resolve_config(op, config, m, n, k, device, lambda sms: default_config(m, n, k, sms, op))


# Split-K counters: one int32 per output tile, zero between launches (the last split of a tile resets its own).
# One buffer per device, made before first use; launches that share it must not overlap (one stream per device, as
# ingot's engine runs). 65536 tiles cover any decode GEMM (M <= 64 and BLOCK_N >= 16: N up to 1M); beyond, no split.
MAX_SPLIT_K_TILES = 65536


def _split_k_locks(device: torch.device) -> torch.Tensor:
    return arrival_counters(device, MAX_SPLIT_K_TILES, "split-K GEMM")


def _split_k_scratch(config: GemmConfig, m: int, n: int, part_dtype: torch.dtype, device: torch.device,
                     unused: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(tiles, split_k, part, locks) of a launch: the output tiles, the split (1 beyond MAX_SPLIT_K_TILES), and with
    a split its partial-tile scratch and the device's tile counters; ``unused`` stands in for both without one."""
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    split_k = config.split_k if tiles <= MAX_SPLIT_K_TILES else 1
    if split_k == 1:
        return tiles, 1, unused, unused
    part = torch.empty(split_k * tiles * config.block_m * config.block_n, dtype=part_dtype, device=device)
    return tiles, split_k, part, _split_k_locks(device)


def _launch(kernel, device: torch.device, config: GemmConfig, m: int, n: int, k: int, part_dtype: torch.dtype,
            *args, **constexprs) -> None:
    """Grid, split-K scratch and launch of one GEMM (the kernels take part_ptr, lock_ptr after the six operands)."""
    tiles, split_k, part, locks = _split_k_scratch(config, m, n, part_dtype, device, args[0])
    # EVEN_K, no K mask: no ragged K tile, and every split's steps are whole tiles inside K (see _k_range)
    even_k = k % config.block_k == 0 and cdiv(k, config.block_k) % split_k == 0
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(tiles * split_k,)](
            *args[:6], part, locks, *args[6:],
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            SPLIT_K=split_k, EVEN_K=even_k, num_warps=config.num_warps, num_stages=config.num_stages,
            **constexprs,
        )


# dp4a is inline PTX: compiled kernels on NVIDIA GPUs only; the interpreter sign-extends bytes with shifts
DP4A = not INTERPRETED and torch.version.hip is None


def _gemv_plan(op: str, x_q: torch.Tensor, w_q: torch.Tensor, mnk: tuple[int, int, int],
               config: GemmConfig) -> tuple[tuple | None, GemmConfig]:
    """(words, config) for a launch of ``op``: words = the int32 views x_q [1, K / 4] and w_q [N, K / 4] that the GEMV
    kernels read when the config has block_m 1 and the operands allow it, else None with the tensor-core config to
    run - the caller's, or for a GEMV config the operands cannot take (fp8, K % 4 != 0, not 4-byte aligned) the
    default tiles (with the config's K step: the block ops tie it to their K block). block_m 1 at M > 1 is refused."""
    m, n, k = mnk
    if config.block_m != 1:
        return None, config
    if m != 1:
        raise ValueError(f"config.block_m = 1 (the GEMV kernel) needs M = 1, got M = {m}")
    if op in GEMV_OPS and k % 4 == 0 and x_q.data_ptr() % 4 == 0 and w_q.data_ptr() % 4 == 0:
        return (x_q.view(torch.int32), w_q.view(torch.int32)), config
    fallback = default_config(m, n, k, tuning.num_sms(x_q.device))  # no op: tensor-core tiles
    return None, fallback if op == "int8_gemm_channel" else replace(fallback, block_k=config.block_k)


def _run_sm90_decode(op: str, caller_config: GemmConfig | None, config: GemmConfig, backend: str,
                     mnk: tuple[int, int, int], x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor,
                     w_s: torch.Tensor, block_size: tuple[int, int] | None, bias: torch.Tensor | None,
                     y: torch.Tensor) -> GemmConfig | None:
    """For a config of kernel "sm90" (the caller's, else a tuned table's, which picks it at M <= 64): y from the
    Hopper swap-AB decode kernel, and None. Otherwise the Triton config to launch: ``config`` itself, or the Triton
    default tiles where a table's "sm90" entry cannot run here (backend "triton", not int8 on sm_90, operands the
    TMA cannot read, a device where it failed before) or its launch fails (logged once; the device then stays on
    Triton). A caller's own "sm90" config that cannot run raises, and its launch errors propagate."""
    if config.kernel != "sm90":
        return config
    m, n, k = mnk
    why = "backend 'triton'" if backend == "triton" else sm90_unsupported(x_q, w_q, block_size)
    if why is None:
        blocked = block_size is not None
        _, split_k, part, locks = _split_k_scratch(config, m, n, torch.float32 if blocked else torch.int32,
                                                   x_q.device, x_s)
        if split_k != config.split_k:
            config = replace(config, split_k=split_k)
        launch = functools.partial(_sm90_module().int8_skinny_gemm_sm90, x_q, x_s, w_q, w_s, bias, y, config,
                                   blocked, part, locks)
        if caller_config is not None:
            launch()
            return None
        try:
            launch()
            return None
        except Exception as e:  # a triton whose Gluon cannot build or launch it: Triton from now on
            backend_failed(_sm90_failed, x_q.device, f"{op}: the sm_90 decode kernel failed", e)
    elif caller_config is not None:
        raise ValueError(f"{op}: config.kernel 'sm90' cannot run here: {why}")
    fallback = default_config(m, n, k, tuning.num_sms(x_q.device), op)
    return fallback if block_size is None else replace(fallback, block_k=block_size[1])


def int8_gemm_channel(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token x per-channel W8A8 GEMM: y [M, N] = (x_q @ w_q.T) * x_s * w_s.T (+ bias).

    x_q int8 [M, K], x_s float32 [M, 1] (per token), w_q int8 [N, K], w_s float32 [N, 1] (per output channel),
    bias [N] bf16/fp16/fp32 or None; all contiguous. Returns y [M, N] in ``out_dtype`` (bf16, fp16 or fp32),
    written into ``out`` when given. int32 accumulation over all of K (exact, split-K partials included; K < 131072
    so it cannot overflow), scales and bias in fp32 in the epilogue. ``config`` overrides the tuned/default tiles.

    ``backend``: "auto" (the Hopper kernel ``ingot.kernels.gemm_sm90.int8_channel_gemm_sm90`` at M >= its
    CHANNEL_MIN_M where ``sm90_unsupported`` is None and no ``config`` is given, else Triton; a failure to compile or
    launch it is logged once and that device stays on Triton), "triton", or "sm90" (raises where it does not apply).
    Both give the same bits.
    Reference: ``ingot.quant.ref.int8_gemm_channel_ref``.
    """
    m, n, k = _check_operands(x_q, x_s, w_q, w_s, bias, out_dtype, out)
    if tuple(x_s.shape) != (m, 1):
        raise ValueError(f"x_s must be per token, shape (M, 1) = ({m}, 1), got {tuple(x_s.shape)}")
    _check_channel_weight(n, k, w_s)
    y = _sm90_gemm("int8_gemm_channel", backend, None, config, x_q, x_s, w_q, w_s, bias, out_dtype, out)
    if y is not None:
        return y
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    config = _run_sm90_decode("int8_gemm_channel", config,
                              resolve_config("int8_gemm_channel", config, m, n, k, x_q.device), backend, (m, n, k),
                              x_q, x_s, w_q, w_s, None, bias, y)
    if config is None:
        return y
    words, config = _gemv_plan("int8_gemm_channel", x_q, w_q, (m, n, k), config)
    if words is not None:
        _launch(
            _int8_gemv_channel_kernel, x_q.device, config, m, n, k, torch.int32,
            words[0], x_s, words[1], w_s, x_s if bias is None else bias, y,
            m, n, k,
            x_s.stride(0), words[1].stride(0), w_s.stride(0), y.stride(1), 1,
            HAS_BIAS=bias is not None, DP4A=DP4A, LOOP_STAGES=config.num_stages,
        )
        return y
    _launch(
        _int8_gemm_channel_kernel, x_q.device, config, m, n, k, torch.int32,
        x_q, x_s, w_q, w_s, x_s if bias is None else bias, y,
        m, n, k,
        x_q.stride(0), x_q.stride(1), x_s.stride(0),
        w_q.stride(0), w_q.stride(1), w_s.stride(0),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
    )
    return y


def _check_channel_weight(n: int, k: int, w_s: torch.Tensor) -> None:
    """A per-output-channel weight scale [N, 1], and a K whose int32 sums cannot overflow."""
    if tuple(w_s.shape) != (n, 1):
        raise ValueError(f"w_s must be per output channel, shape (N, 1) = ({n}, 1), got {tuple(w_s.shape)}")
    if k >= MAX_K_CHANNEL:
        raise ValueError(f"K = {k} may overflow the int32 accumulator (K * 128^2 >= 2^31); K must be < {MAX_K_CHANNEL}")


def rowmax_gemv_config(n: int, k: int, device: torch.device, config: GemmConfig | None = None) -> GemmConfig | None:
    """The config ``int8_gemm_channel_rowmax`` runs its quantizing GEMV with at M = 1 for an [N, K] weight on
    ``device`` (the caller's, else the channel op's own M = 1 choice with steps of at least QUANT_X_BLOCK_K bytes), or
    None where it would quantize first instead: a config that is not the Triton GEMV (block_m 1), or K % 4 != 0 (no
    int32 words). What a producer asks before handing a linear its activation's maxima (``Linear.takes_row_maxima``)."""
    chosen = resolve_config("int8_gemm_channel", config, 1, n, k, device)
    if chosen.block_m != 1 or chosen.kernel != "triton" or k % 4:
        return None
    if config is not None:
        return chosen
    return replace(chosen, block_k=max(chosen.block_k, min(QUANT_X_BLOCK_K, next_pow2(k))))


def int8_gemm_channel_rowmax(
    x: torch.Tensor,
    x_maxima: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``int8_gemm_channel`` of ``per_token_quant_int8(x)``, for an x whose producer wrote the max |x| of column
    ranges covering each row (x_maxima float32 [M, C], any C >= 1, as ``act_quant.quantize_row_chunks`` takes them:
    silu * up's chunks, the decode attention's head groups).

    x [M, K] bf16/fp16/fp32, contiguous; the rest as ``int8_gemm_channel``. At M = 1 with a GEMV config (block_m 1:
    the default and the tuned tables' choice for the int8 ops at M = 1) the GEMV quantizes x itself, step by step as
    it reads it (``_int8_gemv_channel_kernel``'s QUANT_X): no quantization launch, no x_q in memory. Otherwise
    ``quantize_row_chunks`` and then ``int8_gemm_channel``. The same bits either way, those of quantizing x with
    ``per_token_quant_int8`` and multiplying - when the maxima are x's.
    Reference: ``ingot.quant.ref.int8_gemm_channel_rowmax_ref``.

    Why: per-token quantization needs the whole row's amax, which a producer spread over many programs has only at
    its end: the decode attention ran a second arrival chain over its head groups for it, silu * up a second launch.
    Llama-3-8B, H100, batch 1 (kernels/NOTES.md, session 22): alone, the GEMV that quantizes cost 0.4-0.8 us more
    than the plain one and 1.4-1.7 us less than quantize_row_chunks + the plain one; end to end, o_proj taking the
    attention's maxima saved ~10 us a token in one call (3.485 -> 3.475 ms) and was within the noise in another,
    down_proj taking silu * up's cost 25-35 us (the engine keeps silu * up's quantization launch)."""
    check_tensor("x", x, X_DTYPES, 2)
    check_tensor("x_maxima", x_maxima, (torch.float32,), 2)
    check_tensor("w_q", w_q, (torch.int8,), 2)
    check_tensor("w_s", w_s, (torch.float32,), 2)
    m, k = x.shape
    if x_maxima.shape[0] != m or x_maxima.shape[1] < 1:
        raise ValueError(f"x_maxima must be [M, C] = [{m}, C >= 1] (the maxima of x's column ranges), got "
                         f"{tuple(x_maxima.shape)}")
    plan = None
    if m == 1 and w_q.shape[0] and w_q.shape[1] == k and w_q.data_ptr() % 4 == 0:
        plan = rowmax_gemv_config(w_q.shape[0], k, x.device, config)
    if plan is None:  # int8_gemm_channel checks the rest
        x_q, x_s = quantize_row_chunks(x, x_maxima)
        return int8_gemm_channel(x_q, x_s, w_q, w_s, bias, out_dtype, config=config, out=out)
    n = w_q.shape[0]
    _check_channel_weight(n, k, w_s)
    check_epilogue(1, n, bias, out, out_dtype)
    check_device({"x": x, "x_maxima": x_maxima, "w_q": w_q, "w_s": w_s, "bias": bias, "out": out}, INTERPRETED)
    y = torch.empty((1, n), dtype=out_dtype, device=x.device) if out is None else out
    words = w_q.view(torch.int32)
    _launch(
        _int8_gemv_channel_kernel, x.device, plan, 1, n, k, torch.int32,
        x, x_maxima, words, w_s, x_maxima if bias is None else bias, y,
        1, n, k,
        0, words.stride(0), w_s.stride(0), y.stride(1), x_maxima.shape[1],
        HAS_BIAS=bias is not None, DP4A=DP4A, LOOP_STAGES=plan.num_stages,
        QUANT_X=True, BLOCK_C=max(2, next_pow2(x_maxima.shape[1])), COMPILED=not INTERPRETED,
    )
    return y


def check_block_operands(
    op: str,
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> tuple[int, int, int]:
    """The operand checks of a block-scaled GEMM (op "int8_gemm_block" or "fp8_gemm_block"); returns (M, N, K)."""
    qdtype = torch.float8_e4m3fn if op == "fp8_gemm_block" else torch.int8
    m, n, k = _check_operands(x_q, x_s, w_q, w_s, bias, out_dtype, out, qdtype)
    bn, bk = block_size
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_size (bn, bk) needs bn >= 1 and bk a power of two >= 16 (the K tile), got {tuple(block_size)}")
    kb = cdiv(k, bk)
    if tuple(x_s.shape) != (m, kb):
        raise ValueError(
            f"x_s must be per token per {bk}-group, shape (M, cdiv(K, {bk})) = ({m}, {kb}), got {tuple(x_s.shape)}"
        )
    if tuple(w_s.shape) != (cdiv(n, bn), kb):
        raise ValueError(
            f"w_s must be per {bn}x{bk} block, shape (cdiv(N, {bn}), cdiv(K, {bk})) = ({cdiv(n, bn)}, {kb}), "
            f"got {tuple(w_s.shape)}"
        )
    return m, n, k


def launch_block_gemm(
    op: str,
    mnk: tuple[int, int, int],
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None,
    out: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """The block-scaled GEMM's Triton launch behind ``int8_gemm_block`` (op "int8_gemm_block", int8 operands) and
    ``ingot.kernels.fp8_gemm.fp8_gemm_block`` (op "fp8_gemm_block", float8_e4m3fn operands), on operands that
    ``check_block_operands`` passed (it returned ``mnk``); a config of kernel "sm90" (int8 only) runs the Hopper
    decode kernel instead (``_run_sm90_decode``)."""
    m, n, k = mnk
    bn, bk = block_size
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    caller_config = config
    if config is None:  # tuned or default tiles, bent to the K block (a no-op for 128x128)
        config = resolve_config(op, None, m, n, k, x_q.device)
        config = replace(config, block_k=bk) if config.block_k != bk and config.kernel != "sm90" else config
    config = resolve_config(op, config, m, n, k, x_q.device)  # checks a caller's config
    if config.kernel == "sm90":  # promotes each K block of its K steps on its own
        if config.block_k % bk:
            raise ValueError(f"config.block_k = {config.block_k} must be a multiple of the K quantization block {bk}")
    elif config.block_k != bk:
        raise ValueError(
            f"config.block_k = {config.block_k} must equal the K quantization block {bk}: one scale per K step"
        )
    config = _run_sm90_decode(op, caller_config, config, backend, mnk, x_q, x_s, w_q, w_s, block_size, bias, y)
    if config is None:
        return y
    words, config = _gemv_plan(op, x_q, w_q, mnk, config)
    if words is not None:
        _launch(
            _int8_gemv_block_kernel, x_q.device, config, m, n, k, torch.float32,
            words[0], x_s, words[1], w_s, x_s if bias is None else bias, y,
            m, n, k,
            x_s.stride(1), words[1].stride(0), w_s.stride(0), w_s.stride(1), y.stride(1),
            SCALE_N=bn, HAS_BIAS=bias is not None, DP4A=DP4A, LOOP_STAGES=config.num_stages,
        )
        return y
    _launch(
        _block_gemm_kernel, x_q.device, config, m, n, k, torch.float32,
        x_q, x_s, w_q, w_s, x_s if bias is None else bias, y,
        m, n, k,
        x_q.stride(0), x_q.stride(1), x_s.stride(0), x_s.stride(1),
        w_q.stride(0), w_q.stride(1), w_s.stride(0), w_s.stride(1),
        y.stride(0), y.stride(1),
        SCALE_N=bn, WS_PER_COLUMN=bn % config.block_n != 0, HAS_BIAS=bias is not None, FP8=op == "fp8_gemm_block",
    )
    return y


def int8_gemm_block(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token-per-group x block W8A8 GEMM: y [M, N] = sum over K blocks kb of
    (x_q[:, kb] @ w_q[:, kb].T) * x_s[:, kb] * w_s[n // bn, kb] (+ bias).

    x_q int8 [M, K], x_s float32 [M, cdiv(K, bk)] (per token per bk-group; row-major or the column-major view
    per_token_group_quant makes), w_q int8 [N, K], w_s float32 [cdiv(N, bn), cdiv(K, bk)] (per bn x bk block),
    block_size (bn, bk) = (128, 128) by default, bias [N] or None. Ragged N and K are fine (the last K block is
    zero-padded, as the quantizers treat it). Returns y [M, N] in ``out_dtype`` (bf16, fp16 or fp32), written into
    ``out`` when given. The K tile must be the K block: config.block_k == bk (one scale column per K step; the sm90
    decode kernel's K steps may be whole multiples, each block promoted on its own); N tiles may span block rows
    (each column reads its own block row's scale).

    ``backend``: "auto" (the Hopper kernel ``ingot.kernels.gemm_sm90.int8_block_gemm_sm90`` where its
    ``block_wanted`` says so for M and N, ``sm90_unsupported`` is None and no ``config`` is given, else Triton; a
    failure to compile or launch it is logged once and that device stays on Triton), "triton", or "sm90" (raises
    where it does not apply).
    Both give the same bits.
    Reference: ``ingot.quant.ref.int8_gemm_block_ref``.
    """
    m, n, k = check_block_operands("int8_gemm_block", x_q, x_s, w_q, w_s, block_size, bias, out_dtype, out)
    y = _sm90_gemm("int8_gemm_block", backend, block_size, config, x_q, x_s, w_q, w_s, bias, out_dtype, out)
    if y is not None:
        return y
    return launch_block_gemm("int8_gemm_block", (m, n, k), x_q, x_s, w_q, w_s, block_size, bias, out_dtype, config,
                             out, backend)


BACKENDS = ("auto", "triton", "sm90")
_sm90_failed: dict[torch.device, str] = {}  # device -> why an sm_90 kernel raised there (then "auto" stays on Triton)


@functools.cache
def _sm90_module():
    """ingot.kernels.gemm_sm90, imported on first use (it needs triton's Gluon, triton >= 3.5); None where that
    import fails (remembered: a failed import is not cached by Python and would be retried every call)."""
    try:
        from ingot.kernels import gemm_sm90
    except ImportError:
        return None
    return gemm_sm90


def _sm90_gemm(op: str, backend: str, block_size: tuple[int, int] | None, config: GemmConfig | None,
               x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor | None:
    """``op`` (int8_gemm_block with ``block_size``, int8_gemm_channel without) on the Hopper kernel where ``backend``
    says so: "sm90" always (raising where it cannot run), "auto" where ``auto_backend`` picks it. None where Triton
    runs instead, which includes "auto" after the kernel raised (logged once; that device stays on Triton)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "sm90":
        why_not = sm90_unsupported(x_q, w_q, block_size)
        if why_not:
            raise ValueError(f"{op} backend 'sm90': {why_not}")
    elif backend == "triton" or auto_backend(x_q, w_q, block_size, config) == "triton":
        return None
    kernel = getattr(_sm90_module(), "int8_channel_gemm_sm90" if block_size is None else "int8_block_gemm_sm90")
    if backend == "sm90":
        return kernel(x_q, x_s, w_q, w_s, bias, out_dtype, out)
    try:
        return kernel(x_q, x_s, w_q, w_s, bias, out_dtype, out)
    except Exception as e:  # a triton whose Gluon cannot build or launch it: Triton from now on
        backend_failed(_sm90_failed, x_q.device, f"{op}: the sm_90 kernel failed", e)
        return None


def auto_backend(x_q: torch.Tensor, w_q: torch.Tensor, block_size: tuple[int, int] | None = None,
                 config: GemmConfig | None = None) -> str:
    """The backend ``int8_gemm_block(backend="auto")`` (with ``block_size``) or ``int8_gemm_channel(backend="auto")``
    (without) runs for these operands: "sm90" or "triton". M is checked before the device, so decode-sized calls
    pay no device query."""
    if config is not None or x_q.device.type != "cuda":
        return "triton"
    sm90 = _sm90_module()
    if sm90 is None:
        return "triton"
    m = x_q.shape[0]
    if block_size is None:
        wanted = m >= sm90.CHANNEL_MIN_M
    else:
        wanted = sm90.block_wanted(m, w_q.shape[0], x_q.device)
    return "sm90" if wanted and sm90_unsupported(x_q, w_q, block_size) is None else "triton"


def sm90_unsupported(x_q: torch.Tensor, w_q: torch.Tensor, block_size: tuple[int, int] | None = None) -> str | None:
    """None when ``int8_gemm_block`` (with ``block_size``) or ``int8_gemm_channel`` (without) can run these (checked)
    operands on the Hopper kernel, else why not."""
    if INTERPRETED:
        return "the triton interpreter runs no Gluon"
    if x_q.device in _sm90_failed:
        return f"raised on this device before: {_sm90_failed[x_q.device]}"
    if _sm90_module() is None:
        return f"triton {triton.__version__} has no Gluon with Hopper support (import failed)"
    return _sm90_module().supported(x_q, w_q, block_size)
