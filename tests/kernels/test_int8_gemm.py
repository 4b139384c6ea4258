"""W8A8 INT8 GEMMs (ingot.kernels.int8_gemm) against their references (ingot.quant.ref).

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below before triton is imported) on small
ragged shapes; there the integer dots are numpy matmuls and the float epilogue is the reference's, operation for
operation, so the tight bounds below have room to spare. GPU tests (marked ``gpu``) run real model shapes against the
reference computed on the same GPU.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():  # read by triton.jit when the kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ingot.kernels import int8_gemm  # noqa: E402
from ingot.kernels.int8_gemm import GemmConfig, default_config, int8_gemm_block, int8_gemm_channel  # noqa: E402
from ingot.quant import ref  # noqa: E402
from ingot.quant.schemes import Scheme  # noqa: E402

INTERPRET = int8_gemm.INTERPRETED
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip(
        "ingot.kernels.int8_gemm was imported before TRITON_INTERPRET=1 was set: its kernels are compiled for CUDA",
        allow_module_level=True,
    )


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M_SIZES = [1, 33, 222]
# Ragged on purpose: 576 = 4.5 blocks of 128 (DeepSeek's kv_a rank), 192 = 1.5, 100 and 300 fit no power of two.
NK_SIZES = [(256, 256), (576, 192), (192, 576), (100, 300)]
FP32_TOL = 1e-5  # max |y - ref| / max |ref| for fp32 outputs: epilogue rounding only
# Rounding an fp32 result to the output format: half an ulp, relative (bf16 ulp <= 2^-7 |y|, fp16 <= 2^-10 |y|).
# Triton 3.6's interpreter casts fp32 -> bf16 by truncation (cast_impl passes no rounding mode), a whole ulp; the
# GPU rounds to nearest even, which the gpu tests hold to the half ulp.
BF16_TOL = 2.0**-7 if INTERPRET else 2.0**-8
FP16_TOL = 2.0**-11


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _int8(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, device=DEVICE, dtype=torch.int8)


def _scales(shape, g: torch.Generator) -> torch.Tensor:
    """Positive scales over two decades, like amax / 127 of real tensors."""
    return 10.0 ** (torch.rand(shape, generator=g, device=DEVICE) * 2.0 - 3.0)


def _channel_operands(m: int, n: int, k: int, seed: int):
    g = _gen(seed)
    return _int8((m, k), g), _scales((m, 1), g), _int8((n, k), g), _scales((n, 1), g)


def _block_operands(m: int, n: int, k: int, seed: int, block_size=(128, 128)):
    bn, bk = block_size
    g = _gen(seed)
    return _int8((m, k), g), _scales((m, cdiv(k, bk)), g), _int8((n, k), g), _scales((cdiv(n, bn), cdiv(k, bk)), g)


def _bias(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=_gen(seed), device=DEVICE).to(dtype)


def assert_close_rel(y: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |y - expected| <= rel * max |expected|, after checking every element was written (no NaN/Inf)."""
    assert y.shape == expected.shape, f"{what}: shape {tuple(y.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    err = (y.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:.1e} * max |ref| {scale:.3g}"


def assert_rounded(y: torch.Tensor, exact: torch.Tensor, rel: float, what: str) -> None:
    """A bf16/fp16 output is the fp32 result rounded: |y - exact| <= rel * |exact| per element (+ an fp32-sized
    floor for elements near zero, where the kernel's fp32 value may differ from the reference's by rounding)."""
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    e = exact.float()
    bound = rel * e.abs() + FP32_TOL * e.abs().max()
    excess = ((y.float() - e).abs() - bound).max().item()
    assert excess <= 0, f"{what}: exceeds the rounding bound by {excess:.3g}"


# ------------------------------------------------------------------------------------- channel (per token/channel)


