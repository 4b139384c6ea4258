"""Block dequantization: w [N, K] = w_q [N, K] * w_s[n // bn, k // bk], for fp8-block and int8-block weights.

This is the converter's dequantize step on a GPU (``ingot.quant.convert``, ``--device cuda``): DeepSeek-V3's FP8
weights to BF16, or to float32 on their way to another scheme. It is bandwidth bound: 1 byte in and 4 (fp32) or 2
(bf16) bytes out per element. A 7168 x 18432 weight (132M elements) to fp32 moves 0.66 GB, 0.20 ms at 3.35 TB/s;
torch's composition ``q.float() * s.repeat_interleave(...)`` moves about 4x that (0.66 GB for the float copy of q,
0.53 GB to write the expanded scale grid, 1.59 GB for the product).

Bit-exact with the reference (``ingot.quant.ref.block_dequant_ref``): the float32 value is one IEEE multiply of the
exact decoded weight by its fp32 scale, ``q.float() * s`` as torch computes it, and the cast to bf16/fp16 rounds to
nearest even on the GPU (triton 3.6's interpreter truncates fp32 -> bf16 instead).

FP8 codes are decoded with integer ops from their bytes (the wrapper passes a uint8 view), not with triton's
float8e4nv type: triton refuses that type below compute capability 8.9, and converting FP8 checkpoints on A100-class
GPUs is what the converter is for. e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 holds the
subnormals m * 2^-9; 0x7F / 0xFF are NaN (there is no infinity).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ingot.kernels.checks import cdiv

FP8 = torch.float8_e4m3fn
W_DTYPES = (FP8, torch.int8)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Tile per program: 32 rows x 128 columns, 4096 elements (4 KB of fp8 in, 16 KB of fp32 out), 32 elements per thread
# at 4 warps; a 7168 x 18432 weight is 224 x 144 = 32256 programs. The scale of each element is gathered by its row
# and column block (an L1 hit: a tile touches at most 2 x 2 scales), so any block size works and no tie between the
# tile and the quantization block is needed.
BLOCK_N = 32
BLOCK_K = 128
NUM_WARPS = 4


@triton.jit
def _e4m3_to_f32(b):
    """e4m3fn codes (int32 in [0, 255]) -> their exact fp32 values (NaN for 0x7F / 0xFF)."""
    sign = (b & 0x80) << 24
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e - 7) * (1 + m / 8): exponent + 127
    subnormal = m.to(tl.float32) * 0.001953125  # m * 2^-9, exact
    mag = tl.where(e == 0, subnormal, normal)
    v = (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # -0.0 for 0x80, as torch decodes it
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _block_dequant_kernel(
    w_ptr, s_ptr, y_ptr,  # uint8 (fp8 codes) or int8 [N, K], fp32 [cdiv(N, BN_Q), cdiv(K, BK_Q)], [N, K]
    N, K,
    stride_wn, stride_wk,
    stride_sn, stride_sk,
    stride_yn, stride_yk,
    num_k_tiles,
    IS_FP8: tl.constexpr,
    BN_Q: tl.constexpr, BK_Q: tl.constexpr,  # the quantization block (bn, bk)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # 1-D grid, K tiles fastest: consecutive programs stream along the same rows (contiguous memory), and the grid
    # has no 65535 limit as the second axis would.
    pid = tl.program_id(0)
    pid_n = pid // num_k_tiles
    pid_k = pid % num_k_tiles
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0)
    if IS_FP8:
        v = _e4m3_to_f32(w.to(tl.int32))  # uint8 -> int32 zero-extends
    else:
        v = w.to(tl.float32)
    s_ptrs = s_ptr + (rows // BN_Q)[:, None] * stride_sn + (cols // BK_Q)[None, :] * stride_sk
    s = tl.load(s_ptrs, mask=mask, other=0.0)
    tl.store(y_ptr + rows64[:, None] * stride_yn + cols[None, :] * stride_yk, (v * s).to(y_ptr.dtype.element_ty),
             mask=mask)


# Under TRITON_INTERPRET=1 (read by triton when the kernel above was decorated) triton.jit makes an interpreted
# function that runs on any device (numpy); a compiled one needs CUDA tensors.
INTERPRETED = not isinstance(_block_dequant_kernel, triton.runtime.JITFunction)


def block_dequant(
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a block-scaled weight: w [N, K] = w_q.float() * w_s[n // bn, k // bk], cast to ``out_dtype``.

    w_q float8_e4m3fn or int8 [N, K]; w_s float32 [cdiv(N, bn), cdiv(K, bk)] (the dequantization multiplier,
    DeepSeek's ``weight_scale_inv``); block_size (bn, bk), any positive ints; ragged N and K are fine. Both
    contiguous. Returns [N, K] in ``out_dtype`` (bf16, fp16 or fp32), written into ``out`` when given (unit stride
    along K). float32 output is bit-identical to ``ingot.quant.ref.block_dequant_ref`` (NaN codes give NaN).
    """
    for name, t, dtypes in (("w_q", w_q, W_DTYPES), ("w_s", w_s, (torch.float32,))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            want = dtypes[0] if len(dtypes) == 1 else f"one of {dtypes}"
            raise TypeError(f"{name} must be {want}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")
    if len(block_size) != 2 or any(not isinstance(b, int) or b <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints (bn, bk), got {tuple(block_size)}")
    bn, bk = block_size
    n, k = w_q.shape
    grid_shape = (cdiv(n, bn), cdiv(k, bk))
    if tuple(w_s.shape) != grid_shape:
        raise ValueError(
            f"w_s must be per {bn}x{bk} block, shape (cdiv(N, {bn}), cdiv(K, {bk})) = {grid_shape} for w_q "
            f"{tuple(w_q.shape)}, got {tuple(w_s.shape)}"
        )
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if out is not None:
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
        if tuple(out.shape) != (n, k):
            raise ValueError(f"out must have shape (N, K) = ({n}, {k}), got {tuple(out.shape)}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must have unit stride along K, got strides {out.stride()}")
    devices = {name: t.device for name, t in (("w_q", w_q), ("w_s", w_s), ("out", out)) if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all operands must be on one device, got {devices}")
    if not INTERPRETED and w_q.device.type != "cuda":
        raise ValueError(
            f"w_q must be on a CUDA device (or run triton's interpreter, TRITON_INTERPRET=1), got {w_q.device}"
        )
    y = torch.empty((n, k), dtype=out_dtype, device=w_q.device) if out is None else out
    if n == 0 or k == 0:
        return y
    is_fp8 = w_q.dtype == FP8
    codes = w_q.view(torch.uint8) if is_fp8 else w_q
    num_k_tiles = cdiv(k, BLOCK_K)
    grid = (cdiv(n, BLOCK_N) * num_k_tiles,)
    with torch.cuda.device(w_q.device) if w_q.device.type == "cuda" else contextlib.nullcontext():
        _block_dequant_kernel[grid](
            codes, w_s, y,
            n, k,
            codes.stride(0), codes.stride(1),
            w_s.stride(0), w_s.stride(1),
            y.stride(0), y.stride(1),
            num_k_tiles,
            IS_FP8=is_fp8, BN_Q=bn, BK_Q=bk, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS,
        )
    return y
