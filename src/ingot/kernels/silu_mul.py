"""silu(gate) * up in one launch, optionally quantized for the next linear: the gated MLP's activation.

Why: torch runs ``F.silu(gate) * up`` as two launches (silu, then mul) and a W8A8 down_proj quantizes the product in
a third; at decode each is a few microseconds of a ~4 ms Llama-3-8B step on the H100 (silu + mul 105 us, the
down_proj quantization a quarter of the 370 us of activation quantization, per step of 32 layers). One launch here.

Numerics are torch's, rounding for rounding (bf16/fp16 activations; float32 keeps the torch path in the layers):
- ``F.silu`` on CUDA computes ``x / (1 + exp(-x))`` in float32 (IEEE division, the accurate ``expf``) and rounds the
  result to the dtype; the kernel does the same with ``tl.math.div_rn`` and libdevice's ``exp`` (``__nv_expf``,
  the CUDA math library's expf). Under Triton's interpreter (no libdevice) ``tl.exp`` is numpy's float32 exp, which
  can differ from torch's CPU exp in the last bit, so there the output is within one ulp of torch's.
- ``silu * up``: the float32 product of the two dtype values, rounded once (torch's bf16 mul).
- quantized: the rounded product is quantized exactly as ``per_token_quant_int8`` / ``per_token_group_quant`` would
  quantize it from memory (``act_quant._quantize_store``), bit for bit.
Reference: ``ingot.quant.ref.silu_mul_ref`` / ``silu_mul_quant_ref``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ingot.kernels.checks import cdiv, next_pow2
from ingot.kernels.act_quant import (
    ONE_PASS_ELEMS_PER_WARP, ONE_PASS_MAX_K, QMAX, Q_DTYPES, _cast_rn, _quantize_store, check_quant_args,
    quantize_row_chunks,
)

DTYPES = (torch.bfloat16, torch.float16)
# Column tile of the unquantized and the per-group variants (a multiple of any group size up to it): 1024 channels,
# 4 warps, 8 per thread. Per-token quantization needs the row's amax, so there one program holds a whole row (up to
# ONE_PASS_MAX_K channels, as per_token_quant_int8's one-pass path; longer rows take the split-row path below).
BLOCK_N = 1024
NUM_WARPS = 4
# Per-token quantization of up to this many rows spreads each row over BLOCK_N-column programs (two launches:
# silu_mul_maxima, then quantize_row_chunks): one program per row leaves most SMs idle at decode. H100, graph replays
# (benchmarks/scripts/decode_ops_bench.py, results/decode-ops-*): I = 14336, M = 1 / 64 / 128 / 256: 3.4 / 5.7 / 7.7 /
# 11.9 us split against 7.7 / 8.0 / 8.3 / 15.2 us; I = 18432 (one program spills registers): 3.8 / 6.3 / 8.9 / 14.7
# against 21.4 / 22.1 / 25.8 / 47.9 us. Larger M (prefill) was not measured and keeps one program per row.
SPLIT_ROWS_MAX = 256


@triton.jit
def _silu_mul_kernel(
    g_ptr, u_ptr, o_ptr, q_ptr, s_ptr,  # gate, up [M, I] (row strides s_g, s_u); out [M, I] or x_q [M, I], x_s [M, G]
    a_ptr,  # AMAX: each column chunk's max |out| [M, cdiv(I, BLOCK)] (row stride s_a)
    N, s_g, s_u, s_o, s_q, s_s, s_a,
    QUANT: tl.constexpr, GROUP: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr, UE8M0: tl.constexpr,
    COMPILED: tl.constexpr, AMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    cols = col0 + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * s_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * s_u + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    if COMPILED:
        e = libdevice.exp(-gf)  # __nv_expf, as torch's expf (not tl.exp's ex2.approx)
    else:
        e = tl.exp(-gf)
    act = _cast_rn(tl.math.div_rn(gf, 1.0 + e), g.dtype, COMPILED)  # F.silu(gate) in the model dtype
    out = _cast_rn(act.to(tl.float32) * u.to(tl.float32), g.dtype, COMPILED)  # * up, rounded once
    if QUANT:  # lanes past N: silu(0) * 0 = 0
        _quantize_store(out.to(tl.float32), col0, N, q_ptr + row * s_q, s_ptr + row * s_s,
                        GROUP, QMAX, IS_FP8, UE8M0, COMPILED, BLOCK)
    else:
        tl.store(o_ptr + row * s_o + cols, out, mask=ok)
        if AMAX:  # the stored (rounded) values' max, for quantize_row_chunks; lanes past N hold 0
            tl.store(a_ptr + row * s_a + tl.program_id(1), tl.max(tl.abs(out.to(tl.float32)), axis=0))


INTERPRETED = not isinstance(_silu_mul_kernel, triton.runtime.JITFunction)


def _operands(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up [..., I] -> their [M, I] views (unit stride along I, any row stride: halves of one gate_up output)."""
    if gate.dtype not in DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"silu_mul: gate and up must share a dtype in {DTYPES}, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape [..., I]")
    if gate.device != up.device:
        raise ValueError(f"silu_mul: gate on {gate.device}, up on {up.device}")
    if not INTERPRETED and gate.device.type != "cuda":
        raise ValueError(f"silu_mul: gate must be on a CUDA device (any device under TRITON_INTERPRET=1), "
                         f"got {gate.device}")
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    return (g2 if g2.stride(-1) == 1 else g2.contiguous()), (u2 if u2.stride(-1) == 1 else u2.contiguous())


