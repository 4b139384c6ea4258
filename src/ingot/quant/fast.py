"""FP8-block -> INT8 re-quantization, fast and bit-identical to ``ref.py``.

``ref.py`` is the yardstick: dequantize the whole weight to float32, quantize it, dequantize again for the SNR,
each step a full pass over a float32 copy of the weight: 21-40 MB/s of FP8 source per CPU worker (2-vCPU AMD
EPYC). This module computes the same bytes in row slabs that stay in cache (512 KiB per float32 temporary),
600-800 MB/s on one thread, with three facts that keep the numbers exact:

1. The weight's block amax needs no float pass. Within a source block every value is fl(v * s) for one scale
   s, and float rounding is monotone and sign-symmetric, so max |fl(v * s)| = fl(max |v| * |s|); and
   e4m3 magnitudes order like their low 7 bits, so max |v| is an integer max over ``byte & 0x7F``.
2. The fp8 decode is integer work: (int8 << 7) & 0xBF80 puts sign, exponent and mantissa in float16 position,
   a value 2^-8 times the fp8 value (e4m3 subnormals land on float16 subnormals, which the float16 -> float32
   conversion makes normal: no float32 subnormal ever reaches an FPU, whose microcode assists made an earlier
   float32 version of this trick 3-4x slower on Intel Xeons). Multiplying by the source scale pre-multiplied
   by 2^8 (exact: a power of two) rounds the same real product once, as ``q.float() * s`` does. A 256-code
   self-check guards the identity on each device.
3. Quantizing is the reference's own float32 ops (divide by the same divisor tensor, ``round_`` half to even,
   ``clamp_``, cast), and the SNR reuses the residual of the slab instead of a second dequantize.

Only the SNR may differ from ``ref.snr_db``, in float32 summation order (~1e-6 dB; the manifest rounds to
1e-3 dB, so a row can differ in its last digit). ``requantize_ref`` is the reference composition that the fast
path must match, for tests.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ingot.quant import ref
from ingot.quant.ref import FP8, QuantizedWeight, cdiv
from ingot.quant.schemes import QRANGE, Scheme

# (int8 code sign-extended to int16) << 7, masked: sign to bit 15, exponent and mantissa to bits 13..7.
_BITS_MASK = -0x4080  # 0xBF80 as int16
_DECODE_SCALE = 2.0**8  # float16 exponent bias 15 minus e4m3 bias 7
# |source scale| below this keeps scale * 2^8 finite in float32 (2^128 overflows); real scales are ~1e-4.
_MAX_SOURCE_SCALE = 2.0**120
# Elements per slab: 2^17 float32 = 512 KiB per temporary. One thread, a 2048 x 7168 expert, 2-vCPU AMD EPYC:
# 2^14 -> 300, 2^15 -> 460, 2^16 -> 640, 2^17 -> 750, 2^18 -> 840, 2^20 -> 780 MB of FP8 per CPU-second
# (below 2^17 the ~5 us dispatch of each of the 15 ops per slab dominates).
CPU_SLAB = 2**17
CUDA_SLAB = 2**26  # on a GPU, bigger launches; 2 x 256 MiB of temporaries


def supports(kind: str, block: tuple[int, int], scheme: Scheme) -> bool:
    """Whether ``requantize`` handles a stored linear of ``kind`` (with source ``block``) into ``scheme``."""
    if kind != "fp8-block" or scheme.weight != "int8" or scheme.scale_fmt != "float":
        return False
    if scheme.granularity == "channel":
        return True
    return scheme.granularity == "block" and tuple(scheme.block_size) == tuple(block)


def requantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    scheme: Scheme,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "",
    slab_elems: int | None = None,
) -> tuple[QuantizedWeight, float] | None:
    """Re-quantize an FP8-block weight into an INT8 ``scheme``; returns (weight, SNR in dB) or None.

    qweight: float8_e4m3fn [N, K]; scale: float32 [cdiv(N, bn), cdiv(K, bk)] for ``block`` = (bn, bk), the
    dequantization multiplier. The result is bit-identical to ``requantize_ref`` (values and scales).
    None means "not handled here, use the reference": a pairing ``supports`` refuses, an empty weight, or a
    source scale that is non-finite or >= 2^120 (the 2^8 decode factor would overflow). NaN codes raise
    ``ref.NonFiniteError`` naming ``name``, as the reference does.
    """
    if not supports("fp8-block", block, scheme) or qweight.dtype != FP8 or qweight.dim() != 2:
        return None
    n, k = qweight.shape
    bn, bk = block
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    if n == 0 or k == 0 or tuple(scale.shape) != (nb, kb):
        return None
    s_src = scale.float()
    if not bool((s_src.abs() < _MAX_SOURCE_SCALE).all()):  # also False for NaN
        return None
    dev = qweight.device
    all_codes = torch.arange(256, dtype=torch.int32, device=dev).to(torch.uint8)
    table = all_codes.view(FP8).float()  # code -> value; NaN at 0x7F and 0xFF
    finite = (all_codes & 0x7F) != 0x7F
    if not torch.equal(_decode_bits(all_codes)[finite], table[finite] / _DECODE_SCALE):
        return None  # not exact on this device (float16 subnormals flushed?): use the reference

    # Pad ragged edges with code 0 (+0.0), exactly the reference's zero padding; views need whole blocks.
    codes = qweight.contiguous().view(torch.uint8)
    if (nb * bn, kb * bk) != (n, k):
        codes = torch.nn.functional.pad(codes, (0, kb * bk - k, 0, nb * bn - n))
    np_, kp = codes.shape
    slab = slab_elems or (CUDA_SLAB if dev.type == "cuda" else CPU_SLAB)
    rows = min(np_, _slab_rows(kp, bn, slab))  # np_ is whole blocks too

    # Scales from the code maxima (fact 1), through the reference's own amax -> scale rule.
    maxcode = _max_codes(codes, bn, kb, bk, rows)  # (Np, kb) uint8
    amax_rows = table[maxcode.long()] * s_src.abs().repeat_interleave(bn, dim=0)  # (Np, kb) float32
    if scheme.granularity == "block":
        amax = amax_rows.view(nb, bn, kb).amax(dim=1)  # (nb, kb)
    else:
        amax = amax_rows.amax(dim=1, keepdim=True)[:n]  # (N, 1); padded rows are never scaled
    s = ref._scales_from_amax(amax, scheme, scale_dtype, name)
    divisor = torch.where(s > 0, s.float(), torch.ones_like(s, dtype=torch.float32))
    if scheme.granularity == "channel" and np_ != n:
        divisor = torch.nn.functional.pad(divisor, (0, 0, 0, np_ - n), value=1.0)

    lo, hi = QRANGE[scheme.weight]
    q = torch.empty(np_, kp, dtype=torch.int8, device=dev)
    s_dec = s_src * _DECODE_SCALE  # exact: a power of two, below 2^128 by the check above
    h = torch.empty(rows * kp, dtype=torch.int16, device=dev)  # fp8 bits moved into float16 position
    xf = torch.empty(rows * kp, dtype=torch.float32, device=dev)  # the dequantized weight w
    y = torch.empty(rows * kp, dtype=torch.float32, device=dev)
    signal = torch.zeros((), dtype=torch.float64, device=dev)
    noise = torch.zeros((), dtype=torch.float64, device=dev)
    g = min(rows, bn)  # rows per view group: one source block row per group
    for r0 in range(0, np_, rows):
        r = min(rows, np_ - r0)
        b0, nbs = r0 // bn, max(1, r // bn)
        hr = h[: r * kp]
        hr.view(r, kp).copy_(codes[r0 : r0 + r].view(torch.int8))  # sign-extends
        hr.bitwise_left_shift_(7).bitwise_and_(_BITS_MASK)
        x = xf[: r * kp]
        x.copy_(hr.view(torch.float16))  # exact: every float16 is a normal float32
        x4 = x.view(r // g, g, kb, bk)
        x4.mul_(s_dec[b0 : b0 + nbs, None, :, None])  # w = fl(v * s), as ref.dequantize_weight
        if scheme.granularity == "block":
            d = divisor[b0 : b0 + nbs, None, :, None]
        else:
            d = divisor[r0 : r0 + r].view(r // g, g, 1, 1)
        yr = y[: r * kp]
        y4 = yr.view(r // g, g, kb, bk)
        torch.div(x4, d, out=y4)
        yr.round_().clamp_(lo, hi)  # ref._cast: half to even, symmetric range
        q[r0 : r0 + r].view(-1).copy_(yr)
        y4.mul_(d)  # dequantized slab: q * scale (divisor == scale where scale > 0; q == 0 elsewhere)
        yr.sub_(x)
        # In-place squares and float32 cascade sums per slab, float64 across slabs: within ~1e-7 of ref.snr_db's
        # single float32 sum (torch.dot's plain float32 accumulation drifts ~1e-5 over 1M elements).
        noise += yr.square_().sum()
        signal += x.square_().sum()
    if (np_, kp) != (n, k):
        q = q[:n, :k].contiguous()
    return QuantizedWeight(scheme, q, s), _snr(signal.item(), noise.item())


def _decode_bits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 codes -> float32 values times 2^-8 (fact 2)."""
    x = codes.view(torch.int8).to(torch.int16)
    return x.bitwise_left_shift_(7).bitwise_and_(_BITS_MASK).view(torch.float16).float()


