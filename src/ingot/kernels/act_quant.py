"""Dynamic activation quantization: x [..., K] (bf16/fp16/fp32) -> x_q [..., K] (int8 / fp8 e4m3) and float32 x_s.

- ``per_token_group_quant``: one scale per token per ``group_size`` channels (int8-block, fp8-block activations),
  x_s [..., cdiv(K, g)], row-major or stored column-major for DeepGEMM/SGLang-style block GEMMs.
- ``per_token_quant_int8``: one scale per token (int8-channel activations), x_s [..., 1].

References with the same math: ``ingot.quant.ref.quantize_act_group`` / ``quantize_act_token``; the kernels equal
them bit for bit (q and scales), on the CPU interpreter and on the GPU:

- s = amax / QMAX with an IEEE round-to-nearest fp32 division. Triton's ``/`` on fp32 lowers to ``div.full.f32`` on
  NVIDIA GPUs (approximate, up to 2 ulp off); ``tl.math.div_rn`` lowers to ``div.rn.f32`` (and to numpy's IEEE
  division in the interpreter). The same division makes q: x / s, not x * (1 / s), as the reference does - with
  div_rn's bits but cheaper, compiled (``_div_rows``: one reciprocal per row and two fma corrections per element).
- ue8m0 scales are 2^ceil(log2(amax / 448)), made exactly from the bits of the fp32 scale.
- int8: round half to even, clamp to +-127 (never -128). fp8: clamp to +-448, round half to even onto the e4m3 grid.
  Both round with ``_rint`` (libdevice ``rint`` when compiled; an exact fp32 trick in the interpreter, which cannot
  call libdevice), and fp8 values are rounded onto the grid *before* the cast, because the interpreter's fp32 -> fp8
  cast rounds ties away from zero (17.0 -> 18, not 16; measured in triton 3.6), while the GPU's
  ``cvt.rn.satfinite`` rounds half to even: an on-grid value casts exactly on both.
- An all-zero group gets scale 0 and q 0 (the division is by 1 there), ragged K is padded with zeros.
- Inputs must be finite: the reference raises on NaN/Inf, the kernels do not check (that would cost a reduction).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ingot.kernels.checks import cdiv, next_pow2

# Largest quantized magnitude: a scale is amax / QMAX. (The same numbers as ingot.quant.schemes.QMAX; kernels sit
# below quant in the import order, so they are spelled out here.)
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
Q_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_FMTS = ("float", "ue8m0")

# Tiles. A program of per_token_group_quant owns BLOCK_M rows x one group (BLOCK_G = group_size rounded up to a power
# of two, the lanes past group_size masked): ~4096 elements, 8 KB of bf16 in and 4 KB of int8/fp8 out, 32 elements
# per thread at 4 warps. M = 16384, K = 7168, g = 128: 512 row blocks x 56 groups = 28672 programs.
TILE_ELEMS = 4096
# Inputs of up to SMALL_INPUT_ELEMS elements take programs of SMALL_TILE_ELEMS: 4x the programs, so more of their
# loads are in flight at once where a few microseconds of latency dominate (H100, M = 1024, int8: K = 1536 4.40 ->
# 3.72 us, K = 2048 5.03 -> 4.30, K = 4096 7.29 -> 7.04; at K = 7168 the small tiles lost, 10.02 -> 11.04 us).
SMALL_INPUT_ELEMS = 1 << 22
SMALL_TILE_ELEMS = 1024
MAX_GROUP_SIZE = 4096  # one group is one row of the tile: larger groups would spill registers
# per_token_quant_int8: rows of up to ONE_PASS_MAX_K channels are loaded once into registers (BLOCK_K = K rounded up
# to a power of two, ONE_PASS_ELEMS_PER_WARP elements per warp, 4-16 warps): at decode one program per row, its
# loads all in flight at once. (v1 looped over K in 1024-column chunks twice - amax, then quantize: at M = 1 that
# is 2 x K / 1024 dependent round trips to memory, ~4.5 us per call for K = 4096 in a decode graph on the H100.)
# Longer rows loop over K in chunks of MAX_BLOCK_K (two passes: the second re-reads a BLOCK_M x K slab from L2).
ONE_PASS_MAX_K = 32768
ONE_PASS_ELEMS_PER_WARP = 1024
MAX_BLOCK_K = 1024
# quantize_row_chunks: columns per program (its grid is M x cdiv(K, ROW_CHUNK), whatever the maxima's ranges).
ROW_CHUNK = 1024
# _div_rows' fast path takes a tile whose divisors all lie in [FAST_DIV_MIN, FAST_DIV_MAX]: there the reciprocal is
# a normal number and the residual of every quotient that matters is exact - of every quotient >= 2^-11, a margin
# below the smallest an int8 rounding (0.5) or the e4m3 cast (2^-10, half its smallest subnormal) can tell from zero.
# Scales outside (amax below ~2^-83 or above ~2^127) take div_rn.
FAST_DIV_MIN = tl.constexpr(2.0 ** -90)
FAST_DIV_MAX = tl.constexpr(2.0 ** 120)
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rint(y, USE_LIBDEVICE: tl.constexpr):
    """fp32 -> fp32 rounded to the nearest integer, ties to even, keeping the sign (rint(-0.3) = -0.0).

    The interpreter branch is exact for |y| < 2^23 (callers clamp first): |y| + 2^23 lies in [2^23, 2^24), where
    fp32 values are spaced by 1, so the IEEE addition itself rounds half to even; subtracting 2^23 is exact.
    """
    if USE_LIBDEVICE:
        r = libdevice.rint(y)  # cvt.rni.f32.f32
    else:
        mag = (tl.abs(y) + 8388608.0) - 8388608.0
        sign = y.to(tl.uint32, bitcast=True) & 0x80000000
        r = (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return r


@triton.jit
def _round_to_e4m3(y, USE_LIBDEVICE: tl.constexpr):
    """Round fp32 y, |y| <= 448, half to even onto the e4m3 grid (result still fp32, exactly representable in e4m3).

    e4m3 keeps 3 mantissa bits: spacing 2^(e-3) for |y| in [2^e, 2^(e+1)), e >= -6, and 2^-9 below 2^-6
    (subnormals). y / spacing is exact (a power of two), lands in [0, 16), and is rounded to an integer.
    """
    e = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
    e = tl.maximum(e, 127 - 6)
    inv_spacing = ((257 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - (e - 127))
    spacing = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2^((e - 127) - 3)
    return _rint(y * inv_spacing, USE_LIBDEVICE) * spacing


@triton.jit
def _ceil_pow2(s):
    """Positive fp32 s -> the smallest power of two >= s (0 -> 0), exactly: the ue8m0 scale format.

    Normal s: bump the exponent unless the mantissa is zero ((bits + 0x7FFFFF) carries into the exponent iff a mantissa
    bit is set) and clear the mantissa. Subnormal s is bits * 2^-149: round the integer up to a power of two (bit
    smear); 2^23 is the bit pattern of 2^-126, the smallest normal, so the two cases meet.
    """
    bits = s.to(tl.int32, bitcast=True)
    normal = (bits + 0x7FFFFF) & 0x7F800000
    v = bits - 1  # 0 -> -1, which the smear keeps at -1, and -1 + 1 = 0
    v = v | (v >> 1)
    v = v | (v >> 2)
    v = v | (v >> 4)
    v = v | (v >> 8)
    v = v | (v >> 16)
    out = tl.where(bits < 0x800000, v + 1, normal)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _div_rows(x, s, USE_LIBDEVICE: tl.constexpr):
    """x fp32 (R, C) / s fp32 (R,) per row, rounded to nearest even: ``tl.math.div_rn``'s bits, wherever the
    quotient is at least 2^-11 in magnitude (below, where int8 rounding and the e4m3 cast give zero either way, it
    may differ in its last bits but keeps the sign).

    Compiled, and every s of the tile within [FAST_DIV_MIN, FAST_DIV_MAX]: r = 1 / s correctly rounded (rcp.rn, one
    per row), q = x r, then twice q += (x - q s) r by fma - the steps div.rn.f32's fast path runs after its
    reciprocal approximation and a Newton step, here without its per-element range check (FCHK) and the slow-path
    call each division carries. The quantizing RMSNorm of a 4096-channel row: 2.63 -> 2.34 us a call (H100;
    kernels/NOTES.md, session 21).
    Checked bit for bit against div_rn on the GPU for every 11-bit x mantissa (all bf16 and fp16 values) against
    every fp32 s mantissa, quotients 2^-12 to 2^9, and on random 24-bit x mantissas (test_act_quant.py,
    test_gpu_div_rows_equals_div_rn). Otherwise - a scale out of range, or the interpreter, whose fma is an unfused
    numpy multiply-add - div_rn itself."""
    if USE_LIBDEVICE:
        if (tl.min(s, axis=0) >= FAST_DIV_MIN) & (tl.max(s, axis=0) <= FAST_DIV_MAX):
            r = libdevice.rcp_rn(s)[:, None]
            minus_s = -s[:, None]
            q = libdevice.mul_rn(x, r)
            q = libdevice.fma_rn(libdevice.fma_rn(q, minus_s, x), r, q)
            y = libdevice.fma_rn(libdevice.fma_rn(q, minus_s, x), r, q)
            # x's sign, which every quotient has (s > 0): for x = -0 the corrections' exact zeros sum to +0, where
            # div_rn gives -0 (and the fp8 cast keeps it)
            sign = x.to(tl.uint32, bitcast=True) & 0x80000000
            y = ((y.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)
        else:
            y = tl.math.div_rn(x, s[:, None])
    else:
        y = tl.math.div_rn(x, s[:, None])
    return y


@triton.jit
def _quantize(x, s, QMAX: tl.constexpr, IS_FP8: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """x fp32 (BLOCK_M, BLOCK), s fp32 (BLOCK_M,) -> q (BLOCK_M, BLOCK) int8 or float8e4nv."""
    divisor = tl.where(s > 0, s, 1.0)  # an all-zero group: scale 0, q = x / 1 = 0
    y = _div_rows(x, divisor, USE_LIBDEVICE)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8 and USE_LIBDEVICE:  # compiled: cvt.rn.satfinite.e4m3x2.f32 rounds half to even itself
        q = y.to(tl.float8e4nv)
    elif IS_FP8:  # the interpreter's cast: round onto the e4m3 grid first, then the cast is exact
        q = _round_to_e4m3(y, USE_LIBDEVICE).to(tl.float8e4nv)
    else:
        q = _rint(y, USE_LIBDEVICE).to(tl.int8)
    return q


@triton.jit
def _cast_rn(v, dtype: tl.constexpr, COMPILED: tl.constexpr):
    """fp32 v -> ``dtype`` rounded to nearest, ties to even: the cast every torch op of a bf16/fp16 model ends with.

    Compiled, that is the plain cast (cvt.rn). Triton 3.6's interpreter truncates fp32 -> bf16 casts (measured: 526 of
    1000 random values one ulp off), so there bf16 is rounded on the bits first (add 0x7FFF plus the lowest kept bit,
    clear the low half: exact for finite values) and the cast of the rounded value is exact. Its fp16 cast already
    rounds to nearest even.
    """
    if not COMPILED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _quantize_store(
    v, col0, N, q_row_ptr, s_row_ptr,
    GROUP: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr, UE8M0: tl.constexpr, COMPILED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Quantize one row tile and store it: the epilogue of the ops that produce a quantized activation
    (ingot.kernels.norm_rope.rms_norm_quant, ingot.kernels.silu_mul.silu_mul_quant).

    v: fp32 (BLOCK,), the values of channels col0 + [0, BLOCK) of one row (already rounded to the model dtype: what
    an unfused op would have stored), lanes at or past N zero. One scale per GROUP lanes (GROUP divides BLOCK and
    col0; GROUP == BLOCK with col0 == 0: one scale for the row, per_token_quant_int8). The same steps as
    ``_per_token_group_quant_kernel`` / ``_per_token_quant_int8_kernel`` (amax, div_rn, ``_quantize``), so q and
    the scales are bit-identical to quantizing the stored values with those kernels.
    q_row_ptr / s_row_ptr: the row's x_q (unit stride) and x_s (unit stride: scale of group g at s_row_ptr + g).
    """
    NG: tl.constexpr = BLOCK // GROUP
    v2 = tl.reshape(v, (NG, GROUP))
    amax = tl.max(tl.abs(v2), axis=1)  # (NG,)
    s = tl.math.div_rn(amax, QMAX)
    if UE8M0:
        s = _ceil_pow2(s)
    q = _quantize(v2, s, QMAX, IS_FP8, COMPILED)
    g = tl.arange(0, NG)
    cols = col0 + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(q_row_ptr + cols, q, mask=cols < N)
    first = col0 + g * GROUP  # a group exists when its first channel does (ragged last group: padded with zeros)
    tl.store(s_row_ptr + first // GROUP, s, mask=first < N)


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr, q_ptr, s_ptr,  # x [M, K], x_q [M, K], x_s [M, G] (any strides: row- or column-major)
    M, K, group_size,
    stride_xm, stride_xk,
    stride_qm, stride_qk,
    stride_sm, stride_sg,
    num_groups,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    UE8M0: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= group_size, a power of two
):
    # 1-D grid, groups fastest: consecutive programs walk along the same BLOCK_M rows (contiguous memory), and the
    # grid can exceed the 65535 limit of the second grid axis.
    pid = tl.program_id(0)
    pid_g = pid % num_groups
    pid_m = pid // num_groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_G)
    cols = pid_g * group_size + j
    row_ok = rows < M
    mask = row_ok[:, None] & ((j < group_size) & (cols < K))[None, :]  # ragged last group: missing lanes are 0
    rows64 = rows.to(tl.int64)  # M * K can pass 2^31
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_M, BLOCK_G)

    amax = tl.max(tl.abs(x), axis=1)  # (BLOCK_M,)
    s = tl.math.div_rn(amax, QMAX)
    if UE8M0:
        s = _ceil_pow2(s)
    q = _quantize(x, s, QMAX, IS_FP8, USE_LIBDEVICE)

    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + pid_g * stride_sg, s, mask=row_ok)