@pytest.mark.parametrize("n,k", NK_SIZES)
@pytest.mark.parametrize("m", M_SIZES)
def test_channel_matches_ref(m, n, k):
    x_q, x_s, w_q, w_s = _channel_operands(m, n, k, seed=m * 1000 + n + k)
    y = int8_gemm_channel(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    expected = ref.int8_gemm_channel_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close_rel(y, expected, FP32_TOL, f"channel M={m} N={n} K={k}")


@pytest.mark.parametrize("n,k", [(192, 576), (100, 300)])
def test_channel_int32_exact(n, k):
    """Unit scales: the fp32 output is the integer accumulator itself, exact (|acc| <= 576 * 128^2 < 2^24),
    including the corners -128 * -128 and +-127 runs that a wrong sign extension or int8 accumulation would break."""
    m = 33
    g = _gen(7)
    x_q, w_q = _int8((m, k), g), _int8((n, k), g)
    x_q[0] = 127
    w_q[0] = 127
    x_q[1] = -128
    w_q[1] = -128
    x_q[2] = -127
    ones_m = torch.ones(m, 1, device=DEVICE)
    ones_n = torch.ones(n, 1, device=DEVICE)
    y = int8_gemm_channel(x_q, ones_m, w_q, ones_n, out_dtype=torch.float32)
    exact = (x_q.cpu().long() @ w_q.cpu().long().T).float()
    assert torch.equal(y.cpu(), exact)


@pytest.mark.parametrize("out_dtype,rel", [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_channel_out_dtype_and_bias(out_dtype, rel, bias_dtype):
    m, n, k = 33, 100, 300
    x_q, x_s, w_q, w_s = _channel_operands(m, n, k, seed=11)
    # fp16 tops out at 65504: keep |y| moderate (scales ~1e-2 give |y| up to a few hundred).
    x_s, w_s = x_s.clamp(max=0.02), w_s.clamp(max=0.02)
    bias = None if bias_dtype is None else _bias(n, bias_dtype, seed=12) * 10
    y = int8_gemm_channel(x_q, x_s, w_q, w_s, bias=bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    exact = ref.int8_gemm_channel_ref(x_q, x_s, w_q, w_s, bias=bias, out_dtype=torch.float32)
    assert_rounded(y, exact, rel, f"channel {out_dtype} bias={bias_dtype}")
    # and the reference with the same out_dtype is the same rounding of (nearly) the same fp32 values
    assert_rounded(ref.int8_gemm_channel_ref(x_q, x_s, w_q, w_s, bias=bias, out_dtype=out_dtype), exact, rel, "ref")


def test_channel_small_tiles_and_grouped_order():
    """Many programs in both directions and partial groups: BLOCK 16 x 16 x 32, GROUP_M 3 over 14 x 7 tiles."""
    m, n, k = 222, 100, 300
    x_q, x_s, w_q, w_s = _channel_operands(m, n, k, seed=13)
    cfg = GemmConfig(16, 16, 32, group_m=3)
    y = int8_gemm_channel(x_q, x_s, w_q, w_s, out_dtype=torch.float32, config=cfg)
    assert_close_rel(y, ref.int8_gemm_channel_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32), FP32_TOL, "small tiles")


# ------------------------------------------------------------------------------------- block (per group/128x128)


@pytest.mark.parametrize("n,k", NK_SIZES)
@pytest.mark.parametrize("m", M_SIZES)
def test_block_matches_ref(m, n, k):
    x_q, x_s, w_q, w_s = _block_operands(m, n, k, seed=m * 1000 + n + k + 1)
    y = int8_gemm_block(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    expected = ref.int8_gemm_block_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    assert_close_rel(y, expected, FP32_TOL, f"block M={m} N={n} K={k}")


def test_block_per_block_dots_exact():
    """Unit scales: the output is the sum of exact per-block integer dots (< 2^24, so exact in fp32)."""
    m, n, k = 33, 192, 576
    g = _gen(17)
    x_q, w_q = _int8((m, k), g), _int8((n, k), g)
    x_q[1] = -128
    w_q[1] = -128
    y = int8_gemm_block(
        x_q, torch.ones(m, cdiv(k, 128), device=DEVICE), w_q, torch.ones(cdiv(n, 128), cdiv(k, 128), device=DEVICE),
        out_dtype=torch.float32,
    )
    assert torch.equal(y.cpu(), (x_q.cpu().long() @ w_q.cpu().long().T).float())


def test_block_scales_land_on_their_blocks():
    """One nonzero scale per run: only the output rows/columns of that weight block row (and the K block's
    contribution) may change, which catches an N tile or K step reading its neighbour's scale."""
    m, n, k = 5, 300, 300  # 3 x 3 scale grid, ragged in both
    x_q, x_s, w_q, _ = _block_operands(m, n, k, seed=19)
    for nb, kb in [(0, 0), (1, 2), (2, 1)]:
        w_s = torch.zeros(3, 3, device=DEVICE)
        w_s[nb, kb] = 1.0
        # 1 and 4 N tiles per block row, and 256-wide tiles spanning two block rows (per-column scale gather)
        for cfg in (GemmConfig(16, 128, 128), GemmConfig(16, 32, 128, group_m=2), GemmConfig(16, 256, 128)):
            y = int8_gemm_block(x_q, x_s, w_q, w_s, out_dtype=torch.float32, config=cfg)
            expected = ref.int8_gemm_block_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
            assert_close_rel(y, expected, FP32_TOL, f"scale at ({nb}, {kb}) config {cfg}")
            outside = torch.ones(n, dtype=torch.bool, device=DEVICE)
            outside[nb * 128 : (nb + 1) * 128] = False
            assert (y[:, outside] == 0).all(), f"scale at ({nb}, {kb}) leaked out of its block row"


@pytest.mark.parametrize("block_n", [32, 64])
def test_block_narrow_n_tiles(block_n):
    m, n, k = 222, 300, 192
    x_q, x_s, w_q, w_s = _block_operands(m, n, k, seed=23)
    y = int8_gemm_block(x_q, x_s, w_q, w_s, out_dtype=torch.float32, config=GemmConfig(32, block_n, 128, group_m=4))
    assert_close_rel(y, ref.int8_gemm_block_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32), FP32_TOL, "narrow N")


def test_block_other_block_size():
    """block_size (64, 64): the default tiles follow it (BLOCK_K = 64, BLOCK_N <= 64)."""
    m, n, k = 33, 100, 300
    x_q, x_s, w_q, w_s = _block_operands(m, n, k, seed=29, block_size=(64, 64))
    y = int8_gemm_block(x_q, x_s, w_q, w_s, block_size=(64, 64), out_dtype=torch.float32)
    expected = ref.int8_gemm_block_ref(x_q, x_s, w_q, w_s, block_size=(64, 64), out_dtype=torch.float32)
    assert_close_rel(y, expected, FP32_TOL, "block (64, 64)")


@pytest.mark.parametrize("out_dtype,rel", [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16])
def test_block_out_dtype_and_bias(out_dtype, rel, bias_dtype):
    m, n, k = 33, 576, 192
    x_q, x_s, w_q, w_s = _block_operands(m, n, k, seed=31)
    x_s, w_s = x_s.clamp(max=0.02), w_s.clamp(max=0.02)
    bias = None if bias_dtype is None else _bias(n, bias_dtype, seed=32) * 10
    y = int8_gemm_block(x_q, x_s, w_q, w_s, bias=bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    exact = ref.int8_gemm_block_ref(x_q, x_s, w_q, w_s, bias=bias, out_dtype=torch.float32)
    assert_rounded(y, exact, rel, f"block {out_dtype} bias={bias_dtype}")


# ------------------------------------------------------------------ both kernels: end to end, poison, odd shapes


@pytest.mark.parametrize("scheme", ["int8-channel", "int8-block"])
@pytest.mark.parametrize("n,k", [(576, 192), (100, 300)])
@pytest.mark.parametrize("m", [1, 222])
def test_end_to_end_vs_ref_linear(scheme, m, n, k):
    """Quantize x and W as the scheme says (ref.quantize_act_*, ref.quantize_weight), run the kernel, compare with
    ref.linear (dequantize both, fp32 matmul): the same math up to fp32 summation order."""
    s = Scheme.from_name(scheme)
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 20  # an outlier channel, as in real activations
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    qw = ref.quantize_weight(w, s)
    expected = ref.linear(x, qw, bias=bias)  # fp32, since x is fp32
    if s.activation == "token":
        x_q, x_s = ref.quantize_act_token(x)
        y = int8_gemm_channel(x_q.to(DEVICE), x_s.to(DEVICE), qw.qweight.to(DEVICE), qw.scale.to(DEVICE),
                              bias=bias.to(DEVICE), out_dtype=torch.float32)
    else:
        x_q, x_s = ref.quantize_act_group(x, "int8", s.act_group_size)
        y = int8_gemm_block(x_q.to(DEVICE), x_s.to(DEVICE), qw.qweight.to(DEVICE), qw.scale.to(DEVICE),
                            block_size=s.block_size, bias=bias.to(DEVICE), out_dtype=torch.float32)
    assert_close_rel(y.cpu(), expected, 1e-5, f"{scheme} vs ref.linear")
    rel = ((y.cpu() - expected).norm() / expected.norm()).item()
    assert rel < 1e-6, f"{scheme}: relative error {rel:.3g}"


@pytest.mark.parametrize("op", ["channel", "block"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_out_buffer_poisoned(op, out_dtype):
    """Every element of a NaN-filled ``out`` is overwritten, and ``out`` is what comes back."""
    m, n, k = 33, 300, 192
    if op == "channel":
        args = _channel_operands(m, n, k, seed=37)
        fn, reference = int8_gemm_channel, ref.int8_gemm_channel_ref
    else:
        args = _block_operands(m, n, k, seed=37)
        fn, reference = int8_gemm_block, ref.int8_gemm_block_ref
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    y = fn(*args, out_dtype=out_dtype, out=out)
    assert y is out
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} outputs left unwritten"
    exact = reference(*args, out_dtype=torch.float32)
    assert_rounded(out, exact, BF16_TOL if out_dtype == torch.bfloat16 else 0.0, f"{op} into out")


def test_out_buffer_row_stride():
    """``out`` may be a row-strided view (e.g. a slice of a wider buffer); the columns beside it stay untouched."""
    m, n, k = 33, 100, 300
    args = _channel_operands(m, n, k, seed=41)
    wide = torch.full((m, n + 28), -7.0, device=DEVICE)
    int8_gemm_channel(*args, out_dtype=torch.float32, out=wide[:, :n])
    assert_close_rel(wide[:, :n], ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32), FP32_TOL, "strided out")
    assert (wide[:, n:] == -7.0).all()


def test_empty_m():
    x_q, x_s, w_q, w_s = _channel_operands(0, 100, 300, seed=43)
    assert int8_gemm_channel(x_q, x_s, w_q, w_s).shape == (0, 100)
    x_q, x_s, w_q, w_s = _block_operands(0, 100, 300, seed=43)
    assert int8_gemm_block(x_q, x_s, w_q, w_s).shape == (0, 100)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 70), n=st.integers(1, 200), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_odd_shapes(m, n, k, seed):
    """Any shape, tiny ones included (N = 1, K = 1: one masked K tile, N tiles wrapped onto one row)."""
    args = _channel_operands(m, n, k, seed)
    y = int8_gemm_channel(*args, out_dtype=torch.float32)
    assert_close_rel(y, ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32), FP32_TOL, f"channel {m, n, k}")
    args = _block_operands(m, n, k, seed)
    y = int8_gemm_block(*args, out_dtype=torch.float32)
    assert_close_rel(y, ref.int8_gemm_block_ref(*args, out_dtype=torch.float32), FP32_TOL, f"block {m, n, k}")


def test_refs_integer_part_is_exact():
    """The references' float64 dots equal int64 matmuls (CPU), at the int32 worst case per element."""
    g = torch.Generator().manual_seed(47)
    x_q = torch.randint(-128, 128, (9, 1000), generator=g, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (7, 1000), generator=g, dtype=torch.int8)
    x_q[0] = -128
    w_q[0] = -128  # 1000 * 2^14 = 16384000 < 2^24: exact in fp32 too
    exact = (x_q.long() @ w_q.long().T).float()
    ones = torch.ones
    assert torch.equal(ref.int8_gemm_channel_ref(x_q, ones(9, 1), w_q, ones(7, 1), out_dtype=torch.float32), exact)
    assert torch.equal(ref.int8_gemm_block_ref(x_q, ones(9, 8), w_q, ones(1, 8), out_dtype=torch.float32), exact)


def test_default_config_buckets():
    assert default_config(1).block_m == 16
    assert default_config(16).block_m == 16
    assert default_config(64).block_m == 64
    assert default_config(65).block_m == 128
    assert all(default_config(m).block_k == 128 for m in (1, 17, 33, 65, 10**6))


def test_default_config_is_the_gemv_at_m1_for_int8_ops():
    """M = 1 defaults to the dp4a GEMV for the int8 ops (the block one splits K to ~4 programs per SM, keeping >= 4 K
    blocks per split), never for fp8 or M > 1."""
    assert default_config(1, 4096, 4096, 132, "int8_gemm_channel") == int8_gemm.GEMV_CHANNEL
    block = default_config(1, 4096, 4096, 132, "int8_gemm_block")
    assert (block.block_m, block.block_k, block.split_k) == (1, 128, 4)  # 128 row tiles x 4 = 512 programs
    assert default_config(1, 28672, 4096, 132, "int8_gemm_block").split_k == 1
    assert default_config(1, 100, 576, 132, "int8_gemm_block").split_k == 1  # 5 K blocks: no split
    assert default_config(1, 4096, 4096, 132, "fp8_gemm_block").block_m == 16
    assert default_config(2, 4096, 4096, 132, "int8_gemm_channel").block_m == 16


# ------------------------------------------------------------------------------------------------- split-K


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("m", [1, 33])
def test_split_k_channel_is_int32_exact(m, split_k):
    """Split-K sums int32 partials: still bit-identical to the reference (K = 576: 5 K tiles, so split 8 leaves
    empty slices whose zero partials must count); run twice to prove the tile counters were reset."""
    n, k = 100, 576
    args = _channel_operands(m, n, k, seed=61 + split_k)
    cfg = GemmConfig(16, 32, 128, group_m=1, split_k=split_k)
    expected = ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32)
    for _ in range(2):
        y = int8_gemm_channel(*args, out_dtype=torch.float32, config=cfg)
        assert torch.equal(y, expected)
    assert int(int8_gemm._split_k_locks(torch.device(DEVICE)).abs().sum()) == 0


@pytest.mark.parametrize("split_k", [2, 5])
def test_split_k_block(split_k):
    m, n, k = 33, 300, 576
    args = _block_operands(m, n, k, seed=67)
    bias = _bias(n, torch.bfloat16, 3)
    cfg = GemmConfig(16, 64, 128, group_m=1, split_k=split_k)
    y = int8_gemm_block(*args, bias=bias, out_dtype=torch.float32, config=cfg)
    assert_close_rel(y, ref.int8_gemm_block_ref(*args, bias=bias, out_dtype=torch.float32), FP32_TOL, "split-K block")


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_short_last_split_of_whole_tiles(split_k):
    """K = 640: 5 whole K tiles, so no ragged tile, but split 2 is 3 + 2 and split 4 is 2 + 2 + 1 + 0 (a short and an
    empty split, whose partials must still count)."""
    m, n, k = 33, 100, 640
    args = _channel_operands(m, n, k, seed=71)
    cfg = GemmConfig(16, 32, 128, group_m=1, split_k=split_k)
    assert torch.equal(int8_gemm_channel(*args, out_dtype=torch.float32, config=cfg),
                       ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32))
    args = _block_operands(m, n, k, seed=73)
    y = int8_gemm_block(*args, out_dtype=torch.float32, config=GemmConfig(16, 64, 128, group_m=1, split_k=split_k))
    assert_close_rel(y, ref.int8_gemm_block_ref(*args, out_dtype=torch.float32), FP32_TOL, "short split, block")


