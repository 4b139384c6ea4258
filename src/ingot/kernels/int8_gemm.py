"""W8A8 INT8 GEMMs: y [M, N] = dequant(x_q) [M, K] @ dequant(w_q).T [K, N], int8 tensor-core dots.

Two scale layouts (ingot.quant.schemes presets):

- ``int8_gemm_channel`` (int8-channel): x_s per token [M, 1], w_s per output channel [N, 1]. The whole K loop
  accumulates int8 x int8 products in int32 (exact), and the scales are applied once in the epilogue:
  y = acc * x_s * w_s (+ bias).
- ``int8_gemm_block`` (int8-block, DeepSeek-style): x_s per token per 128-group [M, cdiv(K, 128)], w_s per 128x128
  block [cdiv(N, 128), cdiv(K, 128)]. The scales change every 128 columns of K, so each K step of exactly one
  block is an int32 dot that is promoted to fp32 and scaled before it joins the fp32 accumulator.

References with the same signatures: ``ingot.quant.ref.int8_gemm_channel_ref`` / ``int8_gemm_block_ref``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# An int32 accumulator holds K products of at most 128 * 128 = 2^14 (-128 * -128; the symmetric quantizers stop at
# +-127, 16129): K below 2^31 / 2^14 = 131072 can never overflow, whatever the values.
MAX_K_CHANNEL = 2**31 // (128 * 128)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM launch.

    block_m/n/k: the [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tile each program multiplies per K step (powers of two,
    >= 16: tl.dot's smallest int8 shape). group_m: programs along M that sweep N together (the Triton matmul
    tutorial's grouped ordering: a group re-reads the same W columns from L2). num_warps, num_stages: as in triton.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmConfig.{name} must be >= 1, got {getattr(self, name)}")


# Default tiles by M bucket (upper bound on M, config); tuned JSON tables come later. Decode (M <= 64) is
# weight-bandwidth bound: the [N, K] int8 weight is read once (16.8 MB for 4096 x 4096: ~6 us at 3 TB/s), so
# BLOCK_M stays small (little padding of the few rows) and BLOCK_N narrow for enough programs: N / 32 = 128 for
# N = 4096 at M <= 16, about one per SM of an H100 (132), each with 4 x 6 KB (x and w tiles) of loads in flight.
# (N = 576 still gets only 18 programs: that shape wants split-K, not done here.)
# Prefill is tensor-core bound: 128x128x128 tiles, 8 warps (two warpgroups; the block kernel holds an int32 dot
# and an fp32 accumulator of 128x128 each, 128 registers per thread together), 4 stages of 32 KB of shared memory.
# BLOCK_K = 128 everywhere: one 128-byte row segment of int8 per load, and the block kernel's K step must be one
# quantization block. BLOCK_N <= 128 so that an N tile lies in a single 128-row weight block.
_CONFIGS: tuple[tuple[int, GemmConfig], ...] = (
    (16, GemmConfig(16, 32, 128, group_m=1, num_warps=4, num_stages=5)),
    (32, GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=5)),
    (64, GemmConfig(64, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (2**62, GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4)),
)


def default_config(m: int) -> GemmConfig:
    """The tile config for ``m`` rows of activations (both kernels)."""
    return next(cfg for bound, cfg in _CONFIGS if m <= bound)


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: consecutive programs cover GROUP_M row tiles x all column tiles (L2 reuse of W)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int8_gemm_channel_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # int8 [M, K], fp32 [M, 1], int8 [N, K], fp32 [N, 1], [N], [M, N]
    M, N, K,
    stride_xm, stride_xk, stride_xsm,
    stride_wn, stride_wk, stride_wsn,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/columns onto valid ones so the loads need no M/N mask; their results are not stored.
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # A `for` over range, not a `while`: triton software-pipelines only for loops (num_stages of loads in flight).
    # (Triton 3.6's interpreter cannot take a run-time range bound under numpy >= 2.4; the CPU tests patch that.)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:  # ragged last K tile: missing columns load as 0 and add nothing
            k_left = K - kt * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    xs = tl.load(xs_ptr + offs_m * stride_xsm)  # (BLOCK_M,)
    ws = tl.load(ws_ptr + offs_n * stride_wsn)  # (BLOCK_N,)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _int8_gemm_block_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,  # int8 [M, K], fp32 [M, KB], int8 [N, K], fp32 [NB, KB], [N], [M, N]
    M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_ym, stride_yn,
    SCALE_N: tl.constexpr,  # weight block rows (128); BLOCK_N divides it, so a tile lies in one block row
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_K is the K quantization block (the wrapper checks it): K step kt uses scale column kt.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    xs_ptrs = xs_ptr + offs_m * stride_xsm  # (BLOCK_M,): column 0 of this tile's token scales
    ws_ptrs = ws_ptr + ((pid_n * BLOCK_N) // SCALE_N) * stride_wsn  # scalar: the tile's weight block row

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        dot = tl.dot(a, b, out_dtype=tl.int32)  # |dot| <= 128 * 2^14 = 2^21: exact in fp32 below
        xs = tl.load(xs_ptrs + kt * stride_xsk)  # (BLOCK_M,)
        ws = tl.load(ws_ptrs + kt * stride_wsk)  # scalar
        acc += dot.to(tl.float32) * (xs[:, None] * ws)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


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
) -> tuple[int, int, int]:
    """Checks shared by both GEMMs; returns (M, N, K). Scale shapes are checked by each op."""
    for name, t, dtype in (("x_q", x_q, torch.int8), ("w_q", w_q, torch.int8), ("x_s", x_s, torch.float32),
                           ("w_s", w_s, torch.float32)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")
    m, k = x_q.shape
    n, kw = w_q.shape
    if kw != k:
        raise ValueError(
            f"x_q [M, K] = {tuple(x_q.shape)} and w_q [N, K] = {tuple(w_q.shape)} disagree on K: {k} != {kw}"
        )
    if k == 0 or n == 0:
        raise ValueError(f"empty GEMM: K = {k}, N = {n} (x_q {tuple(x_q.shape)}, w_q {tuple(w_q.shape)})")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if bias is not None:
        if bias.dtype not in BIAS_DTYPES:
            raise TypeError(f"bias must be one of {BIAS_DTYPES}, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
        if not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous, got strides {bias.stride()}")
    if out is not None:
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out must have shape (M, N) = ({m}, {n}), got {tuple(out.shape)}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must have unit stride along N, got strides {out.stride()}")
    tensors = {"x_q": x_q, "x_s": x_s, "w_q": w_q, "w_s": w_s, "bias": bias, "out": out}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all operands must be on one device, got {devices}")
    if not INTERPRETED and x_q.device.type != "cuda":
        raise ValueError(
            f"x_q must be on a CUDA device (or run triton's interpreter, TRITON_INTERPRET=1), got {x_q.device}"
        )
    return m, n, k


def _check_config(config: GemmConfig) -> None:
    if not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, got {type(config).__name__}")


def _launch(kernel, grid_size: int, device: torch.device, config: GemmConfig, *args, **constexprs) -> None:
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(grid_size,)](
            *args,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
            **constexprs,
        )


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
) -> torch.Tensor:
    """Per-token x per-channel W8A8 GEMM: y [M, N] = (x_q @ w_q.T) * x_s * w_s.T (+ bias).

    x_q int8 [M, K], x_s float32 [M, 1] (per token), w_q int8 [N, K], w_s float32 [N, 1] (per output channel),
    bias [N] bf16/fp16/fp32 or None; all contiguous. Returns y [M, N] in ``out_dtype`` (bf16, fp16 or fp32),
    written into ``out`` when given. int32 accumulation over all of K (exact; K < 131072 so it cannot overflow),
    scales and bias in fp32 in the epilogue. ``config`` overrides the M-bucketed default tiles (tests, tuning).
    Reference: ``ingot.quant.ref.int8_gemm_channel_ref``.
    """
    m, n, k = _check_operands(x_q, x_s, w_q, w_s, bias, out_dtype, out)
    if tuple(x_s.shape) != (m, 1):
        raise ValueError(f"x_s must be per token, shape (M, 1) = ({m}, 1), got {tuple(x_s.shape)}")
    if tuple(w_s.shape) != (n, 1):
        raise ValueError(f"w_s must be per output channel, shape (N, 1) = ({n}, 1), got {tuple(w_s.shape)}")
    if k >= MAX_K_CHANNEL:
        raise ValueError(f"K = {k} may overflow the int32 accumulator (K * 128^2 >= 2^31); K must be < {MAX_K_CHANNEL}")
    config = default_config(m) if config is None else config
    _check_config(config)
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    grid = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    _launch(
        _int8_gemm_channel_kernel, grid, x_q.device, config,
        x_q, x_s, w_q, w_s, x_s if bias is None else bias, y,
        m, n, k,
        x_q.stride(0), x_q.stride(1), x_s.stride(0),
        w_q.stride(0), w_q.stride(1), w_s.stride(0),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
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
) -> torch.Tensor:
    """Per-token-per-group x block W8A8 GEMM: y [M, N] = sum over K blocks kb of
    (x_q[:, kb] @ w_q[:, kb].T) * x_s[:, kb] * w_s[n // bn, kb] (+ bias).

    x_q int8 [M, K], x_s float32 [M, cdiv(K, bk)] (per token per bk-group), w_q int8 [N, K],
    w_s float32 [cdiv(N, bn), cdiv(K, bk)] (per bn x bk block), block_size (bn, bk) = (128, 128) by default,
    bias [N] or None; all contiguous. Ragged N and K are fine (the last K block is zero-padded, as the quantizers
    treat it). Returns y [M, N] in ``out_dtype`` (bf16, fp16 or fp32), written into ``out`` when given.
    The tile must fit the blocks: config.block_k == bk (one scale column per K step) and config.block_n divides bn
    (one weight scale row per N tile). Reference: ``ingot.quant.ref.int8_gemm_block_ref``.
    """
    m, n, k = _check_operands(x_q, x_s, w_q, w_s, bias, out_dtype, out)
    bn, bk = block_size
    if bn < 16 or bn & (bn - 1) or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_size must be powers of two >= 16 (the tiles follow it), got {tuple(block_size)}")
    kb = triton.cdiv(k, bk)
    if tuple(x_s.shape) != (m, kb):
        raise ValueError(
            f"x_s must be per token per {bk}-group, shape (M, cdiv(K, {bk})) = ({m}, {kb}), got {tuple(x_s.shape)}"
        )
    if tuple(w_s.shape) != (triton.cdiv(n, bn), kb):
        raise ValueError(
            f"w_s must be per {bn}x{bk} block, shape (cdiv(N, {bn}), cdiv(K, {bk})) = ({triton.cdiv(n, bn)}, {kb}), "
            f"got {tuple(w_s.shape)}"
        )
    if config is None:  # the table's tiles, bent to the blocks (a no-op for 128x128)
        base = default_config(m)
        config = GemmConfig(base.block_m, min(base.block_n, bn), bk, base.group_m, base.num_warps, base.num_stages)
    _check_config(config)
    if config.block_k != bk:
        raise ValueError(
            f"config.block_k = {config.block_k} must equal the K quantization block {bk}: one scale per K step"
        )
    if bn % config.block_n:
        raise ValueError(
            f"config.block_n = {config.block_n} must divide the N quantization block {bn}: an N tile must lie in one "
            "block row of w_s"
        )
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    grid = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    _launch(
        _int8_gemm_block_kernel, grid, x_q.device, config,
        x_q, x_s, w_q, w_s, x_s if bias is None else bias, y,
        m, n, k,
        x_q.stride(0), x_q.stride(1), x_s.stride(0), x_s.stride(1),
        w_q.stride(0), w_q.stride(1), w_s.stride(0), w_s.stride(1),
        y.stride(0), y.stride(1),
        SCALE_N=bn, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
    )
    return y
