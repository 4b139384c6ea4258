"""Weight-only GEMMs (ingot.kernels.weight_only) against their references (ingot.quant.ref.w8a16_gemm_ref /
w4a16_gemm_ref).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on small ragged shapes: both sides multiply the
same exact values (x's bf16/fp16 values, the integer weights) and accumulate in fp32, differing only in summation
order and where the scale is applied, so fp32 outputs agree to ~1e-6 of the largest output (FP32_TOL leaves 10x).
Integer-valued inputs with unit scales make every partial sum an exact fp32 integer: there the kernels must equal an
int64 matmul bit for bit, which pins down the nibble order, sign handling and masking. GPU tests (marked ``gpu``)
run real model shapes with NaN-poisoned outputs and fresh random inputs against the reference on the same GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # read by triton.jit when the kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ingot import formats  # noqa: E402
from ingot.formats.base import StoredLinear, pack_int32  # noqa: E402
from ingot.kernels import weight_only  # noqa: E402
from ingot.kernels.tuning import GemmConfig  # noqa: E402
from ingot.kernels.weight_only import (  # noqa: E402
    choose_split_k,
    default_config,
    effective_split_k,
    w4a16_gemm,
    w8a16_gemm,
)
from ingot.quant import ref  # noqa: E402
from ingot.quant.schemes import Scheme  # noqa: E402

INTERPRET = weight_only.INTERPRETED
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip(
        "ingot.kernels.weight_only was imported before TRITON_INTERPRET=1 was set: its kernels are compiled for CUDA",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Ragged on purpose: 576 = 4.5 groups of 128 (SmolLM2's hidden size), 192 = 1.5, 100 and 300 fit no power of two
# (300 = 37.5 packed words: the last int32 holds 4 real values and 4 padding nibbles).
NK_SIZES = [(576, 192), (192, 576), (100, 300)]
# max |y - ref| / max |ref| for fp32 outputs: summation order only (measured ~5e-7 in the interpreter). On a GPU
# tensor cores sum the exact bf16 x int products in fp32 in their own order (and may truncate the alignment bits):
# ~1e-5 of the largest output over K = 14336 in the worst case we expect; a wrong scale, group or nibble is O(1).
GPU_FP32_TOL = 1e-4
FP32_TOL = 1e-5 if INTERPRET else GPU_FP32_TOL
# bf16 rounds the fp32 result to 8 significant bits: half an ulp is <= 2^-8 |y|; triton 3.6's interpreter casts
# fp32 -> bf16 by truncation (a whole ulp, 2^-7), the GPU rounds to nearest even. fp16: 2^-11.
BF16_TOL = 2.0**-7 if INTERPRET else 2.0**-8
FP16_TOL = 2.0**-11
OPS = ["w8a16", "w4a16"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _x(m: int, k: int, g: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    x = torch.randn(m, k, generator=g, device=DEVICE)
    x[:, :: max(1, k // 7)] *= 10  # outlier channels, as in real activations
    return x.to(dtype)


def _scales(shape, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Positive scales over two decades, like amax / 127 (or / 7.5) of real weights."""
    return (10.0 ** (torch.rand(shape, generator=g, device=DEVICE) * 2.0 - 4.0)).to(dtype)


def _w8_operands(m: int, n: int, k: int, seed: int, x_dtype=torch.bfloat16, s_dtype=torch.float32):
    g = _gen(seed)
    w_q = torch.randint(-127, 128, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    return _x(m, k, g, x_dtype), w_q, _scales((n, 1), g, s_dtype)


def _w4_operands(m: int, n: int, k: int, seed: int, x_dtype=torch.bfloat16, s_dtype=torch.float32, group_size=128):
    """(x, w_packed, w_s, q): q int8 [N, K] in [-8, 7], packed by ingot.formats.base.pack_int32."""
    g = _gen(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    w_s = _scales((n, cdiv(k, group_size)), g, s_dtype)
    return _x(m, k, g, x_dtype), pack_int32(q, 4), w_s, q


def _run(op: str, m: int, n: int, k: int, seed: int, **kw):
    """(kernel output, fp32 reference) of one op on fresh operands; kw goes to the kernel (config, bias, out, ...)."""
    bias = kw.pop("bias", None)
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, seed)
        return (w8a16_gemm(x, w_q, w_s, bias, **kw),
                ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32))
    x, w_p, w_s, _ = _w4_operands(m, n, k, seed)
    return (w4a16_gemm(x, w_p, w_s, k, 128, bias, **kw),
            ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, bias, out_dtype=torch.float32))