def test_default_config_splits_k_only_where_tiles_are_few():
    """132 SMs: a 4096-wide decode GEMM has 128 N tiles of 32 -> split 2; 28672 wide has 896 tiles -> no split;
    prefill never splits; K of one tile cannot be split."""
    assert default_config(1, 4096, 4096, 132).split_k == 2
    assert default_config(16, 2048, 7168, 132).split_k == 4
    assert default_config(1, 28672, 4096, 132).split_k == 1
    assert default_config(4096, 4096, 4096, 132).split_k == 1
    assert default_config(1, 64, 128, 132).split_k == 1
    assert default_config(1, 4096, 4096).split_k == 1  # no SM count (CPU): no split


# ------------------------------------------------------------------------------------------------- refusals


def _valid(op: str, m: int = 4, n: int = 100, k: int = 300):
    return _channel_operands(m, n, k, seed=1) if op == "channel" else _block_operands(m, n, k, seed=1)


def _call(op: str, x_q, x_s, w_q, w_s, **kw):
    fn = int8_gemm_channel if op == "channel" else int8_gemm_block
    return fn(x_q, x_s, w_q, w_s, **kw)


OPS = ["channel", "block"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "which,dtype,match",
    [
        (0, torch.float16, r"x_q must be torch.int8, got torch.float16"),
        (2, torch.uint8, r"w_q must be torch.int8, got torch.uint8"),
        (1, torch.bfloat16, r"x_s must be torch.float32, got torch.bfloat16"),
        (3, torch.float16, r"w_s must be torch.float32, got torch.float16"),
    ],
)
def test_refuses_wrong_dtype(op, which, dtype, match):
    args = list(_valid(op))
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=match):
        _call(op, *args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which,name", [(0, "x_q"), (2, "w_q"), (3, "w_s")])
def test_refuses_non_contiguous(op, which, name):
    args = list(_valid(op))
    t = args[which]
    wide = t.new_zeros(t.shape[0], 2 * t.shape[1])  # same shape and values, every other column of a wider buffer
    wide[:, ::2] = t
    args[which] = wide[:, ::2]
    assert not args[which].is_contiguous()
    with pytest.raises(ValueError, match=rf"{name} must be contiguous, got shape \({t.shape[0]}, {t.shape[1]}\)"):
        _call(op, *args)


def test_block_takes_column_major_activation_scales():
    """x_s as per_token_group_quant(column_major_scales=True) makes it: a transposed view, read through its strides."""
    m, n, k = 33, 192, 576
    x_q, x_s, w_q, w_s = _block_operands(m, n, k, seed=53)
    x_s_cm = x_s.t().contiguous().t()
    assert x_s_cm.stride() == (1, m)
    y = int8_gemm_block(x_q, x_s_cm, w_q, w_s, out_dtype=torch.float32)
    assert torch.equal(y, int8_gemm_block(x_q, x_s, w_q, w_s, out_dtype=torch.float32))


@pytest.mark.parametrize("op", OPS)
def test_refuses_mismatched_k(op):
    x_q, x_s, w_q, w_s = _valid(op, k=300)
    w_q = w_q[:, :256].contiguous()
    with pytest.raises(ValueError, match=r"disagree on K: 300 != 256"):
        _call(op, x_q, x_s, w_q, w_s)


def test_refuses_channel_scale_shapes():
    x_q, x_s, w_q, w_s = _valid("channel", m=4, n=100)
    with pytest.raises(ValueError, match=r"x_s must be per token, shape \(M, 1\) = \(4, 1\), got \(4, 3\)"):
        int8_gemm_channel(x_q, torch.ones(4, 3, device=DEVICE), w_q, w_s)
    with pytest.raises(ValueError, match=r"w_s must be per output channel, .* = \(100, 1\), got \(1, 100\)"):
        int8_gemm_channel(x_q, x_s, w_q, w_s.view(1, 100))
    with pytest.raises(ValueError, match=r"x_s must be 2-D, got shape \(4,\)"):
        int8_gemm_channel(x_q, x_s.view(4), w_q, w_s)


def test_refuses_block_scale_shapes():
    x_q, x_s, w_q, w_s = _valid("block", m=4, n=100, k=300)  # x_s (4, 3), w_s (1, 3)
    with pytest.raises(ValueError, match=r"x_s must be per token per 128-group, .* = \(4, 3\), got \(4, 1\)"):
        int8_gemm_block(x_q, x_s[:, :1].contiguous(), w_q, w_s)
    with pytest.raises(ValueError, match=r"w_s must be per 128x128 block, .* = \(1, 3\), got \(100, 3\)"):
        int8_gemm_block(x_q, x_s, w_q, torch.ones(100, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"x_s must be per token per 64-group, .* = \(4, 5\), got \(4, 3\)"):
        int8_gemm_block(x_q, x_s, w_q, w_s, block_size=(64, 64))
    with pytest.raises(ValueError, match=r"block_size \(bn, bk\) needs bn >= 1 and bk a power of two >= 16 .* got \(128, 96\)"):
        int8_gemm_block(x_q, x_s, w_q, w_s, block_size=(128, 96))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (GemmConfig(16, 64, 64), r"config.block_k = 64 must equal the K quantization block 128"),
        (GemmConfig(16, 64, 256), r"config.block_k = 256 must equal the K quantization block 128"),
        # the sm90 decode kernel's K steps may hold several blocks (promoted one by one), not part of one
        (GemmConfig(16, 64, 64, kernel="sm90"), r"config.block_k = 64 must be a multiple of the K quantization block"),
    ],
)
def test_block_refuses_k_tile_other_than_k_block(cfg, match):
    with pytest.raises(ValueError, match=match):
        int8_gemm_block(*_valid("block"), config=cfg)


