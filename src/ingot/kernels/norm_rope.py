"""RMSNorm and rotary embedding as one launch each, for the CUDA decode step (bf16 / fp16 activations).

Why: in torch, RMSNorm is 8 small kernels (float, pow, mean, add, rsqrt, mul, cast, weight mul) and a rotary of q or
k is 9 (two casts of cos/sin, four multiplies, a subtract, an add, a cat). A CUDA-graph decode step of Llama-3-8B
ran ~2000 kernels, ~60 per layer; at batch 1 each costs a few microseconds even when replayed, about half of the
~10 ms step. These two kernels take 2 x 8 + 2 x 9 = 34 launches per layer down to 4.

Numerics follow the torch modules (ingot.layers.norm.RMSNorm, ingot.layers.rotary.apply_rotary):
- rms_norm: statistics in float32, the normalized value rounded to the input dtype before the weight multiply (as
  transformers). The mean of squares sums in another order than torch's reduction, so a bf16 output can differ from
  the torch module's by one ulp (a float32 variance 1 ulp apart moves a bf16 rounding about once in 2^16 values).
- rotary: every product and sum rounded to the input dtype exactly where torch's bf16/fp16 ops round (each op
  computes in float32 and rounds its result), so outputs are bit-identical to ``apply_rotary`` on the GPU.
Float32 inputs keep the torch path (tests, where exact CPU/GPU agreement matters more than launches).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, N, s_x, s_o, inv_n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) * inv_n  # torch's mean: sum x (1 / N)
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # the instruction torch's rsqrtf compiles to
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + row * s_o + cols, out, mask=ok)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    H, HALF,
    s_xt, s_xh, s_xd, s_ct, s_cp, s_st, s_sp, s_ot, s_oh,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    ok = (h < H) & (p < HALF)
    if INTERLEAVED:  # channel 2p pairs with 2p + 1; the output is de-interleaved (evens' results first)
        i1, i2 = 2 * p, 2 * p + 1
    else:  # channel p pairs with p + dim / 2
        i1, i2 = p, p + HALF
    base = x_ptr + t * s_xt + h * s_xh
    x1 = tl.load(base + i1 * s_xd, mask=ok, other=0.0)
    x2 = tl.load(base + i2 * s_xd, mask=ok, other=0.0)
    dt = x1.dtype
    # cos/sin arrive in float32 and are cast to x's dtype first, as apply_rotary does
    c = tl.load(cos_ptr + t * s_ct + p * s_cp, mask=p < HALF, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + t * s_st + p * s_sp, mask=p < HALF, other=0.0).to(dt).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # each product rounded to x's dtype before the sum: torch's x1 * cos - x2 * sin in bf16 rounds three times
    y1 = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
    y2 = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
    out = o_ptr + t * s_ot + h * s_oh
    tl.store(out + p, y1, mask=ok)
    tl.store(out + p + HALF, y2, mask=ok)


def _ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim: x [..., N] and weight [N] of one dtype (bf16/fp16)
    -> [..., N] in that dtype (contiguous)."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"rms_norm: x and weight must share a dtype in {DTYPES}, got {x.dtype} and {weight.dtype}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {n}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        with _ctx(x):
            _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, n, x2.stride(0), out.stride(0), 1.0 / n,
                                             float(eps), BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out.view(*x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """apply_rotary of x [T, H, D] (bf16/fp16, any strides) by float32 cos/sin [T, D / 2] -> a new contiguous
    [T, H, D] in x's dtype (interleaved: the de-interleaved result, as apply_rotary)."""
    if x.dtype not in DTYPES:
        raise TypeError(f"rotary: x must be one of {DTYPES}, got {x.dtype}")
    if x.dim() != 3 or cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"rotary: x [T, H, D] and cos/sin [T, D/2], got {tuple(x.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    t, h, d = x.shape
    if d % 2 or cos.shape != (t, d // 2):
        raise ValueError(f"rotary: cos/sin must be [{t}, {d // 2}] for x of shape {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)}")
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t:
        with _ctx(x):
            _rotary_kernel[(t,)](
                x, cos, sin, out, h, d // 2, *x.stride(), *cos.stride(), *sin.stride(), out.stride(0), out.stride(1),
                INTERLEAVED=interleaved, BLOCK_H=triton.next_power_of_2(h), BLOCK_P=triton.next_power_of_2(d // 2),
            )
    return out
