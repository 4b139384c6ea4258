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
  computes in float32 and rounds its result): bit for bit ``apply_rotary``, compiled and in the interpreter (fp16;
  bf16 within one ulp there, see below). The rotary kernels launch with ``enable_fp_fusion=False``: triton narrows
  the float32 ops on rounded operands to bf16/fp16 arithmetic, and with fusion on LLVM contracts ``x1 * cos - x2 *
  sin`` into one fma (x1 * cos no longer rounded), which put some elements one ulp from torch's on the H100.
Float32 inputs keep the torch path (tests, where exact CPU/GPU agreement matters more than launches).

The decoder's fused forms run the same kernel body (one program per row, the same BLOCK and warps, so the same
reduction order and the same normed bits; compiled for sm_90 the sum of squares reduces over one layout in every
variant):
- ``fused_add_rms_norm``: x + residual (one float32 sum rounded once, torch's bf16 add, bit for bit), stored, then
  normed: the residual add of the previous sub-layer costs no launch of its own.
- ``rms_norm_quant``: the normed row, rounded to the model dtype, quantized in the epilogue as the next W8A8
  linear would quantize it (``act_quant._quantize_store``: per token int8, or per token per group int8 / fp8 e4m3
  with float or ue8m0 scales), bit for bit; optionally after the residual add.
Under Triton's interpreter bf16 casts truncate; these kernels round on the bits there (``act_quant._cast_rn``), so
the CPU tests see the GPU's roundings.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ingot.kernels.checks import cdiv, next_pow2
from ingot.kernels.act_quant import QMAX, Q_DTYPES, _cast_rn, _quantize_store, check_quant_args

DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, ro_ptr, q_ptr, s_ptr,
    N, s_x, s_r, s_o, s_ro, s_q, s_s, inv_n, eps,
    HAS_RESIDUAL: tl.constexpr,  # x + residual first (stored to ro_ptr), then the norm of that sum
    QUANT: tl.constexpr,  # the normed row quantized to q_ptr / s_ptr (act_quant._quantize_store) instead of o_ptr
    GROUP: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr, UE8M0: tl.constexpr,
    COMPILED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row, the whole row in registers. Every variant (plain, + residual, + quantization) runs this
    # one body with the same BLOCK and warps, so the row's sum of squares is reduced in the same order and the normed
    # values are the same bits whichever outputs a call asks for.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)  # issued with x's load: after the reduction it waited alone
    if HAS_RESIDUAL:  # x + residual in the model dtype: float32 sum, one rounding, as torch's bf16 add
        r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0)
        x = _cast_rn(x.to(tl.float32) + r.to(tl.float32), x.dtype, COMPILED)
        tl.store(ro_ptr + row * s_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) * inv_n  # torch's mean: sum x (1 / N)
    y = _cast_rn(xf * tl.rsqrt(var + eps), x.dtype, COMPILED)  # rsqrt: the instruction torch's rsqrtf compiles to
    out = _cast_rn(w.to(tl.float32) * y.to(tl.float32), x.dtype, COMPILED)
    if QUANT:  # what the model dtype output would hold, quantized (lanes past N: w = 0 there, so out = 0)
        _quantize_store(out.to(tl.float32), 0, N, q_ptr + row * s_q, s_ptr + row * s_s,
                        GROUP, QMAX, IS_FP8, UE8M0, COMPILED, BLOCK)
    else:
        tl.store(o_ptr + row * s_o + cols, out, mask=ok)