def test_config_validation():
    with pytest.raises(ValueError, match=r"GemmConfig.block_n must be a power of two >= 16, got 48"):
        GemmConfig(16, 48, 128)
    with pytest.raises(ValueError, match=r"GemmConfig.block_m must be a power of two >= 16, got 8"):
        GemmConfig(8, 64, 128)
    with pytest.raises(TypeError, match=r"config must be a GemmConfig, got dict"):
        int8_gemm_channel(*_valid("channel"), config={"block_m": 16})


@pytest.mark.parametrize("op", OPS)
def test_refuses_bad_bias_out_and_out_dtype(op):
    args = _valid(op, m=4, n=100)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(100,\), got \(1, 100\)"):
        _call(op, *args, bias=torch.zeros(1, 100, device=DEVICE))
    with pytest.raises(TypeError, match=r"bias must be one of .* got torch.int32"):
        _call(op, *args, bias=torch.zeros(100, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match=r"out_dtype must be one of .* got torch.int8"):
        _call(op, *args, out_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"out has dtype torch.float32, but out_dtype is torch.bfloat16"):
        _call(op, *args, out=torch.empty(4, 100, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must have shape \(M, N\) = \(4, 100\), got \(100, 4\)"):
        _call(op, *args, out=torch.empty(100, 4, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must have unit stride along N"):
        _call(op, *args, out=torch.empty(100, 4, dtype=torch.bfloat16, device=DEVICE).T)


def test_channel_refuses_k_that_could_overflow_int32():
    k = 131072
    x_q, ones = torch.zeros(1, k, dtype=torch.int8, device=DEVICE), torch.ones(1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"K = 131072 may overflow the int32 accumulator"):
        int8_gemm_channel(x_q, ones, x_q.clone(), ones)


# ------------------------------------------------------------------------------------------------- GEMV (M = 1)

GEMV_CONFIGS = [
    GemmConfig(1, 16, 128, group_m=1, num_warps=4, num_stages=1),
    GemmConfig(1, 32, 256, group_m=1, num_warps=4, num_stages=3, split_k=2),
    GemmConfig(1, 16, 128, group_m=1, num_warps=8, num_stages=1, split_k=8),  # empty slices at K = 576
]


@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=lambda c: f"bn{c.block_n}-bk{c.block_k}-split{c.split_k}")
@pytest.mark.parametrize("n,k", [(100, 576), (64, 256), (200, 1024), (48, 192)])
def test_gemv_channel_is_int32_exact(n, k, cfg):
    """The M = 1 GEMV (config.block_m 1: int32 words, dp4a on the GPU, byte shifts here) sums the same integers as
    the tensor-core kernel: y is bit-identical to the reference and to the dot kernel, ragged K and N included,
    repeated (split-K counters reset)."""
    args = _channel_operands(1, n, k, seed=n + k)
    words, _ = int8_gemm._gemv_plan("int8_gemm_channel", args[0], args[2], (1, n, k), cfg)
    assert words is not None, "these operands must run the GEMV, not fall back to the tensor-core tiles"
    bias = _bias(n, torch.float32, seed=3)
    expected = ref.int8_gemm_channel_ref(*args, bias=bias, out_dtype=torch.float32)
    dot = int8_gemm_channel(*args, bias=bias, out_dtype=torch.float32, config=GemmConfig(16, 32, 128, group_m=1))
    for _ in range(2):
        y = int8_gemm_channel(*args, bias=bias, out_dtype=torch.float32, config=cfg)
        assert torch.equal(y, dot)
        if DEVICE == "cpu":
            assert torch.equal(y, expected)
        else:  # compiled, the fp32 epilogue (x_s * w_s, + bias) may contract into an fma: within an ulp or two
            torch.testing.assert_close(y, expected.to(y.device), rtol=1e-6, atol=1e-5)
    assert int(int8_gemm._split_k_locks(torch.device(DEVICE)).abs().sum()) == 0


def test_gemv_channel_extreme_bytes():
    """Every byte at -127 / 127 (and -128 in x, which the dp4a and the shifts must sign-extend): still exact."""
    n, k = 32, 1024
    x_q = torch.full((1, k), -128, dtype=torch.int8, device=DEVICE)
    x_q[0, 1::3] = 127
    w_q = torch.full((n, k), -127, dtype=torch.int8, device=DEVICE)
    w_q[::2, ::5] = 127
    ones = torch.ones(1, 1, device=DEVICE)
    w_s = torch.ones(n, 1, device=DEVICE)
    y = int8_gemm_channel(x_q, ones, w_q, w_s, out_dtype=torch.float32, config=GEMV_CONFIGS[1])
    assert torch.equal(y, (x_q.double() @ w_q.double().T).float())


@pytest.mark.parametrize("cfg", [c for c in GEMV_CONFIGS if c.block_k == 128],
                         ids=lambda c: f"bn{c.block_n}-split{c.split_k}")
@pytest.mark.parametrize("n,k", [(100, 576), (256, 256), (200, 1024), (130, 192)])
def test_gemv_block_matches_ref(n, k, cfg):
    """The block GEMV (one 128-column K block per step, promoted and scaled like the tensor-core kernel)."""
    args = _block_operands(1, n, k, seed=n * k)
    assert int8_gemm._gemv_plan("int8_gemm_block", args[0], args[2], (1, n, k), cfg)[0] is not None
    bias = _bias(n, torch.bfloat16, seed=4)
    expected = ref.int8_gemm_block_ref(*args, bias=bias, out_dtype=torch.float32)
    for _ in range(2):
        y = int8_gemm_block(*args, bias=bias, out_dtype=torch.float32, config=cfg)
        assert_close_rel(y, expected, FP32_TOL, f"block GEMV N={n} K={k} {cfg}")
    y16 = int8_gemm_block(*args, bias=bias, config=cfg)
    assert_rounded(y16, expected, BF16_TOL, f"block GEMV bf16 N={n} K={k}")


def test_gemv_config_falls_back_where_it_cannot_run():
    """A GEMV config on K % 4 != 0 (no int32 view) runs the default tensor-core tiles; on M > 1 it is refused."""
    args = _channel_operands(1, 40, 300 + 2, seed=9)
    words, fallback = int8_gemm._gemv_plan("int8_gemm_channel", args[0], args[2], (1, 40, 302), GEMV_CONFIGS[0])
    assert words is None and fallback.block_m == 16
    y = int8_gemm_channel(*args, out_dtype=torch.float32, config=GEMV_CONFIGS[0])
    assert torch.equal(y, ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32))
    for op, operands, fn in (("channel", _channel_operands(2, 40, 256, seed=9), int8_gemm_channel),
                             ("block", _block_operands(2, 40, 256, seed=9), int8_gemm_block)):
        with pytest.raises(ValueError, match=r"config.block_m = 1 \(the GEMV kernel\) needs M = 1, got M = 2"):
            fn(*operands, config=GEMV_CONFIGS[0])


def _rowmax_operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int, ranges: int = 3):
    """x [M, K] in ``dtype`` with the maxima of ``ranges`` column ranges per row (as a producer writes them), and
    int8-channel weights."""
    g = _gen(seed)
    x = (torch.randn((m, k), generator=g, device=DEVICE) * 3.0).to(dtype)
    x[:, 5] = 0.0
    maxima = torch.stack([c.float().abs().amax(-1) for c in x.chunk(ranges, dim=-1)], dim=-1).contiguous()
    return x, maxima, _int8((n, k), g), _scales((n, 1), g)


@pytest.mark.parametrize("cfg", [*GEMV_CONFIGS, GemmConfig(1, 16, 1024, group_m=1, num_warps=8, num_stages=1)],
                         ids=lambda c: f"bn{c.block_n}-bk{c.block_k}-split{c.split_k}")
@pytest.mark.parametrize("n,k", [(100, 576), (64, 256), (48, 192), (40, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_rowmax_gemv_quantizes_like_per_token_quant(monkeypatch, dtype, n, k, cfg):
    """int8_gemm_channel_rowmax at M = 1 with a GEMV config: the GEMV quantizes x itself (no quantize_row_chunks
    launch, which is made to fail here) and gives the bits of per_token_quant_int8 + the GEMV, and of the reference;
    ragged K (576, 1000 in 1024-steps) and split-K included, repeated (counters reset)."""
    from ingot.kernels.act_quant import per_token_quant_int8

    x, maxima, w_q, w_s = _rowmax_operands(1, n, k, dtype, seed=n + k)
    bias = _bias(n, torch.float32, seed=5)
    x_q, x_s = per_token_quant_int8(x)
    want = int8_gemm_channel(x_q, x_s, w_q, w_s, bias=bias, out_dtype=torch.float32, config=cfg)
    monkeypatch.setattr(int8_gemm, "quantize_row_chunks", lambda *a: pytest.fail("the GEMV must quantize x itself"))
    for _ in range(2):
        y = int8_gemm.int8_gemm_channel_rowmax(x, maxima, w_q, w_s, bias=bias, out_dtype=torch.float32, config=cfg)
        assert torch.equal(y, want)
    expected = ref.int8_gemm_channel_rowmax_ref(x, maxima, w_q, w_s, bias, torch.float32)
    if DEVICE == "cpu":
        assert torch.equal(y, expected)
    else:  # compiled, the epilogue's + bias may contract into an fma (as the plain GEMV's; its test above)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    assert int(int8_gemm._split_k_locks(torch.device(DEVICE)).abs().sum()) == 0


def test_rowmax_scale_comes_from_the_maxima():
    """The GEMV takes the row's scale from the maxima, not from x: maxima of twice x's amax halve x_q (and the
    result then differs from the reference, which quantizes x itself) - what a producer's wrong maxima would do."""
    x, maxima, w_q, w_s = _rowmax_operands(1, 64, 512, torch.bfloat16, seed=11)
    cfg = GEMV_CONFIGS[0]
    good = int8_gemm.int8_gemm_channel_rowmax(x, maxima, w_q, w_s, out_dtype=torch.float32, config=cfg)
    bad = int8_gemm.int8_gemm_channel_rowmax(x, maxima * 2, w_q, w_s, out_dtype=torch.float32, config=cfg)
    expected = ref.int8_gemm_channel_rowmax_ref(x, maxima, w_q, w_s, out_dtype=torch.float32)
    assert torch.equal(good, expected) and not torch.equal(bad, expected)


def test_rowmax_elsewhere_quantizes_first():
    """M > 1, or a config that is not the GEMV: quantize_row_chunks, then int8_gemm_channel - the same bits as
    quantizing x with per_token_quant_int8. Malformed maxima are refused."""
    from ingot.kernels.act_quant import per_token_quant_int8

    for m, cfg in ((3, None), (1, GemmConfig(16, 32, 128, group_m=1))):
        x, maxima, w_q, w_s = _rowmax_operands(m, 80, 384, torch.bfloat16, seed=m)
        y = int8_gemm.int8_gemm_channel_rowmax(x, maxima, w_q, w_s, out_dtype=torch.float32, config=cfg)
        x_q, x_s = per_token_quant_int8(x)
        assert torch.equal(y, int8_gemm_channel(x_q, x_s, w_q, w_s, out_dtype=torch.float32, config=cfg))
    with pytest.raises(ValueError, match=r"x_maxima must be \[M, C\] = \[1, C >= 1\]"):
        int8_gemm.int8_gemm_channel_rowmax(x[:1], maxima[:0], w_q, w_s)


# ------------------------------------------------------------------------------------ GPU: real model shapes

GPU_M = [1, 16, 128, 1024, 4096]
# Llama-3-8B q/o and MLP-down-sized (4096, 4096), Llama-3-70B-ish gate/up (28672, 4096), DeepSeek-V3 shapes
# (7168, 2048) (o_proj-sized, K a multiple of 128) and (576, 7168) (kv_a: N = 4.5 blocks, ragged).
GPU_NK = [(4096, 4096), (28672, 4096), (7168, 2048), (576, 7168)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_NK)
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize("op", OPS)
def test_gpu_real_shapes(op, m, n, k):
    """Fresh random inputs, NaN-poisoned outputs, references computed on the same GPU."""
    seed = int.from_bytes(os.urandom(4), "little")
    if op == "channel":
        args = _channel_operands(m, n, k, seed)
        fn, reference = int8_gemm_channel, ref.int8_gemm_channel_ref
    else:
        args = _block_operands(m, n, k, seed)
        fn, reference = int8_gemm_block, ref.int8_gemm_block_ref
    bias = _bias(n, torch.bfloat16, seed + 1)
    exact = reference(*args, bias=bias, out_dtype=torch.float32)

    out = torch.full((m, n), float("nan"), device="cuda")
    fn(*args, bias=bias, out_dtype=torch.float32, out=out)
    torch.cuda.synchronize()
    assert_close_rel(out, exact, FP32_TOL, f"{op} fp32 M={m} N={n} K={k} seed={seed}")

    out16 = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    fn(*args, bias=bias, out=out16)  # default out_dtype bf16
    torch.cuda.synchronize()
    assert_rounded(out16, exact, BF16_TOL, f"{op} bf16 M={m} N={n} K={k} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 4, 16])
@pytest.mark.parametrize("op", OPS)
def test_gpu_split_k_repeated(op, split_k):
    """Split-K on the GPU: 50 launches back to back on fresh inputs must all match (a missing fence or a counter
    left non-zero shows up as a wrong or unwritten tile in some launch)."""
    m, n, k = 16, 4096, 7168
    cfg = GemmConfig(16, 32, 128, group_m=1, num_stages=4, split_k=split_k)
    for i in range(50):
        seed = int.from_bytes(os.urandom(4), "little")
        args = _channel_operands(m, n, k, seed) if op == "channel" else _block_operands(m, n, k, seed)
        fn, reference = (int8_gemm_channel, ref.int8_gemm_channel_ref) if op == "channel" else (
            int8_gemm_block, ref.int8_gemm_block_ref)
        out = torch.full((m, n), float("nan"), device="cuda")
        fn(*args, out_dtype=torch.float32, out=out, config=cfg)
        torch.cuda.synchronize()
        assert_close_rel(out, reference(*args, out_dtype=torch.float32), FP32_TOL, f"{op} split {split_k} launch {i}")
    assert int(int8_gemm._split_k_locks(torch.device("cuda", torch.cuda.current_device())).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [*GEMV_CONFIGS, GemmConfig(1, 64, 512, group_m=1, num_warps=8, num_stages=3,
                                                            split_k=4)],
                         ids=lambda c: f"bn{c.block_n}-bk{c.block_k}-split{c.split_k}-s{c.num_stages}")
@pytest.mark.parametrize("n,k", [(4096, 4096), (7168, 2048), (576, 7168), (2048, 7168)])
@pytest.mark.parametrize("op", OPS)
def test_gpu_gemv_repeated(op, n, k, cfg):
    """The dp4a GEMV at real sizes: 20 launches on fresh inputs into NaN-poisoned outputs, every one exact (channel:
    bit-identical to the reference) or within the fp32 bound (block)."""
    if op == "block" and cfg.block_k != 128:
        cfg = replace(cfg, block_k=128)
    for i in range(20):
        seed = int.from_bytes(os.urandom(4), "little")
        args = _channel_operands(1, n, k, seed) if op == "channel" else _block_operands(1, n, k, seed)
        fn, reference = (int8_gemm_channel, ref.int8_gemm_channel_ref) if op == "channel" else (
            int8_gemm_block, ref.int8_gemm_block_ref)
        out = torch.full((1, n), float("nan"), device="cuda")
        fn(*args, out_dtype=torch.float32, out=out, config=cfg)
        torch.cuda.synchronize()
        expected = reference(*args, out_dtype=torch.float32)
        if op == "channel":
            assert torch.equal(out, expected), f"channel GEMV {cfg} launch {i} seed {seed}"
        else:
            assert_close_rel(out, expected, FP32_TOL, f"block GEMV {cfg} launch {i} seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096), (576, 1536), (2048, 7168)])
def test_gpu_rowmax_gemv_repeated(n, k):
    """int8_gemm_channel_rowmax at M = 1, real sizes, the config the library picks (tables or default): 10 launches
    on fresh inputs into NaN-poisoned outputs, each bit-identical to per_token_quant_int8 + int8_gemm_channel and to
    the reference."""
    from ingot.kernels.act_quant import per_token_quant_int8

    for i in range(10):
        seed = int.from_bytes(os.urandom(4), "little")
        x, maxima, w_q, w_s = _rowmax_operands(1, n, k, torch.bfloat16, seed, ranges=14)
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        int8_gemm.int8_gemm_channel_rowmax(x, maxima, w_q, w_s, out=out)
        torch.cuda.synchronize()
        x_q, x_s = per_token_quant_int8(x)
        assert torch.equal(out, int8_gemm_channel(x_q, x_s, w_q, w_s)), f"N={n} K={k} launch {i} seed {seed}"
        assert torch.equal(out, ref.int8_gemm_channel_rowmax_ref(x, maxima, w_q, w_s)), f"vs ref, seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8-channel", "int8-block"])
def test_gpu_end_to_end_vs_ref_linear(scheme):
    s = Scheme.from_name(scheme)
    m, n, k = 1024, 7168, 2048
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.02
    qw = ref.quantize_weight(w, s)
    expected = ref.linear(x, qw)
    if s.activation == "token":
        y = int8_gemm_channel(*ref.quantize_act_token(x), qw.qweight, qw.scale, out_dtype=torch.float32)
    else:
        x_q, x_s = ref.quantize_act_group(x, "int8", s.act_group_size)
        y = int8_gemm_block(x_q, x_s, qw.qweight, qw.scale, block_size=s.block_size, out_dtype=torch.float32)
    # ref.linear's fp32 matmul on CUDA may use TF32 if a caller enabled it: compare by relative Frobenius error.
    rel = ((y - expected).norm() / expected.norm()).item()
    assert rel < 1e-3 if torch.backends.cuda.matmul.allow_tf32 else rel < 1e-5, f"{scheme}: relative error {rel:.3g}"



def test_backend_choice_is_checked():
    block = _block_operands(4, 256, 256, 0)
    channel = _channel_operands(4, 256, 256, 0)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, sm90"):
        int8_gemm_block(*block, backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of auto, triton, sm90"):
        int8_gemm_channel(*channel, backend="cutlass")
    # no Hopper here (CPU, interpreter): asking for the sm_90 kernels names why they cannot run, "auto" runs Triton
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'sm90': the triton interpreter runs no Gluon"):
            int8_gemm_block(*block, backend="sm90")
        with pytest.raises(ValueError, match="backend 'sm90': the triton interpreter runs no Gluon"):
            int8_gemm_channel(*channel, backend="sm90")
        big = _block_operands(512, 128, 128, 1)  # M at the sm_90 kernels' smallest M: still Triton off the GPU
        assert int8_gemm.auto_backend(big[0], big[2], (128, 128)) == "triton"
        assert int8_gemm.auto_backend(big[0], big[2]) == "triton"
        assert_close_rel(int8_gemm_block(*big, out_dtype=torch.float32),
                         ref.int8_gemm_block_ref(*big, out_dtype=torch.float32), FP32_TOL, "auto on CPU, M = 512")
        big = _channel_operands(512, 128, 128, 1)
        assert torch.equal(int8_gemm_channel(*big, out_dtype=torch.float32),
                           ref.int8_gemm_channel_ref(*big, out_dtype=torch.float32))


def test_sm90_decode_config_off_hopper():
    """A caller's config of kernel "sm90" (the Hopper decode kernel) names why it cannot run (here: the
    interpreter, or no sm_90); with backend "triton" likewise."""
    if _hopper():
        pytest.skip("the decode kernel runs here (its GPU tests cover it)")
    sm90 = GemmConfig(16, 64, 256, group_m=1, num_stages=4, kernel="sm90")
    channel = _channel_operands(5, 128, 256, 1)
    with pytest.raises(ValueError, match="config.kernel 'sm90' cannot run here"):
        int8_gemm_channel(*channel, config=sm90)
    with pytest.raises(ValueError, match="backend 'triton'"):
        int8_gemm_channel(*channel, config=sm90, backend="triton")
    block = _block_operands(5, 128, 256, 1)
    with pytest.raises(ValueError, match="config.kernel 'sm90' cannot run here"):
        int8_gemm_block(*block, config=replace(sm90, block_k=128))


def test_channel_config_picks_the_tile_that_finishes_first():
    """Waves of tiles over the SMs times the tile's relative time (132 SMs, the H100): the 128x256 tile where both
    need the same number of waves or it saves one, the 128x128 tile where the wide tiles would leave SMs idle."""
    from ingot.kernels import gemm_sm90

    wide, narrow = (cfg for cfg, _ in gemm_sm90.CHANNEL_TILES)
    assert (wide.block_n, narrow.block_n) == (256, 128)
    assert gemm_sm90.channel_config(4096, 4096, 132) == wide  # 512 vs 1024 tiles: 4 waves x 1.76 < 8 waves
    assert gemm_sm90.channel_config(1024, 4096, 132) == wide  # 128 vs 256 tiles: 1 wave x 1.76 < 2 waves
    assert gemm_sm90.channel_config(1024, 2048, 132) == narrow  # 64 vs 128 tiles: one wave each
    assert gemm_sm90.channel_config(1024, 6144, 132) == narrow  # 192 vs 384 tiles: 2 x 1.76 > 3 waves
    assert gemm_sm90.channel_config(512, 4096, 132) == narrow  # 64 vs 128 tiles


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# M from one partial tile to several waves; N ragged (576 = 4.5 blocks) and whole; K one block, ragged (192 = 1.5
# blocks: the TMA zero-fills the missing columns), long.
SM90_CASES = [(256, 4096, 4096), (333, 576, 7168), (1000, 7168, 2048), (4096, 1536, 192), (130, 2048, 128),
              (2048, 28672, 4096)]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (wgmma, TMA)")
@pytest.mark.parametrize("m,n,k", SM90_CASES)
def test_gpu_sm90_block_same_bits_as_triton(m, n, k):
    """The Gluon kernel against the Triton kernel: the same per-block int32 dots, promotions and K order, so the same
    bits, in every output dtype, with and without bias; outputs NaN-poisoned (every element written); five launches
    on fresh inputs."""
    for launch in range(5):
        seed = int.from_bytes(os.urandom(4), "little")
        args = _block_operands(m, n, k, seed)
        for out_dtype, bias in ((torch.float32, None), (torch.bfloat16, _bias(n, torch.bfloat16, seed + 1)),
                                (torch.float16, _bias(n, torch.float32, seed + 2))):
            outs = {}
            for backend in ("sm90", "triton"):
                outs[backend] = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
                int8_gemm_block(*args, bias=bias, out_dtype=out_dtype, out=outs[backend], backend=backend)
            torch.cuda.synchronize()
            what = f"M={m} N={n} K={k} {out_dtype} bias={bias is not None} launch {launch} seed {seed}"
            assert not outs["sm90"].isnan().any(), f"unwritten elements: {what}"
            assert torch.equal(outs["sm90"], outs["triton"]), (
                f"{what}: max |diff| {(outs['sm90'].float() - outs['triton'].float()).abs().max().item()}")
        if launch == 0:
            exact = ref.int8_gemm_block_ref(*args, out_dtype=torch.float32)
            y = int8_gemm_block(*args, out_dtype=torch.float32, backend="sm90")
            assert_close_rel(y, exact, FP32_TOL, f"sm90 vs reference M={m} N={n} K={k}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (wgmma, TMA)")
@pytest.mark.parametrize("m,n,k", SM90_CASES)
def test_gpu_sm90_channel_same_bits_as_triton(m, n, k):
    """The Gluon channel kernel, at each of its tiles and at the one channel_config picks, against the Triton kernel:
    the same exact int32 sums and the same epilogue, so the same bits, in every output dtype, with and without bias;
    outputs NaN-poisoned; three launches on fresh inputs; and the reference (int32-exact sums) at fp32."""
    from ingot.kernels import gemm_sm90

    tiles = [None] + [cfg for cfg, _ in gemm_sm90.CHANNEL_TILES]
    for launch in range(3):
        seed = int.from_bytes(os.urandom(4), "little")
        args = _channel_operands(m, n, k, seed)
        for out_dtype, bias in ((torch.float32, None), (torch.bfloat16, _bias(n, torch.bfloat16, seed + 1)),
                                (torch.float16, _bias(n, torch.float32, seed + 2))):
            expected = int8_gemm_channel(*args, bias=bias, out_dtype=out_dtype, backend="triton")
            for cfg in tiles:
                y = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
                if cfg is None:
                    int8_gemm_channel(*args, bias=bias, out_dtype=out_dtype, out=y, backend="sm90")
                else:
                    gemm_sm90.int8_channel_gemm_sm90(*args, bias, out_dtype, y, cfg)
                torch.cuda.synchronize()
                what = f"M={m} N={n} K={k} {out_dtype} bias={bias is not None} tile {cfg} launch {launch} seed {seed}"
                assert not y.isnan().any(), f"unwritten elements: {what}"
                assert torch.equal(y, expected), f"{what}: max |diff| {(y.float() - expected.float()).abs().max()}"
        if launch == 0:
            y = int8_gemm_channel(*args, out_dtype=torch.float32, backend="sm90")
            assert torch.equal(y, ref.int8_gemm_channel_ref(*args, out_dtype=torch.float32)), f"M={m} N={n} K={k}"


# decode sizes for the swap-AB kernel: M from one token to a full 64-token tile (33: a ragged one); N ragged (576 =
# 9 x 64 = 4.5 x 128) and whole; K ragged (1040 = 8.125 x 128: the TMA zero-fills the rest) and long
SM90_DECODE_CASES = [(1, 4096, 4096), (5, 576, 1040), (16, 2048, 7168), (33, 7168, 2048), (64, 576, 1536)]
SM90_DECODE_TILES = [GemmConfig(16, 64, 256, group_m=1, num_stages=8, kernel="sm90"),
                     GemmConfig(64, 128, 128, group_m=1, num_stages=4, split_k=4, kernel="sm90"),
                     GemmConfig(32, 64, 256, group_m=1, num_stages=6, split_k=3, kernel="sm90"),
                     GemmConfig(64, 64, 256, group_m=1, num_stages=6, split_k=2, kernel="sm90")]


def _sm90_block_tile(cfg: GemmConfig) -> GemmConfig:
    """The block op's form of a decode tile: K steps of 256 (two 128-K scale blocks) where the tile's GROUP_K holds
    both, else of 128."""
    from ingot.kernels.tuning import skinny_block_steps_ok

    return cfg if skinny_block_steps_ok(cfg) else replace(cfg, block_k=128)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (wgmma, TMA)")
@pytest.mark.parametrize("m,n,k", SM90_DECODE_CASES)
def test_gpu_sm90_decode_kernel(m, n, k):
    """The swap-AB decode kernel at several tiles (one token tile or several, split-K 1 / 2 / 3 / 4; block-scaled K
    steps of 128 and of 256, two scale blocks each): per-channel the same bits as the Triton kernel (exact int32
    sums, the same epilogue), block-scaled within fp32 rounding of the reference (its split partials sum in another
    order); every output dtype, bias or none, NaN-poisoned outputs, three launches on fresh inputs."""
    for launch in range(3):
        seed = int.from_bytes(os.urandom(4), "little")
        channel, block = _channel_operands(m, n, k, seed), _block_operands(m, n, k, seed)
        for out_dtype, bias in ((torch.float32, None), (torch.bfloat16, _bias(n, torch.bfloat16, seed + 1)),
                                (torch.float16, _bias(n, torch.float32, seed + 2))):
            expected = int8_gemm_channel(*channel, bias=bias, out_dtype=out_dtype, backend="triton")
            exact = ref.int8_gemm_block_ref(*block, bias=bias, out_dtype=torch.float32)
            for cfg in SM90_DECODE_TILES:
                what = f"M={m} N={n} K={k} {out_dtype} bias={bias is not None} {cfg} launch {launch} seed {seed}"
                y = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
                int8_gemm_channel(*channel, bias=bias, out_dtype=out_dtype, out=y, config=cfg)
                torch.cuda.synchronize()
                assert not y.isnan().any(), f"unwritten elements: {what}"
                assert torch.equal(y, expected), f"{what}: max |diff| {(y.float() - expected.float()).abs().max()}"
                y = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
                int8_gemm_block(*block, bias=bias, out_dtype=out_dtype, out=y, config=_sm90_block_tile(cfg))
                torch.cuda.synchronize()
                assert not y.isnan().any(), f"unwritten elements (block): {what}"
                tol = FP32_TOL if out_dtype == torch.float32 else 1e-2
                assert_close_rel(y.float(), exact, tol, f"block {what}")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (wgmma, TMA)")
def test_gpu_sm90_decode_from_a_tuned_table(monkeypatch):
    """A tuned table entry of kernel "sm90" runs the decode kernel (same bits as Triton); backend "triton" or a weight
    the TMA cannot read (rows at an odd address) take the Triton default instead, without an error."""
    from ingot.kernels import tuning

    m, n, k = 16, 576, 1536
    entry = GemmConfig(16, 64, 256, group_m=1, num_stages=4, kernel="sm90")
    monkeypatch.setattr(tuning, "lookup", lambda op, n_, k_, m_, device: entry)
    from ingot.kernels import gemm_sm90

    calls = []
    real = gemm_sm90.int8_skinny_gemm_sm90
    monkeypatch.setattr(gemm_sm90, "int8_skinny_gemm_sm90", lambda *a: calls.append(a[6]) or real(*a))
    args = _channel_operands(m, n, k, 7)
    expected = int8_gemm_channel(*args, backend="triton")
    assert calls == []
    assert torch.equal(int8_gemm_channel(*args), expected) and calls == [entry]
    odd = torch.empty(n * k + 1, dtype=torch.int8, device="cuda")[1:].view(n, k)
    odd.copy_(args[2])
    assert torch.equal(int8_gemm_channel(args[0], args[1], odd, args[3]), expected) and len(calls) == 1


def test_sm90_block_wanted_rule(monkeypatch):
    """The sm_90 block kernel from M = 512 on any N, and at M 256-511 only where its 128x128 tiles give at least
    half the SMs one each (the H100 measurements behind it: gemm_sm90's comments); the SM count is read only there."""
    gemm_sm90 = pytest.importorskip("ingot.kernels.gemm_sm90")
    reads = []
    monkeypatch.setattr(gemm_sm90, "num_sms", lambda device: reads.append(device) or 132)
    cuda = torch.device("cuda", 0)
    assert gemm_sm90.block_wanted(512, 128, cuda) and gemm_sm90.block_wanted(4096, 2048, cuda)
    assert not gemm_sm90.block_wanted(255, 28672, cuda)
    assert reads == []
    assert not gemm_sm90.block_wanted(256, 4096, cuda)  # 2 x 32 = 64 tiles < 66
    assert gemm_sm90.block_wanted(256, 4224, cuda)  # 2 x 33 = 66
    assert gemm_sm90.block_wanted(256, 6144, cuda)
    assert not gemm_sm90.block_wanted(511, 2048, cuda)  # 4 x 16 = 64
    assert gemm_sm90.block_wanted(385, 2048, cuda) is False and gemm_sm90.block_wanted(385, 2176, cuda)  # 4 x 17
    assert len(reads) == 6


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (wgmma, TMA)")
@pytest.mark.parametrize("op", ["block", "channel"])
def test_gpu_sm90_auto_choice_and_refusals(monkeypatch, op):
    """"auto" takes the sm_90 kernel from its smallest M up and not below, nor with a caller's config; operands TMA
    cannot read are refused by name with backend "sm90" and run on Triton with "auto"; a kernel that raises sends
    "auto" to Triton on that device from then on."""
    from ingot.kernels import gemm_sm90

    if op == "block":  # the smallest M at which it always runs (block_wanted's own test covers 256-511)
        name, min_m, block_size, gemm = "int8_block_gemm_sm90", gemm_sm90.BLOCK_FULL_M, (128, 128), int8_gemm_block
        operands, reference = _block_operands, ref.int8_gemm_block_ref
    else:
        name, min_m, block_size, gemm = "int8_channel_gemm_sm90", gemm_sm90.CHANNEL_MIN_M, None, int8_gemm_channel
        operands, reference = _channel_operands, ref.int8_gemm_channel_ref
    calls = []
    kernel = getattr(gemm_sm90, name)
    monkeypatch.setattr(gemm_sm90, name, lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    args = operands(min_m, 1024, 1024, 1)
    assert int8_gemm.sm90_unsupported(args[0], args[2], block_size) is None
    assert int8_gemm.auto_backend(args[0], args[2], block_size) == "sm90"
    assert int8_gemm.auto_backend(args[0][:-1], args[2], block_size) == "triton"
    y = gemm(*args)
    assert len(calls) == 1
    torch.testing.assert_close(y, gemm(*args, backend="triton"), rtol=0, atol=0)
    gemm(*[a[:-1] if i in (0, 1) else a for i, a in enumerate(args)])  # M = smallest M - 1
    gemm(*args, config=GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3))
    assert len(calls) == 1
    ragged = operands(512, 256, 200, 2)  # K = 200: rows of 200 bytes are not 16-byte aligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemm(*ragged, backend="sm90")
    assert_close_rel(gemm(*ragged, out_dtype=torch.float32), reference(*ragged, out_dtype=torch.float32), FP32_TOL,
                     "auto, K = 200")
    if op == "block":
        other_block = _block_operands(512, 256, 256, 3, block_size=(64, 128))
        with pytest.raises(ValueError, match="block size"):
            int8_gemm_block(*other_block, block_size=(64, 128), backend="sm90")

    # a failing sm_90 kernel: "auto" answers from Triton, remembers the device, and takes Triton there from then on
    def broken(*a, **kw):
        raise RuntimeError("ptxas: no such instruction")

    monkeypatch.setattr(gemm_sm90, name, broken)
    monkeypatch.setattr(int8_gemm, "_sm90_failed", {})
    assert_close_rel(gemm(*args, out_dtype=torch.float32), reference(*args, out_dtype=torch.float32), FP32_TOL,
                     "auto after a failure")
    assert "ptxas: no such instruction" in int8_gemm.sm90_unsupported(args[0], args[2], block_size)
    assert int8_gemm.auto_backend(args[0], args[2], block_size) == "triton"