def _ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: gate, up [..., I] bf16/fp16 (unit stride along I) -> a new contiguous [..., I] in their
    dtype, bit-identical to ``F.silu(gate) * up`` on the GPU."""
    g2, u2 = _operands(gate, up)
    m, n = g2.shape
    out = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    block = min(BLOCK_N, next_pow2(n))
    if m:
        with _ctx(gate):
            _silu_mul_kernel[(m, cdiv(n, block))](
                g2, u2, out, out, out, out, n, g2.stride(0), u2.stride(0), out.stride(0), 0, 0, 0,
                QUANT=False, GROUP=block, QMAX=127.0, IS_FP8=False, UE8M0=False, COMPILED=not INTERPRETED,
                AMAX=False, BLOCK=block, num_warps=NUM_WARPS,
            )
    return out.view(gate.shape)


def silu_mul_maxima(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_mul(gate, up)`` and, from the same launch, the max |out| of every BLOCK_N-column chunk of each row:
    act [M, I] in the model dtype (gate / up flattened to rows), maxima float32 [M, cdiv(I, BLOCK_N)] - what
    ``act_quant.quantize_row_chunks`` and ``int8_gemm.int8_gemm_channel_rowmax`` (the M = 1 GEMV that quantizes
    its input itself) take to quantize act per token without a pass for its amax."""
    g2, u2 = _operands(gate, up)
    m, n = g2.shape
    chunks = cdiv(n, BLOCK_N)
    act = torch.empty((m, n), dtype=g2.dtype, device=g2.device)
    amax = torch.empty((m, chunks), dtype=torch.float32, device=g2.device)
    if m:
        with _ctx(g2):
            _silu_mul_kernel[(m, chunks)](
                g2, u2, act, act, act, amax, n, g2.stride(0), u2.stride(0), act.stride(0), 0, 0, amax.stride(0),
                QUANT=False, GROUP=BLOCK_N, QMAX=127.0, IS_FP8=False, UE8M0=False, COMPILED=not INTERPRETED,
                AMAX=True, BLOCK=BLOCK_N, num_warps=NUM_WARPS,
            )
    return act, amax


def silu_mul_quant(
    gate: torch.Tensor,
    up: torch.Tensor,
    dtype: str = "int8",
    group_size: int | None = None,
    scale_fmt: str = "float",
) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up, quantized in the same launch for a W8A8 linear (down_proj).

    gate, up as ``silu_mul``. dtype "int8" / "fp8_e4m3"; group_size None (one int8 scale per token) or a power of
    two (ragged last group padded with zeros); scale_fmt "float" / "ue8m0" (fp8). Returns x_q [..., I] (int8 /
    float8_e4m3fn) and x_s float32 [..., 1] or [..., cdiv(I, group_size)]: bit for bit what
    ``per_token_quant_int8`` / ``per_token_group_quant`` give on ``silu_mul(gate, up)``.
    """
    check_quant_args(dtype, group_size, scale_fmt)
    g2, u2 = _operands(gate, up)
    m, n = g2.shape
    lead = gate.shape[:-1]
    if group_size is None and m and (m <= SPLIT_ROWS_MAX or n > ONE_PASS_MAX_K):
        x_q, x_s = quantize_row_chunks(*silu_mul_maxima(g2, u2))  # few rows (decode), or rows one program can't hold
        return x_q.view(gate.shape), x_s.view(*lead, 1)
    if group_size is None:
        block = group = next_pow2(n)
        num_warps = min(16, max(NUM_WARPS, block // ONE_PASS_ELEMS_PER_WARP))
    else:
        group = group_size
        block = max(group, min(BLOCK_N, next_pow2(n)))  # powers of two: a multiple of the group
        num_warps = NUM_WARPS
    if block % group:
        raise ValueError(f"silu_mul_quant: BLOCK = {block} must be a multiple of the group of {group}")
    x_q = torch.empty((m, n), dtype=Q_DTYPES[dtype], device=gate.device)
    x_s = torch.empty((m, 1 if group_size is None else cdiv(n, group)), dtype=torch.float32, device=gate.device)
    if m:
        with _ctx(gate):
            _silu_mul_kernel[(m, cdiv(n, block))](
                g2, u2, x_q, x_q, x_s, x_s, n, g2.stride(0), u2.stride(0), 0, x_q.stride(0), x_s.stride(0), 0,
                QUANT=True, GROUP=group, QMAX=QMAX[dtype], IS_FP8=dtype == "fp8_e4m3", UE8M0=scale_fmt == "ue8m0",
                COMPILED=not INTERPRETED, AMAX=False, BLOCK=block, num_warps=num_warps,
            )
    return x_q.view(gate.shape), x_s.view(*lead, x_s.shape[-1])
