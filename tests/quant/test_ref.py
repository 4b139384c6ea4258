"""Properties of the reference quantizers (ingot.quant.ref), for every scheme preset.

The expectations here are computed independently of ref.py's tiling code: per-tile amax by scatter over an index
map of the scale grid, scales broadcast back by indexing, and the error bounds from the number formats themselves
(FORMATS.md "Rounding": round half to even, +-127 / [-8, 7], scale = amax / QMAX, zero blocks give scale 0).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingot.quant import ref
from ingot.quant.ref import NonFiniteError, QuantizedWeight
from ingot.quant.schemes import PRESETS, QMAX, Scheme

QUANTIZED = [name for name, s in PRESETS.items() if s.is_quantized]
ALL = list(PRESETS)
# Ragged sizes on purpose: 1, 129, 192, 300, 576 are not multiples of 128 (576 = 4.5 blocks, DeepSeek's kv_a rank).
DIMS = [1, 7, 128, 129, 192, 256, 300, 576]
PATTERNS = ["gauss", "zeros", "zero_blocks", "outlier", "huge", "tiny", "mixed", "extremes"]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------- helpers


def tile_of(scheme: Scheme, n: int, k: int) -> tuple[int, int]:
    """Rows x cols sharing one scale, straight from the granularity's definition."""
    if scheme.granularity == "block":
        return scheme.block_size
    if scheme.granularity == "channel":
        return (1, k)
    return (1, scheme.group_size)


def expected_grid(scheme: Scheme, n: int, k: int) -> tuple[int, int]:
    bn, bk = tile_of(scheme, n, k)
    return (cdiv(n, bn), cdiv(k, bk))


