"""Reference quantize / dequantize / matmul for every scheme, in plain PyTorch.

This is the yardstick: every kernel and every format is tested against these functions. The rules
(FORMATS.md "Rounding"): round half to even (``torch.round``), clamp to the symmetric range
(+-127 for int8, never -128; [-8, 7] for int4), float32 scales, scale = amax / QMAX, an all-zero block
gets scale 0 and quantizes to 0 without NaN, and ragged shapes pad the scale grid (``cdiv``), as if
the missing rows/columns were zeros.

Shapes: a linear weight is ``[N, K]`` = ``[out_features, in_features]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ingot.formats.base import cdiv, unpack_int32
from ingot.quant.schemes import QMAX, QRANGE, Scheme

FP8 = torch.float8_e4m3fn
TORCH_DTYPE = {"fp8_e4m3": FP8, "int8": torch.int8, "int4": torch.int8, "bf16": torch.bfloat16}



class NonFiniteError(ValueError):
    """A weight holds NaN or Inf: it cannot be quantized (its scale would be NaN/Inf)."""


@dataclass
class QuantizedWeight:
    """One linear's weight in a scheme, independent of any file format.

    qweight: [N, K] - float8_e4m3fn (fp8), int8 (int8; int4 values in [-8, 7] also live in int8),
             or the source float dtype for bf16.
    scale:   float32 (or the format's scale dtype), shape ``scale_shape(scheme, N, K)``; None for bf16.
    """

    scheme: Scheme
    qweight: torch.Tensor
    scale: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]


def scale_shape(scheme: Scheme, n: int, k: int) -> tuple[int, int] | None:
    """Shape of the weight scale grid of an [n, k] weight under ``scheme``."""
    if scheme.granularity == "block":
        bn, bk = scheme.block_size
        return (cdiv(n, bn), cdiv(k, bk))
    if scheme.granularity == "channel":
        return (n, 1)
    if scheme.granularity == "group":
        return (n, cdiv(k, scheme.group_size))
    return None


def _tile(scheme: Scheme, n: int, k: int) -> tuple[int, int]:
    """The (rows, cols) tile that shares one scale."""
    if scheme.granularity == "block":
        return scheme.block_size
    if scheme.granularity == "channel":
        return (1, k)
    return (1, scheme.group_size)


def _tiles(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """View an [N, K] tensor as [N/bn, bn, K/bk, bk] tiles, zero-padding ragged edges."""
    n, k = w.shape
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    if (nb * bn, kb * bk) != (n, k):
        w = torch.nn.functional.pad(w, (0, kb * bk - k, 0, nb * bn - n))
    return w.view(nb, bn, kb, bk)


def _expand(s: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """Broadcast a [cdiv(n, bn), cdiv(k, bk)] scale grid to [n, k]."""
    if bn > 1 and s.shape[0] > 1:
        s = s.repeat_interleave(bn, dim=0)[:n]
    if bk > 1 and s.shape[1] > 1:
        s = s.repeat_interleave(bk, dim=1)[:, :k]
    return s  # a single row / column of scales broadcasts as it is


def _ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two (exact, via frexp: s = m * 2^e with m in [0.5, 1))."""
    m, e = torch.frexp(s)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.where(s > 0, torch.ldexp(torch.ones_like(s), e), torch.zeros_like(s))


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 scales to ``dtype`` rounding *up*, so that |w / s| never exceeds QMAX after the cast."""
    if dtype == torch.float32:
        return s
    t = s.to(dtype)
    return torch.where(t.float() < s, torch.nextafter(t, torch.full_like(t, math.inf)), t)


def _scales_from_amax(amax: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, name: str) -> torch.Tensor:
    if not torch.isfinite(amax).all():
        raise NonFiniteError(f"{name or 'weight'}: contains NaN or Inf; cannot quantize it")
    # A tensor divisor, not the Python float: CUDA turns division by a scalar into a multiply by its reciprocal,
    # 1 ulp off the true quotient in ~4.5% of scales (measured on an H100), so --device cuda wrote other bytes.
    s = amax.float() / torch.full_like(amax, QMAX[scheme.weight], dtype=torch.float32)
    if scheme.scale_fmt == "ue8m0":
        s = _ue8m0(s)
    stored = _round_up_to(s, scale_dtype)
    if not torch.isfinite(stored).all():  # e.g. fp16 (GPTQ) scales top out at 65504: |w| > ~4.9e5 overflows to inf
        raise NonFiniteError(
            f"{name or 'weight'}: scale {s.max().item():.4g} overflows {scale_dtype}; cannot store it in this format"
        )
    return stored


def _cast(x: torch.Tensor, weight: str) -> torch.Tensor:
    """Round a scaled float tensor onto the quantized grid (half to even) and cast."""
    if weight == "fp8_e4m3":
        return x.clamp_(-QMAX["fp8_e4m3"], QMAX["fp8_e4m3"]).to(FP8)
    lo, hi = QRANGE[weight]
    return x.round_().clamp_(lo, hi).to(torch.int8)


def quantize_weight(
    w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.float32, name: str = ""
) -> QuantizedWeight:
    """Quantize an [N, K] float weight.

    scale_dtype: the dtype the target format stores scales in (bf16 for compressed-tensors, fp16 for GPTQ).
    Scales are rounded up to it *before* quantizing, so the stored scale is the one the values were made with.
    Raises NonFiniteError (naming ``name``) if ``w`` holds NaN/Inf.
    """
    if w.dim() != 2:
        raise ValueError(f"{name or 'weight'}: expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if not scheme.is_quantized:
        if not torch.isfinite(w).all():
            raise NonFiniteError(f"{name or 'weight'}: contains NaN or Inf")
        return QuantizedWeight(scheme, w, None)
    n, k = w.shape
    bn, bk = _tile(scheme, n, k)
    tiles = _tiles(w.float(), bn, bk)  # (N/bn, bn, K/bk, bk)
    amax = tiles.abs().amax(dim=(1, 3))  # (N/bn, K/bk)
    s = _scales_from_amax(amax, scheme, scale_dtype, name)
    divisor = torch.where(s > 0, s.float(), torch.ones_like(s, dtype=torch.float32))
    q = _cast(tiles / divisor[:, None, :, None], scheme.weight)
    q = q.view(tiles.shape[0] * bn, tiles.shape[2] * bk)[:n, :k].contiguous()
    return QuantizedWeight(scheme, q, s)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] quantized weight -> [N, K] ``dtype``: q * scale, broadcast over each scale's tile (in float32)."""
    if qw.scale is None:
        return qw.qweight.to(dtype)
    n, k = qw.shape
    expected = scale_shape(qw.scheme, n, k)
    if tuple(qw.scale.shape) != expected:
        raise ValueError(
            f"scale of shape {tuple(qw.scale.shape)} does not fit a [{n}, {k}] weight under "
            f"{qw.scheme.name}: expected {expected}"
        )
    bn, bk = _tile(qw.scheme, n, k)
    w = qw.qweight.float() * _expand(qw.scale.float(), n, k, bn, bk)
    return w.to(dtype)


# ---------------------------------------------------------------- activations (dynamic, at run time)


def quantize_act_group(
    x: torch.Tensor, weight: str = "int8", group_size: int = 128, scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token per group of ``group_size`` channels: x [..., K] -> x_q [..., K], x_s float32 [..., cdiv(K, g)]."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k).float()
    scheme = Scheme("act", weight=weight, granularity="group", group_size=group_size, scale_fmt=scale_fmt)
    qw = quantize_weight(x2, scheme, name="activation")
    return qw.qweight.view(*lead, k), qw.scale.view(*lead, -1)


def quantize_act_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token int8: x [..., K] -> x_q int8 [..., K], x_s float32 [..., 1]."""
    *lead, k = x.shape
    scheme = Scheme("act", weight="int8", granularity="channel")
    qw = quantize_weight(x.reshape(-1, k).float(), scheme, name="activation")
    return qw.qweight.view(*lead, k), qw.scale.view(*lead, 1)


def dequantize_act(x_q: torch.Tensor, x_s: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of the activation quantizers: x_s [..., G] broadcast over groups of ``group_size`` channels
    (G == cdiv(K, group_size)), or over all K channels when G == 1 (per token).

    The group size cannot be inferred from K and G: K = 300 in groups of 128 is G = 3, but cdiv(300, 3) = 100.
    """
    k, groups = x_q.shape[-1], x_s.shape[-1]
    g = k if groups == 1 else group_size
    if cdiv(k, g) != groups:
        raise ValueError(f"activation scale has {groups} groups; K={k} in groups of {group_size} needs {cdiv(k, group_size)}")
    return x_q.float() * x_s.float().repeat_interleave(g, dim=-1)[..., :k]


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference matmul of a scheme: y [..., N] = act_quant(x) [..., K] @ dequant(w).T, computed in float32.

    This is the exact math a kernel of the scheme must reproduce (up to float summation order).
    """
    scheme = qw.scheme
    if scheme.activation == "group":
        x_q, x_s = quantize_act_group(x, scheme.weight, scheme.act_group_size, scheme.scale_fmt)
        xf = dequantize_act(x_q, x_s, scheme.act_group_size)
    elif scheme.activation == "token":
        xf = dequantize_act(*quantize_act_token(x))
    else:
        xf = x.float()
    y = xf @ dequantize_weight(qw).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference`` in dB (inf when exact)."""
    ref = reference.float()
    noise = (ref - approx.float()).pow_(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ------------------------------------------------ ops that produce quantized activations (ingot.kernels.norm_rope
# rms_norm / fused_add_rms_norm / rms_norm_quant, ingot.kernels.silu_mul): the model-dtype op exactly as the layers'
# torch code computes it (ingot.layers.norm.RMSNorm, ingot.layers.moe.MLP), then the activation quantizer above.


def quantize_act(x: torch.Tensor, dtype: str = "int8", group_size: int | None = None,
                 scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per token (group_size None: ``quantize_act_token``, int8) or per token per group
    (``quantize_act_group``)."""
    if group_size is None:
        if dtype != "int8" or scale_fmt != "float":
            raise ValueError(f"per-token activation quantization is int8 with float scales, got {dtype!r}, "
                             f"{scale_fmt!r}")
        return quantize_act_token(x)
    return quantize_act_group(x, dtype, group_size, scale_fmt)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), statistics in float32, the normalized value rounded to x's dtype
    before the weight multiply (RMSNorm's torch path, bit for bit)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_ref(x + residual), x + residual), the sum in x's dtype."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: str = "int8",
                       group_size: int | None = None, scale_fmt: str = "float",
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_q, x_s, x + residual or None): the (residual-added) norm in x's dtype, then ``quantize_act``."""
    h = x if residual is None else x + residual
    x_q, x_s = quantize_act(rms_norm_ref(h, weight, eps), dtype, group_size, scale_fmt)
    return x_q, x_s, None if residual is None else h


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype: silu rounded to it, then the product rounded (the MLP's torch code)."""
    return torch.nn.functional.silu(gate) * up


def silu_mul_quant_ref(gate: torch.Tensor, up: torch.Tensor, dtype: str = "int8", group_size: int | None = None,
                       scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act`` of ``silu_mul_ref(gate, up)``."""
    return quantize_act(silu_mul_ref(gate, up), dtype, group_size, scale_fmt)


# ------------------------------------------------ W8A8 int8 GEMMs (references of ingot.kernels.int8_gemm)
# The math the kernels reproduce, with the same signatures. The integer part is exact, whatever the summation order,
# and unlike an int32/int64 matmul it runs on CUDA for any shape (torch._int_mm needs M > 16, K, N % 8): float32
# matmuls over chunks of EXACT_F32_K columns (|x_q * w_q| <= 128 * 128 = 2^14, so 1024 products sum to at most 2^24:
# every partial sum is an integer float32 holds exactly; int8 values also pass TF32 unrounded), the chunks added in
# float64 (exact below 2^53). float32 keeps the CPU fast: a float64 matmul was 2-10x slower there (the int8 CPU path
# of ingot.layers.linear runs on these). The float part (int -> fp32, scale products, accumulation over K blocks,
# bias) is done in float32 in the same order as the kernels, so on the CPU interpreter the kernels match these bit
# for bit.
EXACT_F32_K = 1024


def _int8_dot_exact(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q [M, k] @ w_q [N, k].T -> the exact products [M, N]. int8 (or float32 holding int8 values, converted once by
    a caller that slices them): k <= EXACT_F32_K, one float32 matmul, returned as float32 (every partial sum fits);
    longer, float32 chunks summed in float64. float8_e4m3fn: one float64 matmul (products of 4-bit significands over
    2^-18..2^17 fit its 53 bits)."""
    if x_q.dtype == torch.float8_e4m3fn:
        return x_q.double() @ w_q.double().T
    xf, wf = x_q.float(), w_q.float()  # a no-op for float32 operands
    if x_q.shape[1] <= EXACT_F32_K:
        return xf @ wf.T
    acc = None
    for k0 in range(0, x_q.shape[1], EXACT_F32_K):
        part = (xf[:, k0 : k0 + EXACT_F32_K] @ wf[:, k0 : k0 + EXACT_F32_K].T).double()
        acc = part if acc is None else acc.add_(part)
    return acc


def int8_gemm_channel_ref(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Per-token x per-channel W8A8: y [M, N] = (x_q @ w_q.T) * x_s * w_s.T (+ bias), cast to ``out_dtype``.

    x_q int8 [M, K], x_s float32 [M, 1], w_q int8 [N, K], w_s float32 [N, 1], bias [N] (any float dtype).
    The int32 accumulator of the kernel is the exact integer sum (K < 2^31 / 128^2 = 131072 cannot overflow);
    it is rounded once to float32, then scaled as ``(acc * x_s) * w_s``, then ``+ bias`` in float32.
    """
    acc = _int8_dot_exact(x_q, w_q).float()  # exact integer, one rounding to fp32 (only above 2^24)
    y = acc * x_s.float().view(-1, 1) * w_s.float().view(1, -1)
    if bias is not None:
        y = y + bias.float().view(1, -1)
    return y.to(out_dtype)


def dense_gemv_ref(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] @ w [N, K].T in float32, rounded once to x's dtype, as ``out_dtype`` (default x's): the math of
    ``ingot.kernels.dense_gemv`` (and of F.linear in the model dtype, up to the fp32 summation order)."""
    return (x.float() @ w.float().T).to(x.dtype).to(out_dtype or x.dtype)


def int8_gemm_channel_rowmax_ref(
    x: torch.Tensor,
    x_maxima: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``int8_gemm_channel_ref`` of ``quantize_act_token(x)``. x_maxima (the max |x| of column ranges of each row)
    only lets the kernel skip a pass over x; the result is defined by x alone, so a producer's wrong maxima show up
    as a difference from this."""
    x_q, x_s = quantize_act_token(x)
    return int8_gemm_channel_ref(x_q, x_s, w_q, w_s, bias, out_dtype)


def fp8_gemm_block_ref(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 block GEMM (reference of ``ingot.kernels.fp8_gemm.fp8_gemm_block``): ``int8_gemm_block_ref``'s math on
    float8_e4m3fn operands. Each per-block dot is exact in float64 (e4m3 products have 8 significant bits), then
    rounded once to fp32; tensor cores accumulate a block in reduced precision (DeepSeek-V3 reports ~14 bits on
    H800 FP8 MMA, which is why blocks are promoted to fp32 every 128 K), so compare kernels with a relative bound."""
    return int8_gemm_block_ref(x_q, x_s, w_q, w_s, block_size, bias, out_dtype)


def int8_gemm_block_ref(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Per-token-per-group x 128x128-block W8A8: y [M, N] = sum_kb dot_kb * (x_s[:, kb] * w_s[n // bn, kb]) (+ bias).

    x_q int8 [M, K], x_s float32 [M, cdiv(K, bk)], w_q int8 [N, K], w_s float32 [cdiv(N, bn), cdiv(K, bk)],
    block_size (bn, bk). Each K block's integer dot is exact (|dot| <= bk * 128^2 = 2^21 for bk = 128, so its fp32
    value is exact too); the scaled blocks are summed in float32 in K order, as the kernel does. A ragged last K
    block is the dot over the columns that exist (the kernel loads the missing ones as zeros).
    """
    bn, bk = block_size
    m, k = x_q.shape
    n = w_q.shape[0]
    ws = w_s.float().repeat_interleave(bn, dim=0)[:n]  # [N, cdiv(K, bk)]: each row's block scale
    xs = x_s.float()
    acc = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    if x_q.dtype == torch.int8:  # converted once, not per block (exact: int8 values); fp8 stays for its float64 dot
        x_q, w_q = x_q.float(), w_q.float()
    for kb in range(cdiv(k, bk)):
        cols = slice(kb * bk, min(k, (kb + 1) * bk))
        dot = _int8_dot_exact(x_q[:, cols], w_q[:, cols]).float()
        acc = acc + dot * (xs[:, kb, None] * ws[None, :, kb])
    if bias is not None:
        acc = acc + bias.float().view(1, -1)
    return acc.to(out_dtype)


# ------------------------------------------------ end of W8A8 int8 GEMMs


# ---- weight-only GEMMs and block dequant (references of ingot.kernels.weight_only / dequant)
# One reference per scheme: each wraps its operands in a QuantizedWeight of the scheme's preset (int8-weight,
# int4-group, fp8-block / int8-block) and goes through dequantize_weight and linear, so a kernel is held to the numbers
# the converter writes and ref.linear reads. Weights are dequantized in float32 (q * scale, one rounding) and the
# matmul runs in float32 on x's exact values; a kernel differs by its fp32 summation order only.


def _a16_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype | None):
    """linear's weight-only path (x not quantized) computed in float32, cast once to ``out_dtype`` (default x's)."""
    return linear(x.float(), qw, bias).to(out_dtype or x.dtype)


def w8a16_gemm_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weight-only int8 (int8-weight): y [M, N] = x @ (w_q * w_s).T (+ bias), in float32, cast to ``out_dtype``.

    x [M, K] bf16/fp16, w_q int8 [N, K], w_s [N, 1] (any float dtype; used as float32), bias [N] or None.
    """
    return _a16_matmul(x, QuantizedWeight(Scheme.from_name("int8-weight"), w_q, w_s.float()), bias, out_dtype)


def w4a16_gemm_ref(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_s: torch.Tensor,
    k: int,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weight-only int4 groups (int4-group): y [M, N] = x @ (q * w_s per group).T (+ bias), in float32.

    w_packed int32 [N, cdiv(k, 8)] in compressed-tensors' layout (``ingot.formats.base.pack_int32(q, 4)``), unpacked to
    q int8 [N, k] in [-8, 7]; w_s [N, cdiv(k, group_size)]; x [M, k]; bias [N] or None.
    """
    scheme = replace(Scheme.from_name("int4-group"), group_size=group_size)
    qw = QuantizedWeight(scheme, unpack_int32(w_packed, 4, k), w_s.float())
    return _a16_matmul(x, qw, bias, out_dtype)


def block_dequant_ref(
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block dequantization (fp8-block / int8-block): w [N, K] = w_q.float() * w_s[n // bn, k // bk], cast to
    ``out_dtype``. w_q float8_e4m3fn or int8 [N, K]; w_s float32 [cdiv(N, bn), cdiv(K, bk)]; ragged edges are fine."""
    scheme = replace(Scheme.from_name("fp8-block" if w_q.dtype == FP8 else "int8-block"), block_size=tuple(block_size))
    return dequantize_weight(QuantizedWeight(scheme, w_q, w_s.float()), out_dtype)


# ---- end of weight-only GEMMs and block dequant