def assert_close_rel(y: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |y - expected| <= rel * max |expected|, after checking every element was written (no NaN/Inf)."""
    assert y.shape == expected.shape, f"{what}: shape {tuple(y.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    err = (y.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:.1e} * max |ref| {scale:.3g}"


def assert_rounded(y: torch.Tensor, exact: torch.Tensor, rel: float, what: str, floor: float = FP32_TOL) -> None:
    """A bf16/fp16 output is the fp32 result rounded: |y - exact| <= rel * |exact| per element (+ an fp32-sized
    floor for elements near zero, where the kernel's fp32 value may differ from the reference's by summation order)."""
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    e = exact.float()
    bound = rel * e.abs() + floor * e.abs().max()
    excess = ((y.float() - e).abs() - bound).max().item()
    assert excess <= 0, f"{what}: exceeds the rounding bound by {excess:.3g}"


# ------------------------------------------------------------------------------------------- against the refs


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,k", NK_SIZES)
@pytest.mark.parametrize("m", [1, 33])
def test_matches_ref(op, m, n, k):
    """Default tiles: M = 1 and 33 use the decode tiles (16 x 64 x 128, 64 x 64 x 128) with automatic split-K."""
    y, expected = _run(op, m, n, k, seed=m * 1000 + n + k, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close_rel(y, expected, FP32_TOL, f"{op} M={m} N={n} K={k}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,k", [(100, 300), (192, 192)])
def test_matches_ref_prefill_tiles(op, n, k):
    """M = 222: the prefill tiles (128 x 128 x 64), two M tiles, the second one ragged."""
    y, expected = _run(op, 222, n, k, seed=n + k, out_dtype=torch.float32)
    assert_close_rel(y, expected, FP32_TOL, f"{op} M=222 N={n} K={k}")


# GEMV configs (block_m 1): M = 1 only, tensor cores not used; one and several K steps, with and without split-K.
# block_k 256 / 512: the W4A16 GEMV's steps of 2 / 4 whole groups of 128 (the last step of K = 300 half past K)
GEMV_CONFIGS = [GemmConfig(1, 32, 128), GemmConfig(1, 16, 64, split_k=3), GemmConfig(1, 64, 32, num_warps=2),
                GemmConfig(1, 32, 256, num_warps=2), GemmConfig(1, 16, 512, split_k=2),
                GemmConfig(1, 32, 128, num_stages=3, split_k=2)]  # the last: loop loads pipelined on a GPU


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,k", NK_SIZES)
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
def test_gemv_matches_ref(op, n, k, config):
    """The GEMV kernels (config.block_m == 1) against the reference, ragged N and K, split or not."""
    y, expected = _run(op, 1, n, k, seed=n + 3 * k, out_dtype=torch.float32, config=config)
    assert_close_rel(y, expected, FP32_TOL, f"{op} GEMV N={n} K={k} {config}")


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
def test_gemv_integer_exact(config):
    """Integer x and unit scales: the GEMVs equal the int64 matmul bit for bit (int8 corners, every nibble, the
    padding nibbles of a ragged last word, the double-buffered tiles of each split)."""
    n, k = 100, 300
    g = _gen(5)
    x = torch.randint(-16, 17, (1, k), generator=g, device=DEVICE)
    w8 = torch.randint(-128, 128, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    w8[0], w8[1] = 127, -128
    q = torch.randint(-8, 8, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    q[0], q[1] = 7, -8
    xb = x.to(torch.bfloat16)
    y8 = w8a16_gemm(xb, w8, torch.ones(n, 1, device=DEVICE), out_dtype=torch.float32, config=config)
    assert torch.equal(y8.cpu(), (x.cpu().long() @ w8.cpu().long().T).float())
    y4 = w4a16_gemm(xb, pack_int32(q, 4), torch.ones(n, cdiv(k, 128), device=DEVICE), k, out_dtype=torch.float32,
                    config=config)
    assert torch.equal(y4.cpu(), (x.cpu().long() @ q.cpu().long().T).float())


def test_gemv_refuses_m_above_1():
    x, w_q, w_s = _w8_operands(2, 64, 128, seed=1)
    with pytest.raises(ValueError, match=r"block_m = 1 \(the GEMV kernel\) needs M = 1, got M = 2"):
        w8a16_gemm(x, w_q, w_s, config=GemmConfig(1, 32, 128))


@pytest.mark.parametrize("n,k", [(192, 576), (100, 300)])
def test_w8a16_integer_exact(n, k):
    """Integer x, unit scales: every partial sum is an integer below 2^24, so the fp32 output is exactly the int64
    matmul, whatever the order - including the int8 corners -128 and +-127 that a wrong sign extension breaks."""
    m = 33
    g = _gen(7)
    x = torch.randint(-8, 9, (m, k), generator=g, device=DEVICE)
    w_q = torch.randint(-128, 128, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    w_q[0], w_q[1], w_q[2] = 127, -128, -127
    x[0] = 8
    y = w8a16_gemm(x.to(torch.bfloat16), w_q, torch.ones(n, 1, device=DEVICE), out_dtype=torch.float32,
                   config=GemmConfig(16, 32, 64, split_k=3))
    assert torch.equal(y.cpu(), (x.cpu().long() @ w_q.cpu().long().T).float())


@pytest.mark.parametrize("n,k,configs", [
    ((192, 576, (None,))),
    ((100, 300, (None, GemmConfig(16, 16, 32, split_k=2), GemmConfig(64, 32, 128)))),
    ((64, 8, (None, GemmConfig(16, 16, 16)))),
    ((16, 20, (None, GemmConfig(16, 16, 16)))),
])
def test_w4a16_integer_exact(n, k, configs):
    """Integer x, unit scales: exact against the int64 matmul of the unpacked values - so every nibble of every word
    sits at its column (a swapped pair of nibbles or a shift off by 4 bits changes the sum)."""
    m = 33
    g = _gen(11)
    x = torch.randint(-16, 17, (m, k), generator=g, device=DEVICE)
    q = torch.randint(-8, 8, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    q[0], q[1] = 7, -8
    w_p = pack_int32(q, 4)
    ones = torch.ones(n, cdiv(k, 128), device=DEVICE)
    exact = (x.cpu().long() @ q.cpu().long().T).float()
    for cfg in configs:
        y = w4a16_gemm(x.to(torch.bfloat16), w_p, ones, k, out_dtype=torch.float32, config=cfg)
        assert torch.equal(y.cpu(), exact), f"config {cfg}"


def test_w4a16_one_hot_columns():
    """x = identity: y.T is the dequantized weight itself, column by column (q * group scale, exact in fp32)."""
    n, k = 24, 136  # 17 words; groups of 64: 64 + 64 + 8 columns
    g = _gen(13)
    q = torch.randint(-8, 8, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    # distinct per row and group, and q * scale exact in fp32
    w_s = torch.tensor([0.5, 2.0, 0.25], device=DEVICE).repeat(n, 1) * torch.arange(1, n + 1, device=DEVICE)[:, None]
    x = torch.eye(k, device=DEVICE, dtype=torch.bfloat16)
    y = w4a16_gemm(x, pack_int32(q, 4), w_s, k, group_size=64, out_dtype=torch.float32)
    want = q.float() * w_s.repeat_interleave(64, dim=1)[:, :k]
    assert torch.equal(y.T.cpu(), want.cpu())


def test_w4a16_ignores_padding_nibbles():
    """K = 300: the last word's upper 4 nibbles are padding. Filled with garbage (instead of pack_int32's zeros) they
    must not change y: the kernel zeroes x beyond K."""
    m, n, k = 5, 40, 300
    x, w_p, w_s, _ = _w4_operands(m, n, k, seed=17)
    y = w4a16_gemm(x, w_p, w_s, k, out_dtype=torch.float32)
    dirty = w_p.clone()
    dirty[:, -1] |= torch.tensor(0x7F3A0000 | -(2**31), dtype=torch.int32).to(DEVICE)  # bits 16..31 set
    assert not torch.equal(dirty, w_p)
    assert torch.equal(w4a16_gemm(x, dirty, w_s, k, out_dtype=torch.float32), y)


@pytest.mark.parametrize("group_size,block_k", [(64, 64), (64, 32), (256, 128), (32, 32)])
def test_w4a16_other_group_sizes(group_size, block_k):
    m, n, k = 17, 100, 300
    x, w_p, w_s, _ = _w4_operands(m, n, k, seed=19, group_size=group_size)
    expected = ref.w4a16_gemm_ref(x, w_p, w_s, k, group_size, out_dtype=torch.float32)
    y = w4a16_gemm(x, w_p, w_s, k, group_size, out_dtype=torch.float32)  # default tiles, BLOCK_K bent to the group
    assert_close_rel(y, expected, FP32_TOL, f"group {group_size} default tiles")
    y = w4a16_gemm(x, w_p, w_s, k, group_size, out_dtype=torch.float32, config=GemmConfig(16, 32, block_k, split_k=2))
    assert_close_rel(y, expected, FP32_TOL, f"group {group_size} BLOCK_K {block_k}")


@pytest.mark.parametrize("group_size,block_k", [(64, 256), (32, 128), (64, 512)])
def test_w4a16_gemv_steps_of_whole_groups(group_size, block_k):
    """The GEMV with K steps of 2-8 whole groups (each group's sum scaled by its own scale; groups past K masked),
    against the reference; the tensor-core tiles refuse such a step."""
    n, k = 100, 300
    x, w_p, w_s, _ = _w4_operands(1, n, k, seed=37, group_size=group_size)
    expected = ref.w4a16_gemm_ref(x, w_p, w_s, k, group_size, out_dtype=torch.float32)
    for cfg in (GemmConfig(1, 32, block_k, num_warps=2), GemmConfig(1, 16, block_k, split_k=2)):
        y = w4a16_gemm(x, w_p, w_s, k, group_size, out_dtype=torch.float32, config=cfg)
        assert_close_rel(y, expected, FP32_TOL, f"group {group_size} GEMV {cfg}")
    x16 = torch.cat([x] * 16)
    with pytest.raises(ValueError, match=rf"config.block_k = {block_k} must divide group_size = {group_size}"):
        w4a16_gemm(x16, w_p, w_s, k, group_size, config=GemmConfig(16, 32, block_k))


def test_w4a16_group_scales_land_on_their_groups():
    """One nonzero group scale per run: y must be that group's columns' contribution only (catches a K step reading a
    neighbouring group's scale, e.g. with BLOCK_K = 32 < group 128 and split-K ranges starting mid-group)."""
    m, n, k = 3, 50, 300  # groups [0, 128), [128, 256), [256, 300)
    x, w_p, _, q = _w4_operands(m, n, k, seed=23)
    for grp in range(3):
        w_s = torch.zeros(n, 3, device=DEVICE)
        w_s[:, grp] = 1.0
        cols = slice(grp * 128, min(k, (grp + 1) * 128))
        want = x[:, cols].float() @ q[:, cols].float().T
        for cfg in (GemmConfig(16, 64, 128), GemmConfig(16, 16, 32, split_k=5)):
            y = w4a16_gemm(x, w_p, w_s, k, out_dtype=torch.float32, config=cfg)
            assert_close_rel(y, want, FP32_TOL, f"group {grp} config {cfg}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_dtype,out_dtype,rel", [
    (torch.bfloat16, None, BF16_TOL),  # None: x's dtype, the contract's default
    (torch.float16, None, FP16_TOL),
    (torch.float16, torch.bfloat16, BF16_TOL),
])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_dtypes_and_bias(op, x_dtype, out_dtype, rel, bias_dtype):
    """x bf16/fp16, scales in x's dtype (compressed-tensors stores them so), bias of any float dtype."""
    m, n, k = 33, 100, 300
    g = _gen(29)
    bias = None if bias_dtype is None else (torch.randn(n, generator=g, device=DEVICE) * 3).to(bias_dtype)
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, 31, x_dtype, s_dtype=x_dtype)
        y = w8a16_gemm(x, w_q, w_s, bias, out_dtype=out_dtype)
        exact = ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32)
    else:
        x, w_p, w_s, _ = _w4_operands(m, n, k, 31, x_dtype, s_dtype=x_dtype)
        y = w4a16_gemm(x, w_p, w_s, k, bias=bias, out_dtype=out_dtype)
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, bias=bias, out_dtype=torch.float32)
    assert y.dtype == (out_dtype or x_dtype) and y.shape == (m, n)
    # (|bias| ~ 3 against a rounding bound of ~0.1: a bias left out or added twice fails here)
    assert_rounded(y, exact, rel, f"{op} x={x_dtype} out={out_dtype} bias={bias_dtype}")