def _slab_rows(kp: int, bn: int, slab_elems: int) -> int:
    """Rows per slab: a divisor of bn (inside one block row) or a multiple of bn, about slab_elems elements."""
    want = max(1, slab_elems // kp)
    if want >= bn:
        return want // bn * bn
    rows = 1
    for d in range(1, bn + 1):
        if bn % d == 0 and d <= want:
            rows = d
    return rows


def _max_codes(codes: torch.Tensor, bn: int, kb: int, bk: int, rows: int) -> torch.Tensor:
    """Per row and column block, the largest e4m3 magnitude code (byte & 0x7F): (Np, kb) uint8."""
    np_ = codes.shape[0]
    out = torch.empty(np_, kb, dtype=torch.uint8, device=codes.device)
    step = max(rows, bn)
    buf = torch.empty(step * kb * bk, dtype=torch.uint8, device=codes.device)
    for r0 in range(0, np_, step):
        r = min(step, np_ - r0)
        m = buf[: r * kb * bk].view(r, kb, bk)
        torch.bitwise_and(codes[r0 : r0 + r].view(r, kb, bk), 0x7F, out=m)
        torch.amax(m, dim=2, out=out[r0 : r0 + r])
    return out


def _snr(signal: float, noise: float) -> float:
    """As ``ref.snr_db``: inf when exact, -inf for an all-zero signal with noise."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def requantize_ref(
    qweight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scheme: Scheme,
    scale_dtype: torch.dtype = torch.float32, name: str = "",
) -> tuple[QuantizedWeight, float]:
    """The reference composition ``requantize`` reproduces: dequantize, quantize, SNR of the round trip."""
    src_scheme = replace(Scheme.from_name("fp8-block"), block_size=tuple(block))
    w = ref.dequantize_weight(QuantizedWeight(src_scheme, qweight, scale.float()))
    qw = ref.quantize_weight(w, scheme, scale_dtype=scale_dtype, name=name)
    return qw, ref.snr_db(w, ref.dequantize_weight(qw))