def tile_index(scheme: Scheme, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each element's scale: (N, 1) and (1, K) index tensors."""
    bn, bk = tile_of(scheme, n, k)
    return (torch.arange(n) // bn)[:, None], (torch.arange(k) // bk)[None, :]


def amax_grid(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Per-tile max |w| by scatter-reduce (no padding, no reshapes): float32 [grid]."""
    n, k = w.shape
    gr, gc = expected_grid(scheme, n, k)
    ri, ci = tile_index(scheme, n, k)
    flat = (ri * gc + ci).expand(n, k).reshape(-1)
    out = torch.zeros(gr * gc, dtype=torch.float32)
    out.scatter_reduce_(0, flat, w.float().abs().reshape(-1), reduce="amax", include_self=True)
    return out.view(gr, gc)


def per_element(grid: torch.Tensor, scheme: Scheme, n: int, k: int) -> torch.Tensor:
    """Broadcast a scale grid to [N, K] by indexing."""
    ri, ci = tile_index(scheme, n, k)
    return grid.float()[ri, ci]


def make_weight(seed: int, n: int, k: int, pattern: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if pattern == "zeros":
        return torch.zeros(n, k)
    if pattern == "zero_blocks":  # zero every other 128x128 block and every other 128-column group of row 0
        for i in range(0, cdiv(n, 128), 2):
            for j in range(0, cdiv(k, 128)):
                if (i + j) % 2 == 0:
                    w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = 0
        w[0, :] = 0
        return w
    if pattern == "outlier":  # one huge value per matrix, in some block
        i = int(torch.randint(n, (1,), generator=g))
        j = int(torch.randint(k, (1,), generator=g))
        w[i, j] = 1e4 * (1 if seed % 2 else -1)
        return w
    if pattern == "huge":
        return w * 1e30
    if pattern == "tiny":
        return w * 1e-30
    if pattern == "mixed":  # magnitudes spread over 1e-30 .. 1e30 inside every block
        exp = torch.rand(n, k, generator=g) * 60 - 30
        return torch.sign(w) * torch.pow(10.0, exp)
    if pattern == "extremes":  # exactly +-1e30 and +-1e-30, mixed
        pick = torch.rand(n, k, generator=g) < 0.5
        return torch.where(pick, torch.full_like(w, 1e30), torch.full_like(w, 1e-30)) * torch.sign(w)
    return w


weights = st.tuples(
    st.integers(0, 2**31 - 1), st.sampled_from(DIMS), st.sampled_from(DIMS), st.sampled_from(PATTERNS)
)


def check_quantized(w: torch.Tensor, scheme: Scheme, qw: QuantizedWeight, scale_ref: torch.Tensor | None = None) -> None:
    """Every property of one quantized weight. scale_ref: the float32 scale the stored one must round up from."""
    n, k = w.shape
    q, s = qw.qweight, qw.scale
    assert q.shape == (n, k)
    assert tuple(s.shape) == ref.scale_shape(scheme, n, k) == expected_grid(scheme, n, k)
    amax = amax_grid(w, scheme)
    if scale_ref is None:  # float32 scales: exact rule
        assert s.dtype == torch.float32
        if scheme.scale_fmt == "ue8m0":
            lo = amax / QMAX["fp8_e4m3"]
            pos = amax > 0
            assert torch.equal(s[~pos], torch.zeros_like(s[~pos]))
            mant, _ = torch.frexp(s[pos])
            assert (mant == 0.5).all(), "ue8m0 scales must be powers of two"
            assert (s[pos] >= lo[pos]).all() and (s[pos] < 2 * lo[pos]).all()
        else:
            assert torch.equal(s, amax / QMAX[scheme.weight]), "scale must be exactly amax / QMAX in float32"
    else:
        assert torch.equal(s.float() >= scale_ref, torch.ones_like(scale_ref, dtype=torch.bool))
        # rounded *up* to the nearest representable: the next smaller value would be below the float32 scale
        below = torch.nextafter(s, torch.full_like(s, -math.inf)).float()
        assert ((s.float() == scale_ref) | (below < scale_ref)).all()
    s_el = per_element(s, scheme, n, k)
    deq = ref.dequantize_weight(qw)
    assert deq.dtype == torch.float32 and deq.shape == (n, k)
    assert not torch.isnan(deq).any() and torch.isfinite(deq).all()
    # all-zero tiles: scale exactly 0, dequantized exactly 0
    zero_tiles = amax == 0
    assert torch.equal(s.float()[zero_tiles], torch.zeros(int(zero_tiles.sum())))
    zero_el = per_element(zero_tiles.float(), scheme, n, k) > 0
    assert (deq[zero_el] == 0).all()
    err = (w.float() - deq).abs()
    wa = w.float().abs()
    if scheme.weight == "fp8_e4m3":
        assert q.dtype == torch.float8_e4m3fn
        qf = q.float()
        assert torch.isfinite(qf).all() and (qf.abs() <= 448).all()
        # 3 mantissa bits: half an ulp is <= 2^-4 of a normal value; subnormals (below 2^-6) step by 2^-9.
        bound = 2.0**-4 * wa + s_el * 2.0**-9 + 2.0**-20 * wa
    else:
        assert q.dtype == torch.int8
        lo, hi = (-127, 127) if scheme.weight == "int8" else (-8, 7)
        assert int(q.min()) >= lo and int(q.max()) <= hi
        if scheme.weight == "int8":
            assert not (q == -128).any()
        bound = s_el / 2 * (1 + 2.0**-16) + 2.0**-20 * wa
    bad = err > bound
    assert not bad.any(), (
        f"{scheme.name}: {int(bad.sum())} elements out of bound, e.g. w={w[bad][0].item()!r} "
        f"deq={deq[bad][0].item()!r} scale={s_el[bad][0].item()!r}"
    )


# -------------------------------------------------------------------------------- weight quantizers


@pytest.mark.parametrize("name", QUANTIZED)
@SETTINGS
@given(case=weights)
def test_quantize_weight_properties(name, case):
    seed, n, k, pattern = case
    scheme = PRESETS[name]
    w = make_weight(seed, n, k, pattern)
    check_quantized(w, scheme, ref.quantize_weight(w, scheme, name="w"))


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_weight_input_dtypes(name, dtype):
    scheme = PRESETS[name]
    w = torch.randn(300, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    qw = ref.quantize_weight(w, scheme)
    check_quantized(w.float(), scheme, qw)
    assert torch.equal(qw.qweight, ref.quantize_weight(w.float(), scheme).qweight)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("n,k", [(1, 1), (129, 1), (1, 300), (576, 192)])
def test_all_zero_weight(name, n, k):
    scheme = PRESETS[name]
    qw = ref.quantize_weight(torch.zeros(n, k), scheme)
    assert torch.equal(qw.scale, torch.zeros(expected_grid(scheme, n, k)))
    assert (qw.qweight.float() == 0).all()
    deq = ref.dequantize_weight(qw)
    assert not torch.isnan(deq).any() and (deq == 0).all()


@pytest.mark.parametrize("name", QUANTIZED)
def test_single_outlier_only_moves_its_own_tile(name):
    """A huge value inflates only the scale of the tile that holds it; other tiles keep their fine scales."""
    scheme = PRESETS[name]
    n, k = 300, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    base = ref.quantize_weight(w, scheme)
    w2 = w.clone()
    w2[200, 450] = 1e6
    qw = ref.quantize_weight(w2, scheme)
    check_quantized(w2, scheme, qw)
    changed = qw.scale != base.scale
    bn, bk = tile_of(scheme, n, k)
    expected = torch.zeros_like(changed)
    expected[200 // bn, 450 // bk] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("name", QUANTIZED)
def test_scale_shape(name):
    scheme = PRESETS[name]
    for n, k in [(576, 192), (1, 1), (129, 300), (7168, 576), (256, 128)]:
        got = ref.scale_shape(scheme, n, k)
        want = {
            "block": (cdiv(n, 128), cdiv(k, 128)),
            "channel": (n, 1),
            "group": (n, cdiv(k, 128)),
        }[scheme.granularity]
        assert got == want


def test_bf16_is_identity():
    scheme = PRESETS["bf16"]
    assert ref.scale_shape(scheme, 3, 4) is None
    w = torch.randn(129, 300).to(torch.bfloat16)
    qw = ref.quantize_weight(w, scheme)
    assert qw.scale is None and torch.equal(qw.qweight, w)
    assert torch.equal(ref.dequantize_weight(qw, torch.bfloat16), w)


# -------------------------------------------------------------------------------- rounding


def test_int8_round_half_to_even():
    # amax 127 -> scale exactly 1.0, so w / s is exactly the constructed k + 0.5
    vals = [127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -126.5, -127.0]
    want = [127, 0, 2, 2, 4, 0, -2, -2, 126, -126, -127]
    for name in ("int8-block", "int8-channel", "int8-weight"):
        qw = ref.quantize_weight(torch.tensor([vals]), PRESETS[name])
        assert qw.scale.flatten()[0].item() == 1.0
        assert qw.qweight.flatten().tolist() == want, name


def test_int8_halves_at_other_scales():
    """k + 0.5 with a non-unit power-of-two scale (exact in float32): amax 254 -> s = 2."""
    w = torch.tensor([[254.0, 1.0, 3.0, 5.0, -7.0]])  # w / s = 127, 0.5, 1.5, 2.5, -3.5
    qw = ref.quantize_weight(w, PRESETS["int8-channel"])
    assert qw.scale.item() == 2.0
    assert qw.qweight.tolist() == [[127, 0, 2, 2, -4]]


def test_int4_round_half_to_even_and_range():
    # amax 7.5 -> scale 1.0: -7.5 -> -8 (even), +7.5 -> 8 (even) clamped to 7
    vals = [7.5, -7.5, 0.5, 1.5, 2.5, -3.5, 6.5, -6.5]
    qw = ref.quantize_weight(torch.tensor([vals]), PRESETS["int4-group"])
    assert qw.scale.item() == 1.0
    assert qw.qweight.tolist() == [[7, -8, 0, 2, 2, -4, 6, -6]]


@pytest.mark.parametrize("name", ["fp8-block", "fp8-block-ue8m0"])
def test_fp8_round_half_to_even(name):
    # amax 448 -> scale exactly 1 (also a power of two). In [1, 2) e4m3 steps by 1/8; in [2, 4) by 1/4.
    vals = [448.0, 1.0625, 1.1875, 2.125, 2.375, -1.0625, -1.1875, 0.0]
    want = [448.0, 1.0, 1.25, 2.0, 2.5, -1.0, -1.25, 0.0]
    qw = ref.quantize_weight(torch.tensor([vals]), PRESETS[name])
    assert qw.scale.item() == 1.0
    assert qw.qweight.float().tolist() == [want]


def test_int8_never_minus_128():
    w = torch.randn(64, 300)
    w[:, 0] = -w.abs().amax(dim=1) * 1.0  # the row's amax is negative: -amax / s == -127, never -128
    for name in ("int8-block", "int8-channel", "int8-weight"):
        q = ref.quantize_weight(w, PRESETS[name]).qweight
        assert int(q.min()) == -127


# -------------------------------------------------------------------------------- scale dtypes


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=8, deadline=None)
@given(case=st.tuples(st.integers(0, 2**31 - 1), st.sampled_from(DIMS), st.sampled_from(DIMS)),
       mag=st.sampled_from([1e-3, 1.0, 37.0, 3000.0]))
def test_scale_dtype_rounds_up(name, scale_dtype, case, mag):
    seed, n, k = case
    scheme = PRESETS[name]
    w = make_weight(seed, n, k, "gauss") * mag
    s32 = ref.quantize_weight(w, scheme).scale
    qw = ref.quantize_weight(w, scheme, scale_dtype=scale_dtype, name="w")
    assert qw.scale.dtype == scale_dtype
    check_quantized(w, scheme, qw, scale_ref=s32)
    # q was made with the stored scale (not the float32 one): it is the reference quantization under it
    s_el = per_element(qw.scale, scheme, n, k)
    x = w / torch.where(s_el > 0, s_el, torch.ones_like(s_el))
    slack = 1 + 2.0**-20  # amax / s may exceed QMAX by float32 rounding of amax / QMAX; the clamp absorbs it
    if scheme.weight == "fp8_e4m3":
        assert (x.abs() <= 448 * slack).all()
        assert torch.equal(qw.qweight.float(), x.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    else:
        hi = 127 if scheme.weight == "int8" else 7.5
        assert (x.abs() <= hi * slack).all()
        lo, top = (-127, 127) if scheme.weight == "int8" else (-8, 7)
        assert torch.equal(qw.qweight, x.round().clamp(lo, top).to(torch.int8))


def test_fp16_scale_overflow_is_refused():
    """GPTQ stores fp16 scales (max 65504): a weight whose scale does not fit is an error, never an inf scale."""
    w = torch.full((8, 128), 1e30)
    with pytest.raises(NonFiniteError, match="layers.0.mlp.up_proj"):
        ref.quantize_weight(w, PRESETS["int4-group"], scale_dtype=torch.float16, name="layers.0.mlp.up_proj")


# -------------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@settings(max_examples=4, deadline=None)
@given(case=st.tuples(st.integers(0, 2**31 - 1), st.sampled_from(DIMS), st.sampled_from(DIMS)))
def test_non_finite_raises_naming_tensor(name, bad, case):
    seed, n, k = case
    w = make_weight(seed, n, k, "gauss")
    g = torch.Generator().manual_seed(seed)
    w[int(torch.randint(n, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))] = bad
    tensor = "model.layers.7.self_attn.q_proj.weight"
    with pytest.raises(NonFiniteError) as info:
        ref.quantize_weight(w, PRESETS[name], name=tensor)
    assert tensor in str(info.value)


def test_dequantize_refuses_wrong_scale_shape():
    scheme = PRESETS["int8-block"]
    qw = ref.quantize_weight(torch.randn(300, 192), scheme)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        ref.dequantize_weight(QuantizedWeight(scheme, qw.qweight, qw.scale[:2]))


# -------------------------------------------------------------------------------- activations

ACT_SHAPES = [(1, 192), (33, 300), (5, 129), (2, 3, 576), (4, 1), (222, 128)]


def _act(seed: int, shape, pattern: str) -> torch.Tensor:
    k = shape[-1]
    m = math.prod(shape[:-1])
    return make_weight(seed, m, k, pattern).view(*shape)


@pytest.mark.parametrize("weight,scale_fmt", [("int8", "float"), ("fp8_e4m3", "float"), ("fp8_e4m3", "ue8m0")])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(ACT_SHAPES), pattern=st.sampled_from(PATTERNS))
def test_act_group_round_trip(weight, scale_fmt, seed, shape, pattern):
    x = _act(seed, shape, pattern)
    x_q, x_s = ref.quantize_act_group(x, weight, 128, scale_fmt)
    k = shape[-1]
    assert x_q.shape == x.shape and x_q.dtype == (torch.int8 if weight == "int8" else torch.float8_e4m3fn)
    assert x_s.shape == (*shape[:-1], cdiv(k, 128)) and x_s.dtype == torch.float32
    # the same as the weight quantizer over [tokens, K] with group granularity: all its properties hold
    scheme = Scheme("act", weight=weight, granularity="group", group_size=128, scale_fmt=scale_fmt)
    x2 = x.reshape(-1, k)
    qw = QuantizedWeight(scheme, x_q.reshape(-1, k), x_s.reshape(-1, cdiv(k, 128)))
    check_quantized(x2, scheme, qw)
    # dequantize_act is the inverse the engine uses: identical to the weight dequantizer
    deq = ref.dequantize_act(x_q, x_s, 128)
    assert deq.shape == x.shape
    assert torch.equal(deq.reshape(-1, k), ref.dequantize_weight(qw))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(ACT_SHAPES), pattern=st.sampled_from(PATTERNS))
def test_act_token_round_trip(seed, shape, pattern):
    x = _act(seed, shape, pattern)
    x_q, x_s = ref.quantize_act_token(x)
    k = shape[-1]
    assert x_q.shape == x.shape and x_q.dtype == torch.int8
    assert x_s.shape == (*shape[:-1], 1) and x_s.dtype == torch.float32
    scheme = Scheme("act", weight="int8", granularity="channel")
    qw = QuantizedWeight(scheme, x_q.reshape(-1, k), x_s.reshape(-1, 1))
    check_quantized(x.reshape(-1, k), scheme, qw)
    deq = ref.dequantize_act(x_q, x_s)
    assert torch.equal(deq.reshape(-1, k), ref.dequantize_weight(qw))


def test_dequantize_act_ragged_groups():
    """K = 300 in groups of 128 has 3 scales; the third group is 44 wide (not cdiv(300, 3) = 100)."""
    x_q = torch.ones(1, 300, dtype=torch.int8)
    x_s = torch.tensor([[1.0, 2.0, 4.0]])
    deq = ref.dequantize_act(x_q, x_s, 128)
    assert deq[0, :128].eq(1).all() and deq[0, 128:256].eq(2).all() and deq[0, 256:].eq(4).all()


# -------------------------------------------------------------------------------- reference matmul

# Relative Frobenius error of ref.linear against x @ w.T on Gaussian data, measured over these shapes x 5 seeds:
# bf16 0 (float32 in and out), int8-weight <= 0.008, int8-channel <= 0.012, int8-block <= 0.013, fp8 <= 0.042,
# int4-group <= 0.128. The bounds leave 1.5-2x margin.
LINEAR_BOUND = {
    "bf16": 1e-6,
    "int8-block": 0.02,
    "int8-channel": 0.02,
    "int8-weight": 0.02,
    "fp8-block": 0.08,
    "fp8-block-ue8m0": 0.08,
    "int4-group": 0.25,
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("x_shape,n", [((33, 300), 192), ((2, 3, 192), 576), ((1, 129), 64), ((222, 576), 300)])
def test_linear_close_to_float_matmul(name, x_shape, n):
    scheme = PRESETS[name]
    g = torch.Generator().manual_seed(zlib.crc32(repr((name, x_shape, n)).encode()))
    k = x_shape[-1]
    x = torch.randn(*x_shape, generator=g)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    qw = ref.quantize_weight(w, scheme)
    y = ref.linear(x, qw, bias)
    assert y.shape == (*x_shape[:-1], n) and y.dtype == x.dtype
    exact = x @ w.T + bias
    rel = ((y - exact).norm() / exact.norm()).item()
    assert rel < LINEAR_BOUND[name], f"{name}: relative error {rel:.4f}"
    # and it is exactly act-dequant @ weight-dequant (the math a kernel must reproduce)
    if scheme.activation == "group":
        xf = ref.dequantize_act(*ref.quantize_act_group(x, scheme.weight, 128, scheme.scale_fmt), 128)
    elif scheme.activation == "token":
        xf = ref.dequantize_act(*ref.quantize_act_token(x))
    else:
        xf = x
    torch.testing.assert_close(y, xf @ ref.dequantize_weight(qw).T + bias, rtol=1e-5, atol=1e-5)


def test_linear_bf16_input_keeps_dtype():
    x = torch.randn(4, 300).to(torch.bfloat16)
    w = torch.randn(192, 300)
    for name in ALL:
        y = ref.linear(x, ref.quantize_weight(w, PRESETS[name]))
        assert y.dtype == torch.bfloat16 and y.shape == (4, 192)


def test_fp8_block_gemm_ref_takes_each_block_dot_exactly():
    """fp8_gemm_block_ref: each 128-column block's e4m3 dot is exact (float64), rounded once to float32, scaled and
    summed in float32 in K order - the int8 block reference's float32 shortcut must not reach fp8 operands (a float32
    fp8 dot rounds, off by up to 2^-7 here)."""
    g = torch.Generator().manual_seed(5)
    m, n, k, bn, bk = 33, 256, 640, 128, 128
    x = (torch.randn(m, k, generator=g) * 50).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=g) * 50).to(torch.float8_e4m3fn)
    x_s, w_s = torch.rand(m, k // bk, generator=g), torch.rand(n // bn, k // bk, generator=g)
    ws = w_s.repeat_interleave(bn, dim=0)
    expected = torch.zeros(m, n)
    for kb in range(k // bk):
        cols = slice(kb * bk, (kb + 1) * bk)
        dot = (x[:, cols].double() @ w[:, cols].double().T).float()
        expected = expected + dot * (x_s[:, kb, None] * ws[None, :, kb])
    assert torch.equal(ref.fp8_gemm_block_ref(x, x_s, w, w_s, out_dtype=torch.float32), expected)