# ------------------------------------------------------------------------------------ the dequantize backend


def assert_within_weight_rounding(y, x, w, exact, rel, what):
    """The dequantize backend rounds each weight once to x's dtype (relative error <= rel) before an fp32-accumulating
    matmul, then rounds y: |y - exact| <= rel * (|x| @ |w|.T) + rel * |exact| (+ an fp32 floor), per element."""
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    spread = x.float().abs() @ w.float().abs().T
    e = exact.float()
    bound = rel * spread + rel * e.abs() + FP32_TOL * e.abs().max()
    excess = ((y.float() - e).abs() - bound).max().item()
    assert excess <= 0, f"{what}: exceeds the weight-rounding bound by {excess:.3g}"


def test_dequantize_exact_in_fp32():
    """dequantize_w4 / dequantize_w8 to fp32: q * scale with one fp32 multiply, bit for bit, ragged K (the padding
    nibbles of the last word dropped) and groups of 64."""
    n, k = 40, 300
    x, w_p, w_s, q = _w4_operands(1, n, k, seed=43, group_size=64)
    want = q.float() * w_s.repeat_interleave(64, dim=1)[:, :k]
    assert torch.equal(weight_only.dequantize_w4(w_p, w_s, k, 64, torch.float32).cpu(), want.cpu())
    _, w_q, w8_s = _w8_operands(1, n, k, seed=47, s_dtype=torch.bfloat16)
    assert torch.equal(weight_only.dequantize_w8(w_q, w8_s, torch.float32).cpu(), (w_q.float() * w8_s.float()).cpu())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_dequant_backend_matches_ref(op, out_dtype):
    """backend='dequant' (dequantize to x's dtype, then torch's matmul), ragged K, bias: within the bound of one
    rounding per weight and one of the output."""
    m, n, k = 33, 100, 300
    g = _gen(53)
    bias = (torch.randn(n, generator=g, device=DEVICE) * 3).to(torch.bfloat16)
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, 59)
        y = w8a16_gemm(x, w_q, w_s, bias, out_dtype=out_dtype, backend="dequant")
        exact = ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32)
        w = w_q.float() * w_s
    else:
        x, w_p, w_s, q = _w4_operands(m, n, k, 59)
        y = w4a16_gemm(x, w_p, w_s, k, bias=bias, out_dtype=out_dtype, backend="dequant")
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, bias=bias, out_dtype=torch.float32)
        w = q.float() * w_s.repeat_interleave(128, dim=1)[:, :k]
    assert y.dtype == (out_dtype or x.dtype) and y.shape == (m, n)
    assert_within_weight_rounding(y, x, w, exact, BF16_TOL, f"{op} dequant out={out_dtype}")


@pytest.mark.parametrize("op", OPS)
def test_auto_backend_choice(op, monkeypatch):
    """auto: dequantize from DEQUANT_MIN_M rows on, unless a config is given or the output dtype is not x's; bad
    backend names and a config with backend='dequant' are refused."""
    calls = []
    real = weight_only._dequant_matmul
    monkeypatch.setattr(weight_only, "_dequant_matmul", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(weight_only.DEQUANT_MIN_M, op + "_gemm", 4)
    monkeypatch.setattr(weight_only, "DEQUANT_MIN_M_NARROW", 4)
    n, k = 32, 128

    def run(m, **kw):
        calls.clear()
        if op == "w8a16":
            x, w_q, w_s = _w8_operands(m, n, k, 61)
            w8a16_gemm(x, w_q, w_s, **kw)
        else:
            x, w_p, w_s, _ = _w4_operands(m, n, k, 61)
            w4a16_gemm(x, w_p, w_s, k, **kw)
        return "dequant" if calls else "triton"

    assert run(4) == "dequant"
    assert run(3) == "triton"
    assert run(4, config=GemmConfig(16, 32, 64)) == "triton"
    assert run(4, out_dtype=torch.float32) == "triton"
    assert run(3, backend="dequant") == "dequant"
    assert run(4, backend="triton") == "triton"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'dequant'\), got 'cublas'"):
        run(4, backend="cublas")
    with pytest.raises(ValueError, match=r"backend='dequant' takes none"):
        run(4, backend="dequant", config=GemmConfig(16, 32, 64))


@pytest.mark.parametrize("op", ["w8a16_gemm", "w4a16_gemm"])
def test_auto_backend_narrow_prefill_rule(op, monkeypatch):
    """Between DEQUANT_MIN_M_NARROW and DEQUANT_MIN_M rows, auto dequantizes only where the kernel's 128 x 128 tiles
    would not fill the SMs; from DEQUANT_MIN_M on, always; below the narrow bound, never."""
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    lo, hi = weight_only.DEQUANT_MIN_M_NARROW, weight_only.DEQUANT_MIN_M[op]
    choose = weight_only.choose_backend
    assert choose(op, "auto", lo, 28672, None, bf16, bf16, cpu) == "triton"  # NOMINAL_SMS (132) off CUDA
    monkeypatch.setattr(weight_only.tuning, "num_sms", lambda device: 132)
    assert choose(op, "auto", lo, 4096, None, bf16, bf16, cpu) == "dequant"  # 32 tiles
    assert choose(op, "auto", lo, 28672, None, bf16, bf16, cpu) == "triton"  # 224 tiles
    assert choose(op, "auto", lo, 16896, None, bf16, bf16, cpu) == "triton"  # 132 tiles: a full wave
    assert choose(op, "auto", lo, 16768, None, bf16, bf16, cpu) == "dequant"  # 131
    assert choose(op, "auto", lo - 1, 4096, None, bf16, bf16, cpu) == "triton"
    assert choose(op, "auto", hi, 28672, None, bf16, bf16, cpu) == "dequant"
    assert choose(op, "auto", lo, 4096, None, bf16, torch.float32, cpu) == "triton"
    monkeypatch.setattr(weight_only.tuning, "num_sms", lambda device: 16)
    assert choose(op, "auto", lo, 4096, None, bf16, bf16, cpu) == "triton"  # 32 tiles fill a 16-SM GPU


