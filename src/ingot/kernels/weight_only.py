"""Weight-only GEMMs for decode: y [M, N] = x [M, K] @ dequant(W).T, activations kept in bf16/fp16 (A16).

- ``w8a16_gemm`` (int8-weight): w_q int8 [N, K], one scale per output channel w_s [N, 1]. The K loop dots x with the
  integer weights (exact in bf16/fp16: |q| <= 128 needs 8 significant bits) in fp32, and the scale is applied once in
  the epilogue.
- ``w4a16_gemm`` (int4-group): compressed-tensors' pack-quantized layout, w_packed int32 [N, cdiv(K, 8)] (value + 8
  stored unsigned, element i at bit 4 * i of its int32, low bits first, along K: ``ingot.formats.base.pack_int32``),
  one scale per row per ``group_size`` columns, w_s [N, cdiv(K, group_size)]. Every K step lies in one group (the
  wrapper checks group_size % BLOCK_K == 0): the step's dot of x with the integers [-8, 7] is scaled by its group's
  scale before it joins the fp32 accumulator, like the K blocks of ``int8_gemm_block``.

Decode is weight-bandwidth bound: at M = 1 every weight byte is used for one multiply-add per row of x, so the time is
the weight's bytes over HBM bandwidth (16.8 MB int8 / 8.4 MB int4 for 4096 x 4096: 5.0 / 2.5 us at 3.35 TB/s, against
10.0 us for its bf16 weight). Three design points follow from that (numbers in kernels/NOTES.md, "weight-only GEMMs"):

1. Swap-AB: each program computes a (BLOCK_N, BLOCK_M) tile of y.T = W @ x.T, so the weight tile is the dot's left
   operand ("M" of the MMA: 64 rows fill Hopper's wgmma and Ampere's mma along their large side) and the handful of
   tokens the right one (16 columns, the smallest a dot takes): no MMA lanes are spent on padding rows of x.
2. Split-K: a 4096-row weight in 64-row tiles is only 64 programs for 132 SMs. When the (M, N) tiles do not give
   ``PROGRAMS_PER_SM`` programs per SM, K is split in ``split_k`` ranges of whole K tiles, each program writes its
   fp32 partial tile to a workspace and bumps its tile's counter, and the split that arrives last sums the partials
   in split order, adds the bias and casts (one launch: int8_gemm's split-K semaphore). The order is fixed, so
   results are deterministic run to run (fp32 atomics would not be, and greedy decoding must be); the partials cost
   split_k * M * N * 4 bytes, 80 KB at M = 1, N = 4096, split 5, against 16.8 MB of weight.
3. Integer -> float by bit tricks, not I2F: an int4 weight per 0.5 byte at 3.35 TB/s is 6.7e12 weights/s, ~28 per
   clock per SM on an H100 (1.83 GHz, 132 SMs), while I2F converts 16 per clock per SM. A nibble u becomes the fp32
   2^23 + u by OR-ing in the exponent bits (0x4B000000) and one fp32 subtraction of 2^23 + 8 gives q = u - 8 exactly.

At M = 1 on CUDA, W4A16 and W8A16 run the Gluon GEMV of ``gemv_gluon`` where a tuned table (or the caller) says
kernel "gluon": pinned register layouts, 16-byte loads, ~4 instead of ~9 instructions per weight (W4A16), warps
along K on small weights (``_run_gluon_gemv`` falls back to the Triton GEMVs below where it cannot run).

References with the same signatures: ``ingot.quant.ref.w8a16_gemm_ref`` / ``w4a16_gemm_ref``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch
import triton
import triton.language as tl

from ingot.kernels import tuning
from ingot.kernels.checks import backend_failed, cdiv, check_device, check_epilogue, check_tensor
from ingot.kernels.int8_gemm import (
    MAX_SPLIT_K_TILES,
    NOMINAL_SMS,
    _split_k_locks,
    _split_k_scratch,
    _split_k_sum,
    _tile_ids,
)
from ingot.kernels.tuning import GemmConfig

X_DTYPES = (torch.bfloat16, torch.float16)
# Split-K aims for this many programs per SM: two resident programs, each with (num_stages - 1) weight tiles in
# flight (8 KB each at 64 x 128 int8), keep ~64 KB of loads outstanding per SM; Little's law wants ~25 KB per SM
# (3.35 TB/s x ~1 us of latency / 132 SMs).
PROGRAMS_PER_SM = 2
# ... but every split keeps at least this many K tiles: a split's partial tile (BLOCK_M x BLOCK_N fp32, 4 KB at
# 16 x 64) is then at most 1/8 of the int8 weight bytes it reads (4 x 64 x 128 = 32 KB).
MIN_K_TILES_PER_SPLIT = 4


# M = 1 runs the GEMV kernels (block_m 1): in `ingot tune` on the H100 they beat the best swap-AB dot tiles on every
# Llama-3-8B shape (W8A16 10.6-47.0 us vs 14.5-75.9 us for the default tiles; W4A16 9.5-38.8 vs 14.2-80.2 us;
# kernels/NOTES.md), and these defaults are the tuner's most frequent winners.
# Default tiles by M bucket (upper bound on M, config), used where no tuned table (ingot.kernels.tuning, ops
# "w8a16_gemm" / "w4a16_gemm") has the shape. GemmConfig's block_m x block_n is the tile of y; the kernels compute it
# transposed (swap-AB, above), so block_n is the weight tile's rows, the dot's large side.
# Decode (M <= 64): BLOCK_M = M rounded up to 16..64, a 64-row weight tile (one wgmma M), BLOCK_K = 128: 8 KB of int8
# or 4 KB of int4 per stage, 5 stages for int8 and 6 for int4 (the int4 tile is half the bytes; x's tile, 4 KB of
# bf16 at BLOCK_M = 16, rides along in every stage: 60 / 48 KB of shared memory, 3-4 programs per SM). Split-K
# (``choose_split_k``) fills the SMs. int4's BLOCK_K stays <= 128 = its group, so a K step never straddles two scales.
# Prefill (M > 64) is tensor-core bound: 128 x 128 x 64 tiles, 4 stages (the int -> bf16 conversion of each weight
# tile happens in registers between the shared-memory load and the MMA), with PREFILL_WARPS warps. W8A16 runs one
# warpgroup: with two (8 warps, its default until session 8) it wrote garbage on the H100
# (benchmarks/scripts/weight_only_prefill_stress.py: bias + bf16 output, NaN-poisoned outputs): a non-finite tile in
# 37-100 of 100 launches at M 256-4096 on 28672x4096, 56 of 100 on 4096x4096 at M 1024, 7 of 100 on SmolLM2's
# 576x1536 at M 4096; with no bias 0 of 60 (M 1024, 28672x4096). The same tiles with 4 warps: 0 of 100 everywhere,
# within 3% of the 8-warp time. Cause not found (the converted weight tile is the wgmma's register operand; triton
# 3.6). W4A16 keeps 8 warps: 0 of 100 on the same six shapes, and 4 warps took 1.66-1.88x longer.
PREFILL_WARPS = {"w8a16_gemm": 4, "w4a16_gemm": 8}
_CONFIGS: dict[str, tuple[tuple[int, GemmConfig], ...]] = {
    "w8a16_gemm": (
        (1, GemmConfig(1, 32, 256, group_m=1, num_warps=4, num_stages=1)),  # GEMV
        (16, GemmConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=5)),
        (32, GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=4)),
        (64, GemmConfig(64, 64, 128, group_m=1, num_warps=4, num_stages=4)),
        (2**62, GemmConfig(128, 128, 64, group_m=8, num_warps=PREFILL_WARPS["w8a16_gemm"], num_stages=4)),
    ),
    "w4a16_gemm": (
        (1, GemmConfig(1, 16, 512, group_m=1, num_warps=4, num_stages=1)),  # GEMV, steps of 4 whole groups
        (16, GemmConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=6)),
        (32, GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=5)),
        (64, GemmConfig(64, 64, 128, group_m=1, num_warps=4, num_stages=4)),
        (2**62, GemmConfig(128, 128, 64, group_m=8, num_warps=PREFILL_WARPS["w4a16_gemm"], num_stages=4)),
    ),
}

OPS = tuple(_CONFIGS)

# Backends of w8a16_gemm / w4a16_gemm. "triton": the kernels above. "dequant": the weight dequantized to x's dtype
# (q * scale in fp32, one rounding) into a transient [N, K] buffer, then torch's matmul (cuBLAS on a GPU): at prefill
# sizes the tensor-core kernels above convert every weight tile in registers between its load and the MMA and run at
# 0.16-0.94x cuBLAS BF16 (H100, M >= 128), while the dequantize pass costs one read of the quantized weight and one
# write + read of its BF16 copy. "auto": "dequant" from DEQUANT_MIN_M rows on, or from DEQUANT_MIN_M_NARROW where the
# kernel's tiles would not fill the GPU (no config given, output in x's dtype; ``choose_backend``), else "triton".
# Peak memory grows by the largest weight's BF16 copy (235 MB for Llama-3-8B's gate_up_proj) while it runs.
BACKENDS = ("auto", "triton", "dequant")
# H100 (benchmarks/results/weight-only-prefill-dequant-*-571998e.json, 9 Llama-3-8B / DeepSeek-V3 shapes): W4A16's
# dequantize path beat its kernel on 8 of 9 shapes at M = 256 (tied the 9th) and on 9 of 9 from M = 512; W8A16's
# kernel still won 3 of 9 at M = 256 (the widest weights) and none from M = 512.
DEQUANT_MIN_M = {"w8a16_gemm": 512, "w4a16_gemm": 256}
# ... and from 128 rows where the kernel's 128 x 128 tiles are fewer than the SMs. Same sweep, M = 128: on the 6
# shapes with 16-56 such tiles the dequantize path won 11 of the 12 (op, shape) pairs and tied the 12th (e.g. W4A16
# 4096 x 4096 0.55x BF16 against 0.25x); on the 3 with >= 144 tiles the kernel won 5 of 6 and tied the 6th
# (28672 x 4096: 0.72x against 0.45x). W8A16 at M = 256: this rule picks the faster path on 7 of 9 shapes, the
# other two within 2%.
DEQUANT_MIN_M_NARROW = 128
DEQUANT_BLOCK_N = 32  # int4 dequantize tile: 32 rows x 128 columns, 2 KB of packed words in, 8 KB of bf16 out


def choose_split_k(m: int, n: int, k: int, config: GemmConfig, num_sms: int) -> int:
    """Split-K for untuned launches: enough K ranges for ``PROGRAMS_PER_SM`` programs per SM, with at least
    ``MIN_K_TILES_PER_SPLIT`` K tiles per range; 1 when the (M, N) tiles alone fill the GPU, and 1 above M = 64
    (the prefill tiles): on the H100, SmolLM2's down_proj (N 576, K 1536) took 69 vs 105 us at M = 4096 and 49 vs
    82 us at M = 512 unsplit vs split in two (benchmarks/results/weight-only-stress-*.json)."""
    if m > 64:
        return 1
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    want = cdiv(PROGRAMS_PER_SM * num_sms, tiles)
    return max(1, min(want, cdiv(k, config.block_k) // MIN_K_TILES_PER_SPLIT))


def default_config(
    op: str, m: int, n: int | None = None, k: int | None = None, num_sms: int | None = None
) -> GemmConfig:
    """The untuned config of ``op`` ("w8a16_gemm" or "w4a16_gemm") for ``m`` rows; with n, k and the SM count, its
    split_k from ``choose_split_k``."""
    table = _CONFIGS.get(op)
    if table is None:
        raise ValueError(f"unknown weight-only op {op!r}; expected one of {', '.join(OPS)}")
    config = next(cfg for bound, cfg in table if m <= bound)
    if n is None or k is None or not num_sms:
        return config
    return replace(config, split_k=choose_split_k(m, n, k, config, num_sms))


def effective_split_k(k: int, config: GemmConfig) -> tuple[int, int]:
    """(K ranges, K tiles per range) a launch uses: config.split_k capped at the K tile count, and never an empty
    range (split 4 over 5 tiles would be 2 + 2 + 1 + 0; it becomes 3 ranges, 2 + 2 + 1)."""
    k_tiles = cdiv(k, config.block_k)
    per = cdiv(k_tiles, max(1, min(config.split_k, k_tiles)))
    return cdiv(k_tiles, per), per


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _k_slice(K, K_TILES_PER_SPLIT, BLOCK_K: tl.constexpr):
    """(pid_k, first, last): this program's split (grid axis 1) and its [first, last) range of K tiles.

    The GEMM loops run K_TILES_PER_SPLIT steps in every program (a short last split masks its extra steps to zeros),
    not range(first, last): on the H100 (triton 3.6) the tensor-core kernels with loop bounds that differ per
    program gave, in 2 of 1200 split-2 launches at M = 4096, one 128-row tile of garbage (NaN in SmolLM2's
    int8-weight WikiText-2 eval); kernels/NOTES.md. The GEMV kernels (no tensor cores) keep range(first, last)."""
    pid_k = tl.program_id(1)
    first = pid_k * K_TILES_PER_SPLIT
    return pid_k, first, tl.minimum(first + K_TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))


@triton.jit
def _int8_values(b):
    """int8 tile -> the same integers in fp32, exactly: 0x4B000080 + v is the fp32 bit pattern of 2^23 + 128 + v
    (v in [-128, 127] keeps it in [2^23, 2^23 + 255], where fp32 spacing is 1), minus 2^23 + 128."""
    return (b.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _int4_values(p, SHIFT: tl.constexpr):
    """Nibble at bit SHIFT of each int32 -> its signed value u - 8 in fp32, exactly (2^23 + u minus 2^23 + 8)."""
    return (((p >> SHIFT) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _unpack_int4(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed int32 tile (BLOCK_N, BLOCK_K // 8) -> fp32 (BLOCK_N, BLOCK_K), column 8 * j + i = nibble i of word j.

    tl.join adds a new *minor* dimension of 2, so three nested joins give (BLOCK_N, BLOCK_K // 8, 2, 2, 2) where index
    (a, b, c) of the last three holds the join's innermost choice a, middle b, outer c: flattened position 4a + 2b + c
    must be nibble 4a + 2b + c, so the innermost joins pair nibbles 4 apart, the middle ones 2 apart, the outer 1 apart.
    Each thread ends up holding a word's 8 values side by side, which the reshape keeps in place (no data movement).
    """
    t = tl.join(
        tl.join(tl.join(_int4_values(p, 0), _int4_values(p, 16)), tl.join(_int4_values(p, 8), _int4_values(p, 24))),
        tl.join(tl.join(_int4_values(p, 4), _int4_values(p, 20)), tl.join(_int4_values(p, 12), _int4_values(p, 28))),
    )
    return tl.reshape(t, (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_affine(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed int32 tile (BLOCK_N, BLOCK_K // 8) -> fp32 f = 1 + u / 16 (BLOCK_N, BLOCK_K) in _unpack_int4's column
    order, u the stored nibble (q + 8): the nibble is shifted straight into mantissa bits 19-22 under the exponent
    of 1.0 - two integer ops per weight and no float subtraction (_int4_values needs three ops). The caller recovers
    q . x = 16 (f . x) - 24 sum(x) per K step: f . x is ~1.5 |x| per term against q . x's ~4 |x|, so the fp32
    cancellation costs a few ulps of the step's sum (exact for integer x: tests pin it)."""
    M: tl.constexpr = 0x780000
    E: tl.constexpr = 0x3F800000
    t = tl.join(
        tl.join(tl.join(((p << 19) & M) | E, ((p << 3) & M) | E), tl.join(((p << 11) & M) | E, ((p >> 5) & M) | E)),
        tl.join(tl.join(((p << 15) & M) | E, ((p >> 1) & M) | E), tl.join(((p << 7) & M) | E, ((p >> 9) & M) | E)),
    )
    return tl.reshape(t, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)


@triton.jit
def _dot_wx(w, a, UPCAST_DOT: tl.constexpr):
    """w fp32 (BLOCK_N, BLOCK_K) holding exact integers, a (BLOCK_K, BLOCK_M) in x's dtype -> fp32 (BLOCK_N, BLOCK_M).

    Compiled: a bf16/fp16 tensor-core dot (w cast to x's dtype, exact) with fp32 accumulation. UPCAST_DOT (the
    interpreter only): both operands in fp32, because triton 3.6's interpreter keeps bf16 as raw uint16 bits and its
    dot multiplies those bits as integers; the values and the fp32 accumulation are the same.
    """
    if UPCAST_DOT:
        return tl.dot(w, a.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(w.to(a.dtype), a)


@triton.jit
def _store_tile(
    acc, rows, cols, offs_n, tile, pid_k, M, N, bias_ptr, y_ptr, part_ptr, lock_ptr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc fp32 (BLOCK_N, BLOCK_M), scaled: y[rows, cols] (+ bias, cast). With split-K, in one launch: each split
    stores its partial tile and the split that arrives last sums them in split order (int8_gemm._split_k_sum; the
    tile is transposed, so its roles of M / N and BLOCK_M / BLOCK_N swap) and stores y."""
    is_last = True
    if SPLIT_K > 1:
        acc, is_last = _split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, N, M, SPLIT_K, BLOCK_N, BLOCK_M)
    if is_last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rows.to(tl.int64)[None, :] * stride_ym + cols[:, None] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(cols[:, None] < N) & (rows[None, :] < M))


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # [M, K] bf16/fp16, int8 [N, K], [N, 1], [N], [M, N]
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk, stride_wsn,
    stride_ym, stride_yn,
    K_TILES_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # no K mask: K % BLOCK_K == 0 and every split has K_TILES_PER_SPLIT tiles
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, _, _ = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M, 1)  # grid axis 0: output tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/columns onto valid ones so the loads need no M/N mask; their results are not stored.
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    pid_k, kt0, _ = _k_slice(K, K_TILES_PER_SPLIT, BLOCK_K)
    k0 = kt0 * BLOCK_K
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M): x.T
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, K_TILES_PER_SPLIT):  # the same trip count in every program: see _k_slice
        kt = kt0 + i
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:  # ragged last K tile, or a tile past a short last split: missing columns load as 0 and add nothing
            k_left = K - kt * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0)
        acc += _dot_wx(_int8_values(b), a, UPCAST_DOT)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    ws = tl.load(ws_ptr + offs_n * stride_wsn).to(tl.float32)  # (BLOCK_N,)
    _store_tile(acc * ws[:, None], rows, cols, offs_n, tl.program_id(0), pid_k, M, N, bias_ptr, y_ptr, part_ptr,
                lock_ptr, stride_ym, stride_yn, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # [M, K], int32 [N, KP], [N, G], [N], [M, N]
    M, N, K, KP,  # KP = cdiv(K, 8): packed words per weight row
    stride_xm, stride_xk,
    stride_wn, stride_wp, stride_wsn, stride_wsg,
    stride_ym, stride_yn,
    K_TILES_PER_SPLIT,
    GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_K (the wrapper checks it): a K step lies in one group
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BLOCK_K // 8  # packed words per K step
    pid_m, pid_n, _, _ = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M, 1)  # grid axis 0: output tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    pid_k, kt0, kt1 = _k_slice(K, K_TILES_PER_SPLIT, BLOCK_K)
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (kt0 * BLOCK_K + offs_k)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (kt0 * BLOCK_P + offs_p)[None, :] * stride_wp  # (BLOCK_N, BLOCK_P)
    ws_ptrs = ws_ptr + offs_n * stride_wsn  # (BLOCK_N,): group column 0 of this tile's rows

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, K_TILES_PER_SPLIT):  # the same trip count in every program: see _k_slice
        kt = kt0 + i
        if EVEN_K:
            a = tl.load(x_ptrs)
            p = tl.load(w_ptrs)
        else:
            # Columns past K load x = 0: they add nothing, whatever the packed padding nibbles (0, i.e. q = -8) hold.
            k_left = K - kt * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            p = tl.load(w_ptrs, mask=offs_p[None, :] < KP - kt * BLOCK_P, other=0)
        dot = _dot_wx(_unpack_int4(p, BLOCK_N, BLOCK_K), a, UPCAST_DOT)  # |dot| <= 8 * sum |x|
        # past a short last split (dot = 0) the group index is clamped to the last group: no read past the scales
        group = (tl.minimum(kt, kt1 - 1) * BLOCK_K) // GROUP_SIZE
        s = tl.load(ws_ptrs + group * stride_wsg).to(tl.float32)  # (BLOCK_N,)
        acc += dot * s[:, None]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_P * stride_wp

    _store_tile(acc, rows, cols, offs_n, tl.program_id(0), pid_k, M, N, bias_ptr, y_ptr, part_ptr, lock_ptr,
                stride_ym, stride_yn, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # as _w8a16_gemm_kernel; M == 1
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk, stride_wsn,
    stride_ym, stride_yn,
    K_TILES_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # unused: no dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LOOP_STAGES: tl.constexpr = 1,  # > 1: the K loop's loads software-pipelined this deep (config.num_stages)
):
    """GEMV (config.block_m == 1, M == 1): y[0, n] = sum_k x[0, k] * q[n, k], then * w_s[n]. No tensor cores and no
    16-row padding of x: each program streams a (BLOCK_N, BLOCK_K) weight tile per step, multiplies it by x's K
    slice on the FMA units and reduces along K; the next tile's load is issued before this one is used (register
    double-buffering), so one tile per program stays in flight while it computes."""
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    pid_k, kt0, kt1 = _k_slice(K, K_TILES_PER_SPLIT, BLOCK_K)
    x_ptrs = x_ptr + (kt0 * BLOCK_K + offs_k) * stride_xk
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (kt0 * BLOCK_K + offs_k)[None, :] * stride_wk
    if EVEN_K:
        b_next = tl.load(w_ptrs)
    else:
        b_next = tl.load(w_ptrs, mask=offs_k[None, :] < K - kt0 * BLOCK_K, other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in tl.range(kt0, kt1, num_stages=LOOP_STAGES):
        b = b_next
        w_ptrs += BLOCK_K * stride_wk
        if EVEN_K:
            b_next = tl.load(w_ptrs, mask=kt + 1 < kt1, other=0)
            a = tl.load(x_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            b_next = tl.load(w_ptrs, mask=(offs_k[None, :] < k_left - BLOCK_K) & (kt + 1 < kt1), other=0)
            a = tl.load(x_ptrs, mask=offs_k < k_left, other=0.0)
        acc += tl.sum(_int8_values(b) * a.to(tl.float32)[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xk

    ws = tl.load(ws_ptr + offs_n * stride_wsn).to(tl.float32)
    rows = tl.arange(0, 1)
    _store_tile((acc * ws)[:, None], rows, cols, offs_n, pid_n, pid_k, M, N, bias_ptr, y_ptr, part_ptr, lock_ptr,
                stride_ym, stride_yn, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # as _w4a16_gemm_kernel; M == 1
    M, N, K, KP,
    stride_xm, stride_xk,
    stride_wn, stride_wp, stride_wsn, stride_wsg,
    stride_ym, stride_yn,
    K_TILES_PER_SPLIT,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # unused: no dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LOOP_STAGES: tl.constexpr = 1,  # > 1: the K loop's loads software-pipelined this deep (config.num_stages)
):
    """GEMV (config.block_m == 1, M == 1) on the packed int4 layout: per step a (BLOCK_N, BLOCK_K // 8) tile of words
    is unpacked in registers (_int4_affine: 1 + u / 16 in fp32, 2 integer ops per weight), multiplied by x's K slice
    on the FMA units and reduced along K per group, each group's sum turned into q . x and scaled by its group scale;
    register double-buffering as in _w8a16_gemv_kernel. A step is part of one group (BLOCK_K divides GROUP_SIZE) or
    NG whole groups (GROUP_SIZE divides BLOCK_K): wider steps read more contiguous bytes per weight row."""
    BLOCK_P: tl.constexpr = BLOCK_K // 8
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1  # groups per K step
    SUB: tl.constexpr = BLOCK_K // NG  # columns per group in a step
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, NG)
    num_groups = tl.cdiv(K, GROUP_SIZE)
    pid_k, kt0, kt1 = _k_slice(K, K_TILES_PER_SPLIT, BLOCK_K)
    x_ptrs = x_ptr + (kt0 * BLOCK_K + offs_k) * stride_xk
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (kt0 * BLOCK_P + offs_p)[None, :] * stride_wp
    ws_ptrs = ws_ptr + offs_n * stride_wsn
    if EVEN_K:
        p_next = tl.load(w_ptrs)
    else:
        p_next = tl.load(w_ptrs, mask=offs_p[None, :] < KP - kt0 * BLOCK_P, other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in tl.range(kt0, kt1, num_stages=LOOP_STAGES):
        p = p_next
        w_ptrs += BLOCK_P * stride_wp
        if EVEN_K:
            p_next = tl.load(w_ptrs, mask=kt + 1 < kt1, other=0)
            a = tl.load(x_ptrs)
        else:
            # x past K loads 0: the padding nibbles of a ragged last word add nothing
            p_next = tl.load(w_ptrs, mask=(offs_p[None, :] < KP - (kt + 1) * BLOCK_P) & (kt + 1 < kt1), other=0)
            a = tl.load(x_ptrs, mask=offs_k < K - kt * BLOCK_K, other=0.0)
        a = a.to(tl.float32)
        fx = _int4_affine(p, BLOCK_N, BLOCK_K) * a[None, :]
        dots = tl.sum(tl.reshape(fx, (BLOCK_N, NG, SUB)), axis=2) * 16.0  # (BLOCK_N, NG): f . x per group
        corr = tl.sum(tl.reshape(a, (NG, SUB)), axis=1) * 24.0  # (NG,)
        g = (kt * BLOCK_K) // GROUP_SIZE + offs_g  # the step's groups (groups past K: scale 0, x 0)
        s = tl.load(ws_ptrs[:, None] + g[None, :] * stride_wsg, mask=(g < num_groups)[None, :], other=0.0)
        acc += tl.sum((dots - corr[None, :]) * s.to(tl.float32), axis=1)
        x_ptrs += BLOCK_K * stride_xk

    rows = tl.arange(0, 1)
    _store_tile(acc[:, None], rows, cols, offs_n, pid_n, pid_k, M, N, bias_ptr, y_ptr, part_ptr, lock_ptr,
                stride_ym, stride_yn, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _w4_dequant_kernel(
    w_ptr, ws_ptr, y_ptr,  # int32 [N, KP], [N, G], [N, K] in x's dtype
    N, K, KP,
    stride_wn, stride_wp, stride_wsn, stride_wsg,
    stride_yn, stride_yk,
    num_k_tiles,
    GROUP_SIZE: tl.constexpr,  # a multiple of BLOCK_K: one scale per row per tile
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w[n, k] = q[n, k] * w_s[n, k // GROUP_SIZE], one (BLOCK_N, BLOCK_K) tile per program (1-D grid, K tiles
    fastest, as dequant._block_dequant_kernel): the exact q from _unpack_int4, one fp32 multiply, one rounding."""
    BLOCK_P: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_n = pid // num_k_tiles
    pid_k = pid % num_k_tiles
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    offs_p = pid_k * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    p = tl.load(w_ptr + rows64[:, None] * stride_wn + offs_p[None, :] * stride_wp,
                mask=row_ok[:, None] & (offs_p < KP)[None, :], other=0)
    s = tl.load(ws_ptr + rows64 * stride_wsn + ((pid_k * BLOCK_K) // GROUP_SIZE) * stride_wsg, mask=row_ok, other=0.0)
    w = _unpack_int4(p, BLOCK_N, BLOCK_K) * s.to(tl.float32)[:, None]
    tl.store(y_ptr + rows64[:, None] * stride_yn + cols[None, :] * stride_yk, w.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < K)[None, :])


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions that run on any device (numpy); compiled ones need CUDA tensors.
INTERPRETED = not isinstance(_w8a16_gemm_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------------- wrappers


def _check_common(
    x: torch.Tensor,
    w: torch.Tensor,
    w_name: str,
    w_dtype: torch.dtype,
    w_s: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.dtype:
    """Checks shared by both GEMMs (dtypes, ranks, contiguity, bias, out, devices); returns the output dtype."""
    check_tensor("x", x, X_DTYPES, 2)
    check_tensor(w_name, w, (w_dtype,), 2)
    if not isinstance(w_s, torch.Tensor):
        raise TypeError(f"w_s must be a torch.Tensor, got {type(w_s).__name__}")
    if w_s.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"w_s must be torch.float32 or x's dtype {x.dtype}, got {w_s.dtype}")
    check_tensor("w_s", w_s, (w_s.dtype,), 2)
    m, n = x.shape[0], w.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    check_epilogue(m, n, bias, out, out_dtype)
    check_device({"x": x, w_name: w, "w_s": w_s, "bias": bias, "out": out}, INTERPRETED)
    return out_dtype


def resolve_config(op: str, config: GemmConfig | None, m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """The config a launch uses: the caller's, else the tuned table's (ingot.kernels.tuning), else the default: at
    M = 1 on an sm_90 GPU with Gluon the Gluon GEMV's (``gluon_default``, where K suits it), else the Triton tiles
    (with their automatic split-K; the interpreter sizes splits for NOMINAL_SMS)."""
    return tuning.resolve_config(op, config, m, n, k, device, lambda sms: untuned_config(op, m, n, k, device, sms))


def untuned_config(op: str, m: int, n: int, k: int, device: torch.device, num_sms: int | None) -> GemmConfig:
    """The config of a launch no tuned table covers: at M = 1 on an sm_90 GPU with Gluon the Gluon GEMV's
    (``gluon_default``) where K suits it, else the Triton tiles of ``default_config``."""
    if m == 1 and _gluon_default_device(device):
        gluon = gluon_default(op, k)
        if gluon is not None:
            return gluon
    return default_config(op, m, n, k, num_sms or NOMINAL_SMS)


# The untuned Gluon GEMV tile: 4 rows per thread, a warp's 32 lanes along K, 4 warps, 2 of them along K - chunks of
# 32 int4 / 16 int8 weights, so K steps of 2048 / 1024. In session 18's sweeps (kernels/NOTES.md) it ran at 0.97 (int8)
# and 0.89 (int4) of each shape's best tile in geometric mean over the 8 of 9 bench shapes it fits (worst 0.91 / 0.76,
# both 2048x7168); the int8 sweep's Triton GEMV tables were 1.12-1.40x slower than the best. One warp along K (steps
# of 1024 / 512) where 2 would waste over 1/8 of the last step; K fitting neither keeps the Triton GEMV.
GLUON_DEFAULT_ROWS, GLUON_DEFAULT_WARPS = 4, 4


def gluon_default(op: str, k: int) -> GemmConfig | None:
    """The Gluon GEMV's untuned config for ``op`` at M = 1 and this K, or None (K suits no default tile)."""
    chunk = tuning.gluon_chunk(tuning.WEIGHT_BITS[op])
    if k % chunk:
        return None
    for wk in (2, 1):
        if tuning.gluon_step_fits(k, chunk * 32 * wk):
            return GemmConfig(1, GLUON_DEFAULT_ROWS * GLUON_DEFAULT_WARPS // wk, chunk * 32 * wk, group_m=1,
                              num_warps=GLUON_DEFAULT_WARPS, num_stages=1, kernel="gluon", warps_k=wk)
    return None


@functools.lru_cache(maxsize=16)
def _gluon_default_device(device: torch.device) -> bool:
    """Whether untuned M = 1 launches on ``device`` take the Gluon GEMV: compiled kernels on an sm_90 GPU (where it
    was measured; other GPUs keep the Triton GEMV until measured there) that can run it."""
    return (device.type == "cuda" and not INTERPRETED and torch.cuda.get_device_capability(device) == (9, 0)
            and tuning._gluon_gemv_available(device))


def _launch(kernels, x, w, w_s, bias, y, sizes, w_strides, ws_strides, config, **constexprs) -> None:
    """Launch the GEMM kernel of ``kernels`` (gemm, gemv) on a (tiles, split) grid - the GEMV one when config.block_m
    is 1. Split-K sums in the same launch (the last split of each tile, see _store_tile).

    sizes: (M, N, K, ...) as the kernel takes them; w_strides / ws_strides: the weight's and the scales' strides."""
    m, n, k = sizes[:3]
    gemv = config.block_m == 1
    if gemv and m != 1:
        raise ValueError(f"config.block_m = 1 (the GEMV kernel) needs M = 1, got M = {m}")
    kernel = kernels[1] if gemv else kernels[0]
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    split, per_split = effective_split_k(k, config) if tiles <= MAX_SPLIT_K_TILES else (1, cdiv(k, config.block_k))
    if split > 1:
        part = torch.empty(split * tiles * config.block_m * config.block_n, dtype=torch.float32, device=x.device)
        locks = _split_k_locks(x.device)
    else:
        part = locks = y  # unused
    # EVEN_K: no load needs a K mask - no ragged K tile, and no short last split (the GEMM kernels, not the GEMVs, run
    # per_split steps in every split)
    even_k = k % config.block_k == 0 and (gemv or cdiv(k, config.block_k) % per_split == 0)
    bias_arg = w_s if bias is None else bias
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        kernel[(tiles, split)](
            x, w, w_s, bias_arg, y, part, locks,
            *sizes,
            x.stride(0), x.stride(1),
            *w_strides, *ws_strides,
            y.stride(0), y.stride(1),
            per_split,
            HAS_BIAS=bias is not None, EVEN_K=even_k, SPLIT_K=split, UPCAST_DOT=INTERPRETED,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
            # the launch's num_stages pipelines only loads that feed a dot; a GEMV's loop asks tl.range for it
            **({"LOOP_STAGES": config.num_stages} if gemv else {}),
            **constexprs,
        )


def choose_backend(op: str, backend: str, m: int, n: int, config: GemmConfig | None, x_dtype: torch.dtype,
                   out_dtype: torch.dtype, device: torch.device) -> str:
    """The backend a call runs on ("triton" or "dequant"), see BACKENDS. "auto" dequantizes from DEQUANT_MIN_M rows,
    and from DEQUANT_MIN_M_NARROW rows when the kernel's 128 x 128 prefill tiles would not fill ``device``'s SMs
    (NOMINAL_SMS off CUDA) - only with no config and an output in x's dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dequant" and config is not None:
        raise ValueError("config selects the triton kernels' tiles; backend='dequant' takes none")
    if backend != "auto":
        return backend
    if config is not None or out_dtype != x_dtype or m < DEQUANT_MIN_M_NARROW:
        return "triton"
    if m >= DEQUANT_MIN_M[op] or cdiv(m, 128) * cdiv(n, 128) < (tuning.num_sms(device) or NOMINAL_SMS):
        return "dequant"
    return "triton"


def _dequant_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T (+ bias) by torch (cuBLAS), w already dequantized to x's dtype; bias added in x's dtype. Written
    straight into y when y has x's dtype, else computed in x's dtype and cast."""
    into = y if y.dtype == x.dtype else torch.empty(y.shape, dtype=x.dtype, device=x.device)
    if bias is None:
        torch.matmul(x, w.t(), out=into)
    else:
        torch.addmm(bias.to(x.dtype), x, w.t(), out=into)
    return into if into is y else y.copy_(into)


def dequantize_w8(w_q: torch.Tensor, w_s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8-weight -> [N, K] in ``dtype``: w_q * w_s per row (dequant.block_dequant with a (1, K) block)."""
    from ingot.kernels.dequant import block_dequant

    return block_dequant(w_q, w_s.float().contiguous(), (1, w_q.shape[1]), dtype)


def dequantize_w4(
    w_packed: torch.Tensor, w_s: torch.Tensor, k: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """int4-group (w4a16_gemm's layout) -> [N, K] in ``dtype``: q * w_s per row and group, one rounding."""
    n, kp = w_packed.shape
    block_k = _k_tile_in_group(128, group_size)
    y = torch.empty((n, k), dtype=dtype, device=w_packed.device)
    if n == 0:
        return y
    num_k_tiles = cdiv(k, block_k)
    with torch.cuda.device(y.device) if y.device.type == "cuda" else contextlib.nullcontext():
        _w4_dequant_kernel[(cdiv(n, DEQUANT_BLOCK_N) * num_k_tiles,)](
            w_packed, w_s, y,
            n, k, kp,
            w_packed.stride(0), w_packed.stride(1), w_s.stride(0), w_s.stride(1),
            y.stride(0), y.stride(1),
            num_k_tiles,
            GROUP_SIZE=group_size, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k, num_warps=4,
        )
    return y


def _k_tile_in_group(block_k: int, group_size: int) -> int:
    """block_k halved until it divides group_size (a no-op for group 128), so that a K tile lies in one group."""
    while block_k >= 16 and group_size % block_k:
        block_k //= 2
    if block_k < 16:
        raise ValueError(
            f"group_size = {group_size} is not a multiple of 16: no K tile (a power of two >= 16) lies in one group"
        )
    return block_k


def _whole_groups(config: GemmConfig, group_size: int) -> bool:
    """The W4A16 GEMV (block_m 1) also runs K steps of several whole groups (block_k a multiple of group_size)."""
    return config.block_m == 1 and config.block_k > group_size and config.block_k % group_size == 0


# The Gluon GEMVs (gemv_gluon.py) where a tuned table or the caller picks them (kernel "gluon", M = 1). Devices
# where its launch failed (a triton whose Gluon cannot build it): the error, and the Triton GEMV from then on.
_gluon_failed: dict = {}


def _gluon_module():
    """ingot.kernels.gemv_gluon, imported on first use (it needs triton's Gluon); None where that import fails."""
    try:
        from ingot.kernels import gemv_gluon
    except ImportError:
        return None
    return gemv_gluon


def _run_gluon_gemv(op: str, caller_config: GemmConfig | None, config: GemmConfig, x: torch.Tensor, w: torch.Tensor,
                    w_s: torch.Tensor, k: int, group_size: int | None, bias: torch.Tensor | None,
                    y: torch.Tensor) -> GemmConfig | None:
    """For a config of kernel "gluon": y from the Gluon GEMV of ``op`` (w4a16_gemm: int4 words and group scales;
    w8a16_gemm: int8 weights and per-channel scales, group_size None), and None. Where it cannot run (the
    interpreter, no Gluon, a device where it failed, operands ``gemv_gluon.unsupported`` refuses) or its launch fails
    (logged once), the Triton GEMV's default config to launch instead; a caller's own "gluon" config that cannot run
    raises."""
    n = w.shape[0]
    bits = tuning.WEIGHT_BITS[op]
    module = None if INTERPRETED else _gluon_module()
    if INTERPRETED or module is None:
        why = "the Triton interpreter" if INTERPRETED else "triton without Gluon"
    else:
        why = _gluon_failed.get(x.device) or module.unsupported(x, w, w_s, k, group_size, config, bits)
    if why is None:
        config = replace(config, split_k=effective_split_k(k, config)[0])  # no empty K range
        _, split, part, locks = _split_k_scratch(config, 1, n, torch.float32, x.device, y)
        config = replace(config, split_k=split)
        try:
            if bits == 4:
                module.w4a16_gemv(x, w, w_s, k, group_size, bias, y, config, part, locks)
            else:
                module.w8a16_gemv(x, w, w_s, bias, y, config, part, locks)
            return None
        except Exception as e:
            if caller_config is not None:
                raise
            backend_failed(_gluon_failed, x.device, f"{op}: the Gluon GEMV failed", e)
    elif caller_config is not None:
        raise ValueError(f"{op}: config.kernel 'gluon' cannot run here: {why}")
    return default_config(op, 1, n, k, tuning.num_sms(x.device))


def w8a16_gemm(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight-only int8 GEMM: y [M, N] = x @ (w_q * w_s).T (+ bias).

    x bf16/fp16 [M, K]; w_q int8 [N, K]; w_s [N, 1] per output channel, float32 or x's dtype (compressed-tensors
    stores it in the model dtype); bias [N] bf16/fp16/fp32 or None; all contiguous. Returns y [M, N] in x's dtype
    (or ``out_dtype``: bf16, fp16 or fp32), written into ``out`` when given. fp32 accumulation, scale and bias in fp32
    in the epilogue. ``config`` overrides the tuned table (ingot.kernels.tuning) or the M-bucketed default tiles
    with their automatic split-K. ``backend``: see BACKENDS ("auto" dequantizes + cuBLAS from DEQUANT_MIN_M rows on:
    the weight rounded once to x's dtype, bias added in x's dtype).
    Reference: ``ingot.quant.ref.w8a16_gemm_ref``.
    """
    out_dtype = _check_common(x, w_q, "w_q", torch.int8, w_s, bias, out, out_dtype)
    m, k = x.shape
    n, kw = w_q.shape
    if kw != k:
        raise ValueError(f"x [M, K] = {tuple(x.shape)} and w_q [N, K] = {tuple(w_q.shape)} disagree on K: {k} != {kw}")
    if k == 0 or n == 0:
        raise ValueError(f"empty GEMM: K = {k}, N = {n} (x {tuple(x.shape)}, w_q {tuple(w_q.shape)})")
    if tuple(w_s.shape) != (n, 1):
        raise ValueError(f"w_s must be per output channel, shape (N, 1) = ({n}, 1), got {tuple(w_s.shape)}")
    y = torch.empty((m, n), dtype=out_dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    if choose_backend("w8a16_gemm", backend, m, n, config, x.dtype, out_dtype, x.device) == "dequant":
        return _dequant_matmul(x, dequantize_w8(w_q, w_s, x.dtype), bias, y)
    caller_config = config
    config = resolve_config("w8a16_gemm", config, m, n, k, x.device)
    if config.kernel == "gluon":
        config = _run_gluon_gemv("w8a16_gemm", caller_config, config, x, w_q, w_s, k, None, bias, y)
        if config is None:
            return y
    _launch(
        (_w8a16_gemm_kernel, _w8a16_gemv_kernel), x, w_q, w_s, bias, y, (m, n, k), (w_q.stride(0), w_q.stride(1)),
        (w_s.stride(0),), config,
    )
    return y


def w4a16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_s: torch.Tensor,
    k: int,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight-only int4 GEMM, symmetric groups: y [M, N] = x @ dequant(w_packed).T (+ bias).

    x bf16/fp16 [M, K] with K = ``k``; w_packed int32 [N, cdiv(K, 8)] in compressed-tensors' pack-quantized layout
    (``ingot.formats.base.pack_int32(q, 4)``: q + 8 in 4 bits, element i at bit 4 * i of its word, low bits first, the
    tail of a ragged last word zero); w_s [N, cdiv(K, group_size)] float32 or x's dtype, w[n, j] = q[n, j] *
    w_s[n, j // group_size]; bias [N] or None; all contiguous. Ragged K (K % 8 != 0, K % group_size != 0) is fine: the
    missing columns multiply x's zero padding. Returns y [M, N] in x's dtype (or ``out_dtype``), written into ``out``
    when given. Each K tile must lie in one group: config.block_k divides group_size (the default tiles are bent to
    it; group_size must then be a multiple of 16). ``backend`` as in ``w8a16_gemm``.
    Reference: ``ingot.quant.ref.w4a16_gemm_ref``.
    """
    out_dtype = _check_common(x, w_packed, "w_packed", torch.int32, w_s, bias, out, out_dtype)
    m, kx = x.shape
    n, kp = w_packed.shape
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int (the unpacked K), got {k!r}")
    if kx != k:
        raise ValueError(f"x [M, K] = {tuple(x.shape)} does not have K = k = {k} columns")
    if kp != cdiv(k, 8):
        raise ValueError(
            f"w_packed must be [N, cdiv(K, 8)] = [{n}, {cdiv(k, 8)}] for K = {k} (8 int4 values per int32), "
            f"got {tuple(w_packed.shape)}"
        )
    if n == 0:
        raise ValueError(f"empty GEMM: N = 0 (w_packed {tuple(w_packed.shape)})")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    groups = cdiv(k, group_size)
    if tuple(w_s.shape) != (n, groups):
        raise ValueError(
            f"w_s must be per row per {group_size}-group, shape (N, cdiv(K, {group_size})) = ({n}, {groups}), "
            f"got {tuple(w_s.shape)}"
        )
    y = torch.empty((m, n), dtype=out_dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    if choose_backend("w4a16_gemm", backend, m, n, config, x.dtype, out_dtype, x.device) == "dequant":
        return _dequant_matmul(x, dequantize_w4(w_packed, w_s, k, group_size, x.dtype), bias, y)
    caller_config = config
    if config is None:
        config = resolve_config("w4a16_gemm", None, m, n, k, x.device)
    elif not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, got {type(config).__name__}")
    if config.kernel == "gluon":
        config = _run_gluon_gemv("w4a16_gemm", caller_config, config, x, w_packed, w_s, k, group_size, bias, y)
        if config is None:
            return y
    if caller_config is None and not _whole_groups(config, group_size):
        config = replace(config, block_k=_k_tile_in_group(config.block_k, group_size))
    if group_size % config.block_k and not _whole_groups(config, group_size):
        raise ValueError(
            f"config.block_k = {config.block_k} must divide group_size = {group_size}: a K step must lie in one group "
            "(one scale per row per step; the GEMV, block_m 1, also takes whole groups per step)"
        )
    _launch(
        (_w4a16_gemm_kernel, _w4a16_gemv_kernel), x, w_packed, w_s, bias, y, (m, n, k, kp),
        (w_packed.stride(0), w_packed.stride(1)), (w_s.stride(0), w_s.stride(1)), config, GROUP_SIZE=group_size,
    )
    return y
