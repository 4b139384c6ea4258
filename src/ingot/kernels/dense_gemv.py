"""Dense (unquantized) GEMV for one token: y [1, N] = x [1, K] @ w.T, w [N, K] in bf16/fp16 - the lm_head at decode.

The lm_head is never quantized (FORMATS.md), and at batch 1 it is the largest single read of a decode step: 1.05 GB
for Llama-3-8B (128256 x 4096 bf16), 1.85 GB for DeepSeek-V3. cuBLAS streams it at ~2.8 TB/s on the H100 (375 us,
`results/lm-head-orientations-*`); this kernel at ~3.17 TB/s (332 us, kernels/NOTES.md, session 22): each program
owns BLOCK_N rows, walks K in BLOCK_K steps keeping a (BLOCK_N, BLOCK_K) fp32 accumulator of elementwise products (no
cross-thread reduction in the loop), and sums it along K once at the end. At M = 1 there is no reuse of the weight to
exploit, so no tensor cores: the only job is keeping enough bytes in flight.

Numerics: fp32 products and sums (in another order than cuBLAS's), rounded once to x's dtype - what F.linear in the
model dtype computes - and stored as ``out_dtype`` (float32 for logits: the rounded value, exactly). Against F.linear
the result may differ by one rounding step of the model dtype where the fp32 sums differ in their last bits.
Reference: ``ingot.quant.ref.dense_gemv_ref``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ingot.kernels.act_quant import _cast_rn
from ingot.kernels.checks import check_tensor

DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The tile: 4 rows x 1024 columns per step, 8 warps (16 weights a thread per step). H100, 128256 x 4096 bf16 in a CUDA
# graph (kernels/NOTES.md, session 22): 331.7 us; 8 x 1024 332.0, 4 x 512 (3 stages) 332.8; cuBLAS F.linear 375.0.
BLOCK_N = 4
BLOCK_K = 1024
NUM_WARPS = 8


@triton.jit
def _dense_gemv_kernel(
    x_ptr, w_ptr, y_ptr,  # x [1, K], w [N, K] (row stride stride_wn, unit along K), y [1, N]
    N, K, stride_wn,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
    COMPILED: tl.constexpr,  # not the interpreter (see act_quant._cast_rn)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe = tl.minimum(rows, N - 1).to(tl.int64)  # the last block's rows past N re-read row N - 1, not stored
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + safe[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0)
            x = tl.load(x_ptr + k0 + ks)
        else:
            in_k = k0 + ks < K
            w = tl.load(w_ptrs + k0, mask=in_k[None, :], other=0.0)
            x = tl.load(x_ptr + k0 + ks, mask=in_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = _cast_rn(tl.sum(acc, axis=1), x_ptr.dtype.element_ty, COMPILED)  # F.linear's one rounding
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


INTERPRETED = not isinstance(_dense_gemv_kernel, triton.runtime.JITFunction)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [1, N] = x [1, K] @ w [N, K].T, rounded to x's dtype, returned as ``out_dtype`` (default x's).

    x, w bf16/fp16 of one dtype, x contiguous, w with unit stride along K (any row stride); on CUDA (any device under
    TRITON_INTERPRET=1). For one row only: batched rows are a GEMM (F.linear)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    check_tensor("x", x, DTYPES, 2)
    check_tensor("w", w, DTYPES, 2, contiguous=False)
    if w.dtype != x.dtype:
        raise TypeError(f"dense_gemv: w is {w.dtype}, x is {x.dtype}: they must share a dtype")
    if x.shape[0] != 1 or x.shape[1] != w.shape[1] or w.stride(1) != 1 or w.shape[0] == 0:
        raise ValueError(f"dense_gemv: x must be [1, K] and w [N >= 1, K] with unit stride along K, got x "
                         f"{tuple(x.shape)}, w {tuple(w.shape)} (strides {w.stride()})")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"dense_gemv: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if x.device != w.device or (not INTERPRETED and x.device.type != "cuda"):
        raise ValueError(f"dense_gemv: x and w on one CUDA device (any under TRITON_INTERPRET=1), got {x.device} "
                         f"and {w.device}")
    n, k = w.shape
    y = torch.empty((1, n), dtype=out_dtype, device=x.device)
    ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _dense_gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, w, y, n, k, w.stride(0),
            EVEN_K=k % BLOCK_K == 0, COMPILED=not INTERPRETED, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS,
        )
    return y