# ------------------------------------------------------------------------------------------------- split-K


@pytest.mark.parametrize("op", OPS)
def test_split_k_variants_agree(op):
    """split 1 (one launch, epilogue in the GEMM), 2, 3 (uneven ranges), 9 (> K tiles: capped) and the automatic
    choice all compute the same y up to fp32 summation order; split-K runs are deterministic bit for bit."""
    m, n, k = 2, 100, 576  # 5 K tiles of 128 (the last ragged for BLOCK_K 128: 576 = 4.5 x 128)
    for split in (1, 2, 3, 9, None):
        cfg = None if split is None else GemmConfig(16, 32, 128, split_k=split)
        y, expected = _run(op, m, n, k, seed=37, config=cfg, out_dtype=torch.float32)
        assert_close_rel(y, expected, FP32_TOL, f"{op} split {split}")
        if split in (3, None):
            again, _ = _run(op, m, n, k, seed=37, config=cfg, out_dtype=torch.float32)
            assert torch.equal(y, again), f"{op} split {split}: not deterministic"


def test_split_k_choices():
    """The automatic split for an H100's 132 SMs. Decode tiles (M = 2: 16 x 64 x 128): 5 ranges for 4096 x 4096
    (64 tiles -> 320 programs), none for 28672 x 4096 (448 tiles already > 2 per SM), and never fewer than 4 K
    tiles per range (SmolLM2's 576 x 576: 5 K tiles, no split). GEMV (M = 1, W8A16 32 x 256 steps): 3 ranges for
    4096 x 4096 (128 row tiles, 16 K steps)."""
    assert default_config("w8a16_gemm", 2, 4096, 4096, 132).split_k == 5
    assert default_config("w4a16_gemm", 2, 4096, 14336, 132).split_k == 5
    assert default_config("w8a16_gemm", 2, 28672, 4096, 132).split_k == 1
    assert default_config("w8a16_gemm", 2, 576, 576, 132).split_k == 1
    assert default_config("w8a16_gemm", 2, 576, 7168, 132).split_k == 14  # 56 K tiles // 4
    assert default_config("w8a16_gemm", 4096, 4096, 4096, 132).split_k == 1  # prefill: 1024 tiles
    assert default_config("w8a16_gemm", 1, 4096, 4096, 132).split_k == 3
    assert default_config("w4a16_gemm", 1, 28672, 4096, 132).split_k == 1  # 448 row tiles of 64
    cfg = GemmConfig(16, 64, 128, split_k=4)
    assert effective_split_k(640, cfg) == (3, 2)  # 5 tiles in 4 ranges would leave one empty: 2 + 2 + 1
    assert effective_split_k(640, GemmConfig(16, 64, 128, split_k=50)) == (5, 1)
    assert effective_split_k(100, cfg) == (1, 1)
    assert choose_split_k(1, 4096, 4096, default_config("w8a16_gemm", 2), 114) == 4  # an H100 PCIe's 114 SMs


def test_default_config_buckets():
    for op in ("w8a16_gemm", "w4a16_gemm"):
        assert default_config(op, 1).block_m == 1  # the GEMV kernel
        assert default_config(op, 2).block_m == 16
        assert default_config(op, 16).block_m == 16
        assert default_config(op, 64).block_m == 64
        assert default_config(op, 65).block_m == 128
    # int4 groups of 128: the tensor-core tiles' K steps lie in one group, the GEMV's are whole groups
    assert all(128 % default_config("w4a16_gemm", m).block_k == 0 for m in (17, 33, 65, 10**6))
    assert default_config("w4a16_gemm", 1).block_k % 128 == 0
    with pytest.raises(ValueError, match=r"unknown weight-only op 'w2a16'"):
        default_config("w2a16", 1)


# ------------------------------------------------------------------------------ end to end: the stored layout


@pytest.mark.parametrize("k", [576, 300])
@pytest.mark.parametrize("m", [1, 33])
def test_w4a16_compressed_tensors_layout(m, k):
    """Quantize with ref.quantize_weight (int4-group, bf16 scales as compressed-tensors stores them), encode with the
    compressed-tensors writer, and feed the stored weight_packed / weight_scale to the kernel: it must equal
    ref.linear on the quantized weight (the model's math) up to fp32 summation order."""
    n = 192
    g = torch.Generator().manual_seed(m + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = ref.quantize_weight(w, Scheme.from_name("int4-group"), scale_dtype=torch.bfloat16)
    stored = formats.writer("compressed-tensors", "int4-group").encode(
        "model.layers.0.mlp.down_proj", StoredLinear("int4-group", qw.qweight, qw.scale), torch.bfloat16)
    packed = stored["model.layers.0.mlp.down_proj.weight_packed"]
    scale = stored["model.layers.0.mlp.down_proj.weight_scale"]
    assert packed.dtype == torch.int32 and packed.shape == (n, cdiv(k, 8)) and scale.dtype == torch.bfloat16
    assert stored["model.layers.0.mlp.down_proj.weight_shape"].tolist() == [n, k]
    y = w4a16_gemm(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), k, out_dtype=torch.float32)
    expected = ref.linear(x.float(), qw)
    assert_close_rel(y.cpu(), expected, FP32_TOL, f"compressed-tensors int4 M={m} K={k}")
    # and against the unquantized weight: int4 keeps ~17 dB of SNR on Gaussian weights (error ~ scale / sqrt(12))
    assert ref.snr_db(x.float() @ w.T, y.cpu()) > 15


@pytest.mark.parametrize("m", [1, 33])
def test_w8a16_int8_weight_scheme(m):
    """int8-weight as the converter makes it (per-channel scales in bf16): the kernel equals ref.linear."""
    n, k = 100, 576
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = ref.quantize_weight(w, Scheme.from_name("int8-weight"), scale_dtype=torch.bfloat16)
    y = w8a16_gemm(x.to(DEVICE), qw.qweight.to(DEVICE), qw.scale.to(DEVICE), out_dtype=torch.float32)
    assert_close_rel(y.cpu(), ref.linear(x.float(), qw), FP32_TOL, f"int8-weight M={m}")
    assert ref.snr_db(x.float() @ w.T, y.cpu()) > 35  # int8 per channel: ~40 dB on Gaussian weights


# ----------------------------------------------------------------------------- out buffers, odd shapes, empty


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_out_buffer_poisoned(op, split, out_dtype):
    """Every element of a NaN-filled ``out`` is overwritten (by the GEMM or by the split-K reduction, which also adds
    the bias), and ``out`` is what comes back. Split 2 over 9 K tiles is 5 + 4: the short last split runs the same
    5 steps as the first, its last one masked to zeros."""
    m, n, k = 33, 100, 576
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    bias = torch.randn(n, generator=_gen(42), device=DEVICE) * 3
    y, exact = _run(op, m, n, k, seed=41, out=out, out_dtype=out_dtype, config=GemmConfig(32, 32, 64, split_k=split),
                    bias=bias)
    assert y is out
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} outputs left unwritten"
    assert_rounded(out, exact, BF16_TOL if out_dtype == torch.bfloat16 else 0.0, f"{op} into out")


@pytest.mark.parametrize("split", [1, 2])
def test_out_buffer_row_stride(split):
    """``out`` may be a row-strided view (e.g. a slice of a wider buffer); the columns beside it stay untouched."""
    m, n, k = 33, 100, 576
    wide = torch.full((m, n + 28), -7.0, device=DEVICE)
    _, exact = _run("w4a16", m, n, k, seed=43, out=wide[:, :n], out_dtype=torch.float32,
                    config=GemmConfig(16, 64, 128, split_k=split))
    assert_close_rel(wide[:, :n], exact, FP32_TOL, "strided out")
    assert (wide[:, n:] == -7.0).all()