@triton.jit
def _rotate(
    x_ptr, c, s, H, HALF, s_xh, s_xd,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One token's H heads at x_ptr rotated by c, s (1, BLOCK_P) fp32 (already rounded to x's dtype): returns the
    halves y1, y2 (BLOCK_H, BLOCK_P) in x's dtype - output channels p and p + HALF - with the head index and the
    mask."""
    h = tl.arange(0, BLOCK_H)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    ok = (h < H) & (p < HALF)
    if INTERLEAVED:  # channel 2p pairs with 2p + 1; the output is de-interleaved (evens' results first)
        i1, i2 = 2 * p, 2 * p + 1
    else:  # channel p pairs with p + dim / 2
        i1, i2 = p, p + HALF
    base = x_ptr + h * s_xh
    x1 = tl.load(base + i1 * s_xd, mask=ok, other=0.0)
    x2 = tl.load(base + i2 * s_xd, mask=ok, other=0.0)
    dt = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # each product rounded to x's dtype before the sum: torch's x1 * cos - x2 * sin in bf16 rounds three times
    y1 = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
    y2 = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
    return y1, y2, h, ok


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, s_ct, s_cp, s_st, s_sp, HALF, dt: tl.constexpr, BLOCK_P: tl.constexpr):
    """Token t's cos/sin (1, BLOCK_P): float32 in memory, cast to x's dtype first, as apply_rotary does."""
    p = tl.arange(0, BLOCK_P)[None, :]
    c = tl.load(cos_ptr + t * s_ct + p * s_cp, mask=p < HALF, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + t * s_st + p * s_sp, mask=p < HALF, other=0.0).to(dt).to(tl.float32)
    return c, s


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    H, HALF,
    s_xt, s_xh, s_xd, s_ct, s_cp, s_st, s_sp, s_ot, s_oh,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c, s = _cos_sin(cos_ptr, sin_ptr, t, s_ct, s_cp, s_st, s_sp, HALF, o_ptr.dtype.element_ty, BLOCK_P)
    y1, y2, h, ok = _rotate(x_ptr + t * s_xt, c, s, H, HALF, s_xh, s_xd, INTERLEAVED, BLOCK_H, BLOCK_P)
    p = tl.arange(0, BLOCK_P)[None, :]
    out = o_ptr + t * s_ot + h * s_oh
    tl.store(out + p, y1, mask=ok)
    tl.store(out + p + HALF, y2, mask=ok)


# Under TRITON_INTERPRET=1 triton.jit gives interpreted functions (numpy; bf16 casts rounded by _cast_rn).
INTERPRETED = not isinstance(_rms_norm_kernel, triton.runtime.JITFunction)


def _ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rows(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., n] as [M, n] with unit stride along n (a copy only if t has none)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(n: int) -> int:
    """Warps of the one-program-per-row norm, by the row length only (every variant the same: the same reduction).
    Rows over 2048 take 16. H100, 64 calls on one 4096-channel row in a CUDA graph, us per call for 4 / 8 / 16 warps:
    while each quantizing division was div_rn's guarded sequence (``norm-warps-*-564cb64.json``) per-token int8
    output 3.47 / 2.88 / 2.63, plain 1.73 / 1.73 / 1.81; with ``act_quant._div_rows``
    (``norm-warps-fast-div-*-e2e1722.json``) int8 2.31 / 2.33 / 2.34, plain 1.73 / 1.73 / 1.80. 8 warps then looked
    no worse, but end to end it was not faster (Llama-3-8B int8-channel batch-1 TPOT 3.511-3.519 ms at 8 against
    3.504-3.506 at 16, bf16 equal; ``e2e-llama3-8b-norm-8-warps-ab-*``), so 16 stays."""
    return 4 if next_pow2(n) <= 2048 else 16


def _norm(x, weight, eps, residual=None, quant=None):
    """Launch _rms_norm_kernel. quant: None or (dtype, group_size, scale_fmt), checked by the caller.
    Returns (out or None, new residual or None, x_q or None, x_s or None), each [M, ...]."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"rms_norm: x and weight must share a dtype in {DTYPES}, got {x.dtype} and {weight.dtype}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {n}")
    x2 = _rows("x", x, n)
    m = x2.shape[0]
    dev = x.device
    r2 = ro = None
    if residual is not None:
        if residual.dtype != x.dtype or residual.shape != x.shape:
            raise ValueError(f"fused_add_rms_norm: residual {residual.dtype} {tuple(residual.shape)} must match x "
                             f"{x.dtype} {tuple(x.shape)}")
        if residual.device != dev:
            raise ValueError(f"fused_add_rms_norm: residual on {residual.device}, x on {dev}")
        r2 = _rows("residual", residual, n)
        ro = torch.empty((m, n), dtype=x.dtype, device=dev)
    block = next_pow2(n)
    out = x_q = x_s = None
    if quant is None:
        out = torch.empty((m, n), dtype=x.dtype, device=dev)
        group, qmax, is_fp8, ue8m0 = block, 127.0, False, False
    else:
        qdtype, group_size, scale_fmt = quant
        group = block if group_size is None else group_size
        block = max(block, group)  # a row shorter than one group: one zero-padded group
        if block % group:
            raise ValueError(f"rms_norm_quant: BLOCK = {block} must be a multiple of the group of {group}")
        x_q = torch.empty((m, n), dtype=Q_DTYPES[qdtype], device=dev)
        x_s = torch.empty((m, 1 if group_size is None else cdiv(n, group)), dtype=torch.float32, device=dev)
        qmax, is_fp8, ue8m0 = QMAX[qdtype], qdtype == "fp8_e4m3", scale_fmt == "ue8m0"
    if m:
        dummy = x2  # pointers a variant never reads or writes
        with _ctx(x):
            _rms_norm_kernel[(m,)](
                x2, dummy if r2 is None else r2, weight.contiguous(), dummy if out is None else out,
                dummy if ro is None else ro, dummy if x_q is None else x_q, dummy if x_s is None else x_s,
                n, x2.stride(0), 0 if r2 is None else r2.stride(0), 0 if out is None else out.stride(0),
                0 if ro is None else ro.stride(0), 0 if x_q is None else x_q.stride(0),
                0 if x_s is None else x_s.stride(0), 1.0 / n, float(eps),
                HAS_RESIDUAL=r2 is not None, QUANT=quant is not None, GROUP=group, QMAX=qmax, IS_FP8=is_fp8,
                UE8M0=ue8m0, COMPILED=not INTERPRETED, BLOCK=block,
                num_warps=_num_warps(n),  # by the row, not the group or the outputs: same reduction
            )
    return out, ro, x_q, x_s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim: x [..., N] and weight [N] of one dtype (bf16/fp16)
    -> [..., N] in that dtype (contiguous)."""
    out, _, _, _ = _norm(x, weight, eps)
    return out.view(*x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one launch: the pre-norm residual step of a decoder layer.

    x, residual: [..., N] of the weight's dtype (bf16/fp16), unit stride along N. Returns two new contiguous
    [..., N] tensors: the normed sum, and the sum itself rounded once to the dtype (bit-identical to torch's
    ``x + residual``). The normed value is computed as ``rms_norm`` computes it on that sum.
    """
    out, ro, _, _ = _norm(x, weight, eps, residual)
    return out.view(*x.shape), ro.view(*x.shape)