@triton.jit
def _per_token_quant_int8_kernel(
    x_ptr, q_ptr, s_ptr,  # x [M, K], x_q int8 [M, K], x_s fp32 [M, 1]
    M, K,
    stride_xm, stride_xk,
    stride_qm, stride_qk,
    stride_sm,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK_K >= K: a row tile is loaded once, kept in registers, reduced and quantized
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + k[None, :] * stride_xk
    q_ptrs = q_ptr + rows64[:, None] * stride_qm + k[None, :] * stride_qk
    if ONE_PASS:
        mask = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
        tl.store(q_ptrs, _quantize(x, s, 127.0, False, USE_LIBDEVICE), mask=mask)
        tl.store(s_ptr + rows64 * stride_sm, s, mask=row_ok)
        return

    # while, not `for k0 in range(0, K, BLOCK_K)`: triton 3.6's interpreter turns a run-time loop bound into a Python
    # int with int(1-element array), which numpy >= 2.4 refuses (TypeError); a while condition is read with bool().
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k0 = 0
    while k0 < K:
        mask = row_ok[:, None] & (k0 + k < K)[None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        k0 += BLOCK_K
    s = tl.math.div_rn(amax, 127.0)

    k0 = 0
    while k0 < K:
        mask = row_ok[:, None] & (k0 + k < K)[None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0).to(tl.float32)
        q = _quantize(x, s, 127.0, False, USE_LIBDEVICE)
        tl.store(q_ptrs + k0 * stride_qk, q, mask=mask)
        k0 += BLOCK_K
    tl.store(s_ptr + rows64 * stride_sm, s, mask=row_ok)


@triton.jit
def _quantize_row_chunks_kernel(
    x_ptr, a_ptr, q_ptr, s_ptr,  # x [M, K], maxima [M, C], x_q int8 [M, K], x_s fp32 [M, 1]
    K, C, stride_xm, stride_am, stride_qm, stride_sm,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per program
    BLOCK_C: tl.constexpr,  # next_pow2(C)
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = _row_scale(a_ptr + row * stride_am, C, BLOCK_C)  # (1,): the row's amax / 127, as the one-pass kernel
    cols = chunk * BLOCK + tl.arange(0, BLOCK)[None, :]
    ok = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)  # (1, BLOCK)
    tl.store(q_ptr + row * stride_qm + cols, _quantize(x, s, 127.0, False, USE_LIBDEVICE), mask=ok)
    first = chunk * BLOCK + tl.arange(0, 1)
    tl.store(s_ptr + row * stride_sm + 0 * first, s, mask=first == 0)  # one program per row writes the scale


@triton.jit
def _row_scale(a_row_ptr, C, BLOCK_C: tl.constexpr):
    """(1,) fp32: a row's per-token int8 scale from the maxima of its column chunks (C of them at a_row_ptr, unit
    stride): max / 127 with div_rn, as ``_per_token_quant_int8_kernel`` computes it from the row itself."""
    c = tl.arange(0, BLOCK_C)[None, :]
    maxima = tl.load(a_row_ptr + c, mask=c < C, other=0.0)  # (1, BLOCK_C)
    return tl.math.div_rn(tl.max(maxima, axis=1), 127.0)


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions, which run numpy and cannot call libdevice: the kernels then round with the exact fp32 trick instead.
INTERPRETED = not isinstance(_per_token_group_quant_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------------- wrappers


def check_quant_args(dtype: str, group_size: int | None, scale_fmt: str) -> None:
    """The quantization a producing op fuses (``rms_norm_quant``, ``silu_mul_quant``): ``group_size`` None is one
    int8 scale per token (per_token_quant_int8), else a power of two (a group is a slice of the op's row tile)."""
    if dtype not in Q_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(Q_DTYPES)}, got {dtype!r}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if scale_fmt == "ue8m0" and dtype != "fp8_e4m3":
        raise ValueError(f"scale_fmt 'ue8m0' is defined for fp8_e4m3 only, not {dtype!r}")
    if group_size is None:
        if dtype != "int8" or scale_fmt != "float":
            raise ValueError(f"one scale per token (group_size None) is int8 with float scales, got {dtype!r}, "
                             f"{scale_fmt!r}")
        return
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE
            or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be a power of two in [1, {MAX_GROUP_SIZE}] or None, got {group_size!r}")


def _check_x(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> its [M, K] view, or a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be one of {X_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., K], got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have K >= 1 channels, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got shape {tuple(x.shape)} with strides {x.stride()}")
    if not INTERPRETED and x.device.type != "cuda":
        raise ValueError(f"x must be on a CUDA device (any device under TRITON_INTERPRET=1), got {x.device}")
    return x.view(-1, x.shape[-1])


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def per_token_group_quant(
    x: torch.Tensor,
    dtype: str = "int8",
    group_size: int = 128,
    scale_fmt: str = "float",
    column_major_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per token per group of ``group_size`` channels.

    x: [..., K] bf16/fp16/fp32, contiguous, any K (a ragged last group is padded with zeros).
    dtype: "int8" (scale amax / 127) or "fp8_e4m3" (scale amax / 448).
    scale_fmt: "float", or "ue8m0" (fp8 only): scales rounded up to powers of two.
    column_major_scales: store x_s as the transpose view of a contiguous [cdiv(K, g), M] buffer (the layout
        DeepGEMM/SGLang block GEMMs read), same values. M = prod(x.shape[:-1]).
    Returns x_q [..., K] (int8 / float8_e4m3fn) and x_s float32 [..., cdiv(K, group_size)].
    Same numbers as ``ingot.quant.ref.quantize_act_group(x, dtype, group_size, scale_fmt)``, bit for bit.
    """
    if dtype not in Q_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(Q_DTYPES)}, got {dtype!r}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if scale_fmt == "ue8m0" and dtype != "fp8_e4m3":
        raise ValueError(f"scale_fmt 'ue8m0' is defined for fp8_e4m3 only, not {dtype!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be an int in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if not isinstance(column_major_scales, bool):
        raise TypeError(f"column_major_scales must be a bool, got {column_major_scales!r}")
    x2 = _check_x(x)  # (M, K)
    m, k = x2.shape
    num_groups = cdiv(k, group_size)

    x_q = torch.empty(x.shape, dtype=Q_DTYPES[dtype], device=x.device)
    if column_major_scales:
        x_s = torch.empty((num_groups, m), dtype=torch.float32, device=x.device).t()  # (M, G), strides (1, M)
    else:
        x_s = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    out_shape = (*x.shape[:-1], num_groups)
    if m == 0:
        return x_q, x_s.view(out_shape)

    block_g = next_pow2(group_size)
    tile = SMALL_TILE_ELEMS if m * k <= SMALL_INPUT_ELEMS else TILE_ELEMS
    block_m = min(next_pow2(m), max(1, tile // block_g))
    # The ties between tile and group: a program covers exactly one group of each of its rows.
    if block_g < group_size or block_g & (block_g - 1):
        raise ValueError(f"BLOCK_G = {block_g} must be a power of two >= group_size = {group_size}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M = {block_m} must be a power of two >= 1")
    q2 = x_q.view(m, k)
    grid = (cdiv(m, block_m) * num_groups,)
    with _device_ctx(x):
        _per_token_group_quant_kernel[grid](
            x2, q2, x_s,
            m, k, group_size,
            x2.stride(0), x2.stride(1),
            q2.stride(0), q2.stride(1),
            x_s.stride(0), x_s.stride(1),
            num_groups,
            QMAX=QMAX[dtype],
            IS_FP8=dtype == "fp8_e4m3",
            UE8M0=scale_fmt == "ue8m0",
            USE_LIBDEVICE=not INTERPRETED,
            BLOCK_M=block_m,
            BLOCK_G=block_g,
            num_warps=NUM_WARPS,
        )
    return x_q, x_s if x.dim() == 2 else x_s.view(out_shape)  # 2-D: keep the column-major strides as allocated


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to int8 with one scale per token (amax / 127 over all K channels).

    x: [..., K] bf16/fp16/fp32, contiguous. Returns x_q int8 [..., K] and x_s float32 [..., 1].
    Same numbers as ``ingot.quant.ref.quantize_act_token(x)``, bit for bit.
    """
    x2 = _check_x(x)  # (M, K)
    m, k = x2.shape
    x_q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    x_s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    out_shape = (*x.shape[:-1], 1)
    if m == 0:
        return x_q, x_s.view(out_shape)

    one_pass = k <= ONE_PASS_MAX_K
    block_k = next_pow2(k) if one_pass else MAX_BLOCK_K
    block_m = min(next_pow2(m), max(1, TILE_ELEMS // block_k))
    if block_k & (block_k - 1) or block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M = {block_m} and BLOCK_K = {block_k} must be powers of two")
    num_warps = min(16, max(NUM_WARPS, block_m * block_k // ONE_PASS_ELEMS_PER_WARP)) if one_pass else NUM_WARPS
    q2 = x_q.view(m, k)
    grid = (cdiv(m, block_m),)
    with _device_ctx(x):
        _per_token_quant_int8_kernel[grid](
            x2, q2, x_s,
            m, k,
            x2.stride(0), x2.stride(1),
            q2.stride(0), q2.stride(1),
            x_s.stride(0),
            USE_LIBDEVICE=not INTERPRETED,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            ONE_PASS=one_pass,
            num_warps=num_warps,
        )
    return x_q, x_s if x.dim() == 2 else x_s.view(out_shape)


def quantize_row_chunks(x: torch.Tensor, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of x [M, K] (unit-stride rows) whose producer already wrote the max |x| of disjoint
    column ranges covering each row, maxima float32 [M, C] (any C >= 1: silu * up's 1024-column chunks, the decode
    attention's head groups): one program per (row, ROW_CHUNK columns), each taking the row's scale from the maxima.
    For rows that one program per row would quantize too slowly at small M. Returns x_q int8 [M, K], x_s float32
    [M, 1]: bit for bit ``per_token_quant_int8(x)`` when the maxima are those of x's ranges."""
    m, k = x.shape
    if maxima.dim() != 2 or maxima.shape[0] != m or maxima.shape[1] < 1 or maxima.dtype != torch.float32:
        raise ValueError(f"maxima must be float32 [M, C] = [{m}, C >= 1], got {maxima.dtype} {tuple(maxima.shape)}")
    if x.stride(-1) != 1 or maxima.stride(-1) != 1:
        raise ValueError(f"quantize_row_chunks: unit-stride rows, got x strides {x.stride()}, maxima strides "
                         f"{maxima.stride()}")
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    x_s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        with _device_ctx(x):
            _quantize_row_chunks_kernel[(m, cdiv(k, ROW_CHUNK))](
                x, maxima, x_q, x_s, k, maxima.shape[1], x.stride(0), maxima.stride(0), x_q.stride(0), x_s.stride(0),
                USE_LIBDEVICE=not INTERPRETED, BLOCK=ROW_CHUNK, BLOCK_C=max(2, next_pow2(maxima.shape[1])),
                num_warps=NUM_WARPS,
            )
    return x_q, x_s