def test_empty_m():
    x, w_q, w_s = _w8_operands(0, 100, 300, seed=47)
    assert w8a16_gemm(x, w_q, w_s).shape == (0, 100)
    x, w_p, w_s, _ = _w4_operands(0, 100, 300, seed=47)
    assert w4a16_gemm(x, w_p, w_s, 300).shape == (0, 100)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_odd_shapes(m, n, k, seed):
    """Any shape, tiny ones included (N = 1, K = 1: one masked K tile and one packed word, N tiles wrapped)."""
    for op in OPS:
        y, expected = _run(op, m, n, k, seed, out_dtype=torch.float32)
        assert_close_rel(y, expected, FP32_TOL, f"{op} {m, n, k}")


def test_refs_agree_with_dequantize_then_matmul():
    """The references are ref.linear on the scheme's QuantizedWeight; spelled out once here by hand."""
    m, n, k = 3, 20, 300
    x, w_q, w_s = _w8_operands(m, n, k, seed=53)
    hand = x.cpu().double() @ (w_q.cpu().double() * w_s.cpu().double()).T
    assert_close_rel(ref.w8a16_gemm_ref(x, w_q, w_s, out_dtype=torch.float32).cpu(), hand, 1e-5, "w8 ref")
    assert ref.w8a16_gemm_ref(x, w_q, w_s).dtype == torch.bfloat16  # x's dtype by default
    x, w_p, w_s4, q = _w4_operands(m, n, k, seed=53)
    wd = q.cpu().double() * w_s4.cpu().double().repeat_interleave(128, dim=1)[:, :k]
    hand = x.cpu().double() @ wd.T
    assert_close_rel(ref.w4a16_gemm_ref(x, w_p, w_s4, k, out_dtype=torch.float32).cpu(), hand, 1e-5, "w4 ref")


# ------------------------------------------------------------------------------------------------- refusals


def test_refuses_bad_dtypes():
    x, w_q, w_s = _w8_operands(4, 100, 300, seed=1)
    with pytest.raises(TypeError, match=r"x must be one of .*got torch.float32"):
        w8a16_gemm(x.float(), w_q, w_s)
    with pytest.raises(TypeError, match=r"w_q must be torch.int8, got torch.uint8"):
        w8a16_gemm(x, w_q.view(torch.uint8), w_s)
    with pytest.raises(TypeError, match=r"w_s must be torch.float32 or x's dtype torch.bfloat16, got torch.float16"):
        w8a16_gemm(x, w_q, w_s.half())
    x, w_p, w_s, q = _w4_operands(4, 100, 300, seed=1)
    with pytest.raises(TypeError, match=r"w_packed must be torch.int32, got torch.int8"):
        w4a16_gemm(x, q, w_s, 300)
    with pytest.raises(TypeError, match=r"out_dtype must be one of .* got torch.int8"):
        w4a16_gemm(x, w_p, w_s, 300, out_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"bias must be one of .* got torch.int32"):
        w4a16_gemm(x, w_p, w_s, 300, bias=torch.zeros(100, dtype=torch.int32, device=DEVICE))