def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    dtype: str = "int8",
    group_size: int | None = None,
    scale_fmt: str = "float",
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm (after ``+ residual`` when given) with its output quantized in the same launch, for a linear whose
    activations are quantized (int8-channel: per token; int8-block / fp8-block: per token per group).

    x, residual, weight as ``fused_add_rms_norm``. dtype "int8" / "fp8_e4m3"; group_size None (one scale per token,
    int8 only) or a power of two (a ragged last group is padded with zeros); scale_fmt "float" / "ue8m0" (fp8).
    Returns x_q [..., N] (int8 / float8_e4m3fn), x_s float32 [..., 1] or [..., cdiv(N, group_size)], and the new
    residual x + residual (None without residual). Bit for bit what ``per_token_quant_int8`` /
    ``per_token_group_quant`` give on the output of ``rms_norm`` / ``fused_add_rms_norm``: the model dtype's
    rounding of the normed value is what is quantized.
    """
    check_quant_args(dtype, group_size, scale_fmt)
    _, ro, x_q, x_s = _norm(x, weight, eps, residual, (dtype, group_size, scale_fmt))
    lead = x.shape[:-1]
    return x_q.view(*x.shape), x_s.view(*lead, x_s.shape[-1]), None if ro is None else ro.view(*x.shape)


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
                INTERLEAVED=interleaved, BLOCK_H=next_pow2(h), BLOCK_P=next_pow2(d // 2),
                enable_fp_fusion=False,  # see the module docstring: torch's roundings, no fma
            )
    return out