def test_refuses_bad_shapes():
    x, w_q, w_s = _w8_operands(4, 100, 300, seed=2)
    with pytest.raises(ValueError, match=r"disagree on K: 300 != 256"):
        w8a16_gemm(x, w_q[:, :256].contiguous(), w_s)
    with pytest.raises(ValueError, match=r"w_s must be per output channel, .* = \(100, 1\), got \(1, 100\)"):
        w8a16_gemm(x, w_q, w_s.view(1, 100))
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(1, 4, 300\)"):
        w8a16_gemm(x[None], w_q, w_s)
    x, w_p, w_s, _ = _w4_operands(4, 100, 300, seed=2)
    with pytest.raises(ValueError, match=r"does not have K = k = 296 columns"):
        w4a16_gemm(x, w_p, w_s, 296)
    with pytest.raises(ValueError, match=r"w_packed must be \[N, cdiv\(K, 8\)\] = \[100, 38\] for K = 300 "
                                         r".*got \(100, 37\)"):
        w4a16_gemm(x, w_p[:, :37].contiguous(), w_s, 300)
    with pytest.raises(ValueError, match=r"w_s must be per row per 128-group, .* = \(100, 3\), got \(100, 2\)"):
        w4a16_gemm(x, w_p, w_s[:, :2].contiguous(), 300)
    with pytest.raises(ValueError, match=r"w_s must be per row per 64-group, .* = \(100, 5\), got \(100, 3\)"):
        w4a16_gemm(x, w_p, w_s, 300, group_size=64)
    with pytest.raises(ValueError, match=r"k must be a positive int"):
        w4a16_gemm(x, w_p, w_s, 300.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(100,\), got \(1, 100\)"):
        w4a16_gemm(x, w_p, w_s, 300, bias=torch.zeros(1, 100, device=DEVICE))


def test_refuses_group_tile_mismatch():
    x, w_p, w_s, _ = _w4_operands(4, 100, 300, seed=3)
    with pytest.raises(ValueError, match=r"config.block_k = 256 must divide group_size = 128"):
        w4a16_gemm(x, w_p, w_s, 300, config=GemmConfig(16, 64, 256))
    x, w_p, w_s, _ = _w4_operands(4, 100, 300, seed=3, group_size=100)
    with pytest.raises(ValueError, match=r"group_size = 100 is not a multiple of 16"):
        w4a16_gemm(x, w_p, w_s, 300, group_size=100)
    with pytest.raises(TypeError, match=r"config must be a GemmConfig, got dict"):
        w4a16_gemm(x, w_p, w_s, 300, group_size=100, config={"block_k": 16})


@pytest.mark.parametrize("which", ["x", "w_q", "w_s"])
def test_refuses_non_contiguous(which):
    args = dict(zip(("x", "w_q", "w_s"), _w8_operands(4, 100, 300, seed=4)))
    t = args[which]
    wide = t.new_zeros(t.shape[0], 2 * t.shape[1])
    wide[:, ::2] = t
    args[which] = wide[:, ::2]
    with pytest.raises(ValueError, match=rf"{which} must be contiguous, got shape \({t.shape[0]}, {t.shape[1]}\)"):
        w8a16_gemm(**args)


def test_refuses_bad_out():
    x, w_q, w_s = _w8_operands(4, 100, 300, seed=5)
    with pytest.raises(TypeError, match=r"out has dtype torch.float32, but out_dtype is torch.bfloat16"):
        w8a16_gemm(x, w_q, w_s, out=torch.empty(4, 100, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must have shape \(M, N\) = \(4, 100\), got \(100, 4\)"):
        w8a16_gemm(x, w_q, w_s, out=torch.empty(100, 4, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must have unit stride along N"):
        w8a16_gemm(x, w_q, w_s, out=torch.empty(100, 4, dtype=torch.bfloat16, device=DEVICE).T)
    with pytest.raises(TypeError, match=r"config must be a GemmConfig, got dict"):
        w8a16_gemm(x, w_q, w_s, config={"block_m": 16})


# ------------------------------------------------------------------------------------ GPU: real model shapes

GPU_M = [1, 16, 64, 256]
# Llama-3-8B q/o (4096, 4096), gate/up (28672, 4096 ~ 70B's), down (4096, 14336), DeepSeek-V3 o_proj (7168, 2048)
# and a shared-expert-sized (18432, 7168); (576, 7168) is DeepSeek's kv_a: N = 4.5 tiles of 128, the most split-K.
GPU_NK = [(4096, 4096), (28672, 4096), (4096, 14336), (7168, 2048), (18432, 7168), (576, 7168)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [256, 1024])
@pytest.mark.parametrize("op", OPS)
def test_gpu_prefill_bias_bf16_repeated(op, m):
    """The default prefill tiles with a bias and a bf16 output, 20 launches into NaN-poisoned outputs: the 8-warp
    W8A16 tiles wrote a garbage tile in 40 of 40 such launches at M = 1024 (weight_only.PREFILL_WARPS)."""
    n, k = 28672, 4096
    seed = int.from_bytes(os.urandom(4), "little")
    bias = torch.randn(n, generator=_gen(seed + 1), device="cuda").to(torch.bfloat16)
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, seed)
        exact = ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32)
        run = lambda out: w8a16_gemm(x, w_q, w_s, bias, out=out, backend="triton")  # noqa: E731
    else:
        x, w_p, w_s, _ = _w4_operands(m, n, k, seed, s_dtype=torch.bfloat16)
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, bias, out_dtype=torch.float32)
        run = lambda out: w4a16_gemm(x, w_p, w_s, k, 128, bias, out=out, backend="triton")  # noqa: E731
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    for i in range(20):
        out.fill_(float("nan"))
        run(out)
        torch.cuda.synchronize()
        assert_rounded(out, exact, BF16_TOL, f"{op} M={m} launch {i} seed={seed}", floor=GPU_FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_NK)
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize("op", OPS)
def test_gpu_real_shapes(op, m, n, k):
    """Fresh random inputs, NaN-poisoned outputs, the reference computed on the same GPU (fp32, no TF32)."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = _gen(seed)
    bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    out32 = torch.full((m, n), float("nan"), device="cuda")
    out16 = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, seed)
        exact = ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32)
        w8a16_gemm(x, w_q, w_s, bias, out=out32, out_dtype=torch.float32)
        w8a16_gemm(x, w_q, w_s, bias, out=out16, backend="triton")
    else:
        x, w_p, w_s, _ = _w4_operands(m, n, k, seed, s_dtype=torch.bfloat16)
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, bias, out_dtype=torch.float32)
        w4a16_gemm(x, w_p, w_s, k, 128, bias, out=out32, out_dtype=torch.float32)
        w4a16_gemm(x, w_p, w_s, k, 128, bias, out=out16, backend="triton")
    torch.cuda.synchronize()
    assert_close_rel(out32, exact, GPU_FP32_TOL, f"{op} fp32 M={m} N={n} K={k} seed={seed}")
    assert_rounded(out16, exact, BF16_TOL, f"{op} bf16 M={m} N={n} K={k} seed={seed}", floor=GPU_FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_NK)
@pytest.mark.parametrize("m", [512, 1024])
@pytest.mark.parametrize("op", OPS)
def test_gpu_dequant_backend_real_shapes(op, m, n, k):
    """The default (auto) path at prefill sizes is the dequantize backend: NaN-poisoned bf16 outputs within one
    rounding per weight and one of the output, fresh random inputs, reference on the same GPU."""
    assert m >= weight_only.DEQUANT_MIN_M[op + "_gemm"]
    seed = int.from_bytes(os.urandom(4), "little")
    bias = torch.randn(n, generator=_gen(seed + 1), device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    if op == "w8a16":
        x, w_q, w_s = _w8_operands(m, n, k, seed, s_dtype=torch.bfloat16)
        exact = ref.w8a16_gemm_ref(x, w_q, w_s, bias, out_dtype=torch.float32)
        w8a16_gemm(x, w_q, w_s, bias, out=out)
        w = w_q.float() * w_s.float()
    else:
        x, w_p, w_s, q = _w4_operands(m, n, k, seed, s_dtype=torch.bfloat16)
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, bias, out_dtype=torch.float32)
        w4a16_gemm(x, w_p, w_s, k, 128, bias, out=out)
        w = q.float() * w_s.float().repeat_interleave(128, dim=1)[:, :k]
    torch.cuda.synchronize()
    assert_within_weight_rounding(out, x, w, exact, BF16_TOL, f"{op} dequant M={m} N={n} K={k} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_split_k_deterministic_and_graph_capturable(op):
    """Decode at M = 1 on a split-K shape: repeated launches give identical bits, and a CUDA graph replay (the
    engine's decode path) writes the same bits into its static output."""
    m, n, k = 1, 4096, 4096
    assert default_config(op + "_gemm", m, n, k, torch.cuda.get_device_properties(0).multi_processor_count).split_k > 1
    seed = int.from_bytes(os.urandom(4), "little")
    if op == "w8a16":
        x, w, w_s = _w8_operands(m, n, k, seed)
        fn = lambda out: w8a16_gemm(x, w, w_s, out=out)  # noqa: E731
    else:
        x, w, w_s, _ = _w4_operands(m, n, k, seed)
        fn = lambda out: w4a16_gemm(x, w, w_s, k, out=out)  # noqa: E731
    first = fn(None)
    for _ in range(3):
        assert torch.equal(fn(None), first)
    static = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static)  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.fill_(float("nan"))
    with torch.cuda.graph(graph):
        fn(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, first)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8-weight", "int4-group"])
def test_gpu_end_to_end_vs_ref_linear(scheme):
    s = Scheme.from_name(scheme)
    m, n, k = 16, 7168, 2048
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    qw = ref.quantize_weight(w, s, scale_dtype=torch.bfloat16)
    expected = ref.linear(x.float(), qw)
    if scheme == "int8-weight":
        y = w8a16_gemm(x, qw.qweight, qw.scale, out_dtype=torch.float32)
    else:
        y = w4a16_gemm(x, pack_int32(qw.qweight, 4), qw.scale, k, out_dtype=torch.float32)
    rel = ((y - expected).norm() / expected.norm()).item()
    assert rel < (1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5), f"{scheme}: relative error {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["w8a16", "w4a16"])
@pytest.mark.parametrize("m", [1, 7, 64, 300, 2048, 4096])
@pytest.mark.parametrize("n,k", [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)])
def test_gpu_smollm2_shapes_finite(op, m, n, k):
    """SmolLM2-135M's linears at decode and prefill sizes (an H100 eval of int8-weight once read NaN perplexity):
    every output finite and close to the reference, bf16 activations of realistic scale."""
    from ingot.formats.base import pack_int32
    from ingot.kernels.weight_only import w4a16_gemm, w8a16_gemm

    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device="cuda") * 0.05
    scheme = Scheme.from_name("int8-weight" if op == "w8a16" else "int4-group")
    qw = ref.quantize_weight(w, scheme)
    expected = ref.linear(x.float(), qw)
    if op == "w8a16":
        y = w8a16_gemm(x, qw.qweight, qw.scale)
    else:
        y = w4a16_gemm(x, pack_int32(qw.qweight, 4), qw.scale, k)
    torch.cuda.synchronize()
    bad = (~torch.isfinite(y)).sum().item()
    assert bad == 0, f"{op} M={m} N={n} K={k}: {bad} non-finite outputs"
    rel = ((y.float() - expected).norm() / expected.norm()).item()
    assert rel < 1e-2, f"{op} M={m} N={n} K={k}: relative error {rel:.3g}"


# ------------------------------------------------- the Gluon weight-only GEMV (kernel "gluon": W4A16 and W8A16)


def test_gluon_config_rules():
    """kernel "gluon" is the M = 1 GEMV: block_m 1 only; it may take 4-8 row tiles (2 rows per thread x 4 warps
    with 32 lanes along a row), which the Triton kernels' configs refuse."""
    GemmConfig(1, 8, 1024, num_warps=4, kernel="gluon")
    with pytest.raises(ValueError, match="power of two >= 16"):
        GemmConfig(1, 8, 1024, num_warps=4)
    with pytest.raises(ValueError, match="kernel 'gluon' is the weight-only GEMV"):
        GemmConfig(16, 64, 128, kernel="gluon")


@pytest.mark.parametrize("op,bits", [("w4a16_gemm", 4), ("w8a16_gemm", 8)])
def test_gluon_candidates_are_launchable_tiles(op, bits):
    """Every tile the tuner sweeps for the Gluon GEMV is one its launcher accepts: block_k = chunk (32 int4 / 16
    int8 weights) x chunks x lanes x warps along K, block_n = rows x row lanes x warps along N, a ragged last K step
    wasting at most 1/8 of its loads, split-K only with one warp along K."""
    from ingot.kernels import gemv_gluon, tuning

    for n, k in [(4096, 4096), (2048, 7168), (24576, 1536), (576, 1536)]:
        cands = [c for c in tuning.candidates(op, 1, n, k, 132, gluon=True) if c.kernel == "gluon"]
        assert cands, (n, k)
        assert not [c for c in tuning.candidates(op, 1, n, k, 132) if c.kernel == "gluon"]
        assert any(c.warps_k > 1 for c in cands) and (n >= 2048 or any(c.split_k > 1 for c in cands)), (n, k)
        for c in cands:
            rows, lanes, wk, chunks = gemv_gluon.tile_shape(c, bits)
            assert rows in (2, 4, 8) and lanes in (8, 16, 32) and wk in (1, 2, 4, 8) and chunks in (1, 2), c
            assert c.block_k == gemv_gluon.chunk(bits) * chunks * lanes * wk, c
            assert c.block_n == rows * (32 // lanes) * (c.num_warps // wk), c
            steps = -(-k // c.block_k)
            assert (steps * c.block_k - k) * 8 <= steps * c.block_k, c
            assert c.split_k == 1 or (wk == 1 and chunks == 1), c


def test_gluon_tile_shape_reads_the_config_fields():
    """tile_shape splits block_k / block_n as the kernel's layout does; a config that does not split is flagged
    (C = 0), and GemmConfig keeps warps_k for kernel "gluon" only."""
    from ingot.kernels import gemv_gluon

    cfg = GemmConfig(1, 8, 8192, group_m=1, num_warps=8, num_stages=2, kernel="gluon", warps_k=4)
    assert gemv_gluon.tile_shape(cfg) == (4, 32, 4, 2)  # 4 rows x 1 row lane x 2 warps along N
    cfg = GemmConfig(1, 16, 1024, group_m=1, num_warps=4, num_stages=1, kernel="gluon")
    assert gemv_gluon.tile_shape(cfg) == (4, 32, 1, 1)  # session 17's tiles read as before
    assert gemv_gluon.tile_shape(GemmConfig(1, 16, 64, num_warps=4, num_stages=1, kernel="gluon", warps_k=4))[1] == 0
    # int8: chunks of 16 weights, so the same block_k spans twice the lanes
    cfg = GemmConfig(1, 16, 512, group_m=1, num_warps=4, num_stages=1, kernel="gluon")
    assert gemv_gluon.tile_shape(cfg, 8) == (4, 32, 1, 1) and gemv_gluon.tile_shape(cfg, 4) == (2, 16, 1, 1)
    with pytest.raises(ValueError, match="warps_k 2 is for kernel 'gluon' only"):
        GemmConfig(1, 16, 256, warps_k=2)


@pytest.mark.parametrize("op,bits", [("w4a16_gemm", 4), ("w8a16_gemm", 8)])
def test_gluon_default_tile(op, bits):
    """The untuned Gluon tile: 4 rows x 32 lanes x 4 warps, 2 along K where the last K step wastes at most 1/8, else
    1, else none (the Triton GEMV keeps that K); a tile the launcher accepts. Off sm_90 (here: the CPU) untuned
    launches keep the Triton defaults."""
    from ingot.kernels import gemv_gluon

    chunk = gemv_gluon.chunk(bits)

    def waste(k, step):  # the share of the last K step's loads past K
        padded = -(-k // step) * step
        return (padded - k) / padded

    for k in (4096, 2048, 7168, 14336, 16384, 1536, 3584, 18944, 576, 520):
        cfg = weight_only.gluon_default(op, k)
        fits = [wk for wk in (2, 1) if k % chunk == 0 and waste(k, chunk * 32 * wk) <= 1 / 8]
        if not fits:
            assert cfg is None, (op, k)
            continue
        assert cfg.kernel == "gluon" and cfg.warps_k == fits[0] and cfg.block_k == chunk * 32 * fits[0], (op, k)
        assert gemv_gluon.tile_shape(cfg, bits) == (4, 32, fits[0], 1), (op, k)
    assert weight_only.resolve_config(op, None, 1, 4096, 4096, torch.device("cpu")).kernel == "triton"


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's fallback")
def test_gluon_config_falls_back_or_refuses_in_the_interpreter():
    """A table's "gluon" entry runs the Triton GEMV where Gluon cannot (the interpreter); a caller's own "gluon"
    config there is refused with the reason."""
    n, k = 64, 512
    x, w_p, w_s, _ = _w4_operands(1, n, k, 3)
    cfg = GemmConfig(1, 16, 512, group_m=1, num_warps=4, num_stages=1, kernel="gluon")
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
    fallback = weight_only._run_gluon_gemv("w4a16_gemm", None, cfg, x, w_p, w_s, k, 128, None, y)
    assert fallback is not None and fallback.kernel == "triton" and fallback.block_m == 1
    assert torch.isnan(y).all()  # nothing launched
    with pytest.raises(ValueError, match="kernel 'gluon' cannot run here: the Triton interpreter"):
        w4a16_gemm(x, w_p, w_s, k, config=cfg)
    # W8A16 the same way: the fallback is w8a16_gemm's own GEMV default, and it computes the right thing
    x, w_q, w_s = _w8_operands(1, n, k, 4)
    fallback = weight_only._run_gluon_gemv("w8a16_gemm", None, cfg, x, w_q, w_s, k, None, None, y)
    assert fallback == weight_only.default_config("w8a16_gemm", 1, n, k, None) and torch.isnan(y).all()
    with pytest.raises(ValueError, match="w8a16_gemm: config.kernel 'gluon' cannot run here: the Triton interpreter"):
        w8a16_gemm(x, w_q, w_s, config=cfg)
    exact = ref.w8a16_gemm_ref(x, w_q, w_s, None, out_dtype=torch.float32)
    assert_rounded(w8a16_gemm(x, w_q, w_s, config=fallback), exact, BF16_TOL, "w8a16 fallback")


# (rows, lanes, warps, split, warps along K, chunks): the tile extremes of the tuner's space, split-K (7 splits of
# one step each), ragged N (not a multiple of the row tile), K of one step, warps along K with one or two chunks,
# ragged K (a last step past K: 7168 in 8192, SmolLM2's 576 in one 1024-step, 1536 in 2048)
GLUON_CASES = [((4096, 4096), (2, 32, 4, 1, 1, 1)), ((4096, 4096), (8, 8, 8, 4, 1, 1)),
               ((2048, 7168), (2, 32, 4, 7, 1, 1)), ((1000, 2048), (4, 16, 4, 2, 1, 1)),
               ((24576, 1536), (4, 8, 4, 1, 1, 1)), ((576, 1536), (8, 16, 8, 3, 1, 1)),
               ((7168, 1024), (4, 32, 8, 1, 1, 1)), ((4096, 4096), (4, 16, 8, 1, 4, 2)),
               ((2048, 7168), (4, 32, 8, 1, 4, 2)), ((576, 576), (2, 16, 8, 1, 2, 1)),
               ((1000, 1536), (4, 8, 8, 1, 8, 1)), ((6144, 4096), (2, 32, 4, 1, 2, 2))]


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nk,tile", GLUON_CASES)
def test_gpu_gluon_gemv(nk, tile, x_dtype):
    """The Gluon GEMV at explicit configs against the reference: fresh random inputs, NaN-poisoned outputs, fp32
    and x-dtype outputs, with and without bias; split-K twice gives the same bits."""
    from ingot.kernels import gemv_gluon

    (n, k), (rows, lanes, warps, split, wk, chunks) = nk, tile
    cfg = GemmConfig(1, rows * (32 // lanes) * warps // wk, 32 * chunks * lanes * wk, group_m=1, num_warps=warps,
                     num_stages=chunks, split_k=split, kernel="gluon", warps_k=wk)
    seed = int.from_bytes(os.urandom(4), "little")
    x, w_p, w_s, _ = _w4_operands(1, n, k, seed, x_dtype=x_dtype, s_dtype=x_dtype)
    assert gemv_gluon.unsupported(x, w_p, w_s, k, 128, cfg) is None
    bias = torch.randn(n, generator=_gen(seed + 1), device="cuda").to(x_dtype)
    for b in (None, bias):
        exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, b, out_dtype=torch.float32)
        out32 = torch.full((1, n), float("nan"), device="cuda")
        out16 = torch.full((1, n), float("nan"), dtype=x_dtype, device="cuda")
        w4a16_gemm(x, w_p, w_s, k, 128, b, config=cfg, out=out32, out_dtype=torch.float32)
        w4a16_gemm(x, w_p, w_s, k, 128, b, config=cfg, out=out16)
        torch.cuda.synchronize()
        what = f"gluon {cfg} N={n} K={k} {x_dtype} bias={b is not None} seed={seed}"
        assert_close_rel(out32, exact, GPU_FP32_TOL, what)
        assert_rounded(out16, exact, BF16_TOL if x_dtype == torch.bfloat16 else FP16_TOL, what, floor=GPU_FP32_TOL)
        assert torch.equal(w4a16_gemm(x, w_p, w_s, k, 128, b, config=cfg, out_dtype=torch.float32), out32), what


@pytest.mark.gpu
def test_gpu_gluon_gemv_refuses_what_it_cannot_take():
    """A caller's "gluon" config on operands the kernel cannot read is refused with the reason; the same entry
    from a table would run the Triton GEMV (the default path stays correct on a K of 65 packed words)."""
    n, k = 576, 520
    x, w_p, w_s, _ = _w4_operands(1, n, k, 5, s_dtype=torch.bfloat16)
    cfg = GemmConfig(1, 16, 512, group_m=1, num_warps=4, num_stages=1, kernel="gluon")
    with pytest.raises(ValueError, match="K = 520, group_size 128: both must be multiples of 32"):
        w4a16_gemm(x, w_p, w_s, k, config=cfg)
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fallback = weight_only._run_gluon_gemv("w4a16_gemm", None, cfg, x, w_p, w_s, k, 128, None, y)
    assert fallback.kernel == "triton"
    exact = ref.w4a16_gemm_ref(x, w_p, w_s, k, 128, None, out_dtype=torch.float32)
    assert_rounded(w4a16_gemm(x, w_p, w_s, k, config=fallback), exact, BF16_TOL, "fallback", floor=GPU_FP32_TOL)


# W8A16 (int8 weights, per-channel scales) on the same kernel: (rows, lanes, warps, split, warps along K, chunks of 16)
W8_GLUON_CASES = [((4096, 4096), (4, 32, 4, 1, 1, 1)), ((4096, 4096), (8, 16, 8, 4, 1, 1)),
                  ((2048, 7168), (4, 32, 8, 1, 8, 1)), ((1000, 2048), (2, 16, 4, 2, 1, 1)),
                  ((576, 576), (2, 16, 8, 1, 2, 1)), ((7168, 2048), (4, 16, 8, 1, 2, 2)),
                  ((6144, 4096), (2, 32, 4, 1, 2, 2))]


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nk,tile", W8_GLUON_CASES)
def test_gpu_gluon_w8a16_gemv(nk, tile, x_dtype):
    """The Gluon GEMV on int8 weights (all 256 values, -128 included) against the reference: fresh random inputs,
    NaN-poisoned outputs, fp32 and x-dtype outputs, with and without bias, scales in fp32 and in x's dtype; the same
    bits twice."""
    from ingot.kernels import gemv_gluon

    (n, k), (rows, lanes, warps, split, wk, chunks) = nk, tile
    cfg = GemmConfig(1, rows * (32 // lanes) * warps // wk, 16 * chunks * lanes * wk, group_m=1, num_warps=warps,
                     num_stages=chunks, split_k=split, kernel="gluon", warps_k=wk)
    seed = int.from_bytes(os.urandom(4), "little")
    for s_dtype in (torch.float32, x_dtype):
        x, _, w_s = _w8_operands(1, n, k, seed, x_dtype=x_dtype, s_dtype=s_dtype)
        w_q = torch.randint(-128, 128, (n, k), generator=_gen(seed + 2), device="cuda", dtype=torch.int8)
        assert gemv_gluon.unsupported(x, w_q, w_s, k, None, cfg, 8) is None
        bias = torch.randn(n, generator=_gen(seed + 1), device="cuda").to(x_dtype)
        for b in (None, bias):
            exact = ref.w8a16_gemm_ref(x, w_q, w_s, b, out_dtype=torch.float32)
            out32 = torch.full((1, n), float("nan"), device="cuda")
            out16 = torch.full((1, n), float("nan"), dtype=x_dtype, device="cuda")
            w8a16_gemm(x, w_q, w_s, b, config=cfg, out=out32, out_dtype=torch.float32)
            w8a16_gemm(x, w_q, w_s, b, config=cfg, out=out16)
            torch.cuda.synchronize()
            what = f"gluon w8a16 {cfg} N={n} K={k} {x_dtype} scales {s_dtype} bias={b is not None} seed={seed}"
            assert_close_rel(out32, exact, GPU_FP32_TOL, what)
            assert_rounded(out16, exact, BF16_TOL if x_dtype == torch.bfloat16 else FP16_TOL, what,
                           floor=GPU_FP32_TOL)
            assert torch.equal(w8a16_gemm(x, w_q, w_s, b, config=cfg, out_dtype=torch.float32), out32), what


@pytest.mark.gpu
def test_gpu_gluon_w8a16_gemv_refuses_what_it_cannot_take():
    """K not a multiple of the int8 chunk (16): a caller's "gluon" config is refused with the reason, a table's
    entry falls back to the Triton GEMV, which is right."""
    n, k = 576, 520
    x, w_q, w_s = _w8_operands(1, n, k, 7)
    cfg = GemmConfig(1, 16, 512, group_m=1, num_warps=4, num_stages=1, kernel="gluon")
    with pytest.raises(ValueError, match="K = 520, group_size None: both must be multiples of 16"):
        w8a16_gemm(x, w_q, w_s, config=cfg)
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fallback = weight_only._run_gluon_gemv("w8a16_gemm", None, cfg, x, w_q, w_s, k, None, None, y)
    assert fallback.kernel == "triton"
    exact = ref.w8a16_gemm_ref(x, w_q, w_s, None, out_dtype=torch.float32)
    assert_rounded(w8a16_gemm(x, w_q, w_s, config=fallback), exact, BF16_TOL, "fallback", floor=GPU_FP32_TOL)
