"""ingot.layers.linear: every kind's Linear against ingot.quant.ref, the parameters it registers, the FP8 fallback,
load errors, the kernel path (Triton's interpreter on CPU, the real kernels on CUDA)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ingot.formats.base import KINDS, StoredLinear, pack_int32, unpack_int32
from ingot.layers import linear as L
from ingot.layers.linear import Linear, linear_method
from ingot.quant import fast, ref
from ingot.quant.schemes import Scheme

QUANTIZED = [k for k in KINDS if k != "bf16"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def native_fp8(monkeypatch):
    """Pretend every device runs FP8, so that an fp8-block Linear on CPU gets the real Fp8BlockMethod (its CPU
    reference math), not the fallback."""
    monkeypatch.setattr(L, "fp8_unsupported_reason", lambda device: None)


@pytest.fixture
def fresh_warning():
    """The fallback warning is once per process: forget earlier ones so that this test sees its own."""
    L._warn_fp8_fallback.cache_clear()
    yield
    L._warn_fp8_fallback.cache_clear()


def make_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, :] *= 8  # an outlier row: scales differ across rows and blocks
    return w


def make_linear(kind: str, n: int, k: int, *, bias: bool = False, seed: int = 0, scheme: Scheme | None = None,
                dtype=torch.bfloat16) -> tuple[Linear, ref.QuantizedWeight]:
    """A CPU Linear of ``kind`` loaded with a random weight quantized by the reference, and that QuantizedWeight."""
    scheme = scheme or Scheme.from_name(kind)
    w = make_weight(n, k, seed).to(dtype if kind == "bf16" else torch.float32)
    qw = ref.quantize_weight(w, scheme)
    layer = Linear(k, n, bias=bias, kind=kind, dtype=dtype)
    layer.load(StoredLinear(kind, qw.qweight, qw.scale, block_size=scheme.block_size, group_size=scheme.group_size))
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)))
    layer.process_weights_after_loading()
    return layer, qw


def make_x(shape, dtype, seed=1) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 20  # an outlier channel: activation scales matter
    return x.to(dtype)


def summation_bound(x: torch.Tensor, qw: ref.QuantizedWeight) -> torch.Tensor:
    """Elementwise bound on the float32 difference of two summation orders of y = x @ W.T: 2 K eps (|x| @ |W|.T),
    the textbook bound of a float32 dot of K terms, over the dequantized operands ([..., N])."""
    k = qw.shape[1]
    xf = x.float().reshape(-1, k).abs()
    return ((2 * k * EPS32) * (xf @ ref.dequantize_weight(qw).abs().T)).view(*x.shape[:-1], -1)


def assert_summation_close(y: torch.Tensor, r: torch.Tensor, x: torch.Tensor, qw: ref.QuantizedWeight):
    """float32 results that may differ only in summation order."""
    bound = summation_bound(x, qw) + EPS32 * r.abs()
    err = (y.float() - r.float()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, max excess {(err - bound).max().item():.3g}"


def assert_bf16_close(y: torch.Tensor, r: torch.Tensor, x: torch.Tensor, qw: ref.QuantizedWeight, ulps: int = 1):
    """bf16 outputs of float32 results that differ in summation order: at most ``ulps`` bf16 ulps apart, plus the
    summation bound (two float32 values straddling a bf16 rounding boundary round one ulp apart; near zero the
    float32 difference itself can exceed a bf16 ulp of the tiny result)."""
    assert y.dtype == r.dtype == torch.bfloat16
    bound = ulps * torch.finfo(torch.bfloat16).eps * r.float().abs() + summation_bound(x, qw)
    err = (y.float() - r.float()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, max excess {(err - bound).max().item():.3g}"


# ------------------------------------------------------------------------------ CPU apply == ref.linear


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m, n, k", [(1, 192, 576), (33, 100, 576), (222, 192, 300)])
def test_cpu_apply_equals_reference_fp32(kind, m, n, k, native_fp8):
    """float32 activations and output: every kind equals ref.linear up to float32 summation order."""
    layer, qw = make_linear(kind, n, k, bias=True, dtype=torch.float32, seed=m + n)
    x = make_x((m, k), torch.float32)
    y = layer(x)
    r = ref.linear(x, qw, layer.bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_summation_close(y, r, x, qw)
    # not vacuous: a weight off by one quantization step in one row gives another result
    assert not torch.equal(y, ref.linear(x, replace(qw, qweight=_bump(qw.qweight)), layer.bias))


def _bump(q: torch.Tensor) -> torch.Tensor:
    q = q.clone()
    if q.dtype == torch.float8_e4m3fn:
        q[1] = (q[1].float() / 2).to(torch.float8_e4m3fn)
    elif q.is_floating_point():
        q[1] = q[1] * 2
    else:
        q[1] = torch.where(q[1] > 0, q[1] - 1, q[1] + 1)
    return q


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_apply_bf16_leading_dims(kind, native_fp8):
    """bf16 activations of shape [2, 17, K]: output [2, 17, N] in bf16, within one bf16 ulp of ref.linear."""
    n, k = 100, 576
    layer, qw = make_linear(kind, n, k, bias=True)
    x = make_x((2, 17, k), torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 17, n) and y.dtype == torch.bfloat16
    assert_bf16_close(y, ref.linear(x, qw, layer.bias), x, qw)
    assert torch.equal(layer(x[1]), y[1])  # rows are independent of the batch around them


@pytest.mark.parametrize("m", [1, 33])
def test_int8_cpu_gemms_equal_the_references_bit_for_bit(m):
    """The references' chunked float32 integer dot (the CPU path of the int8 layers) is the exact integer dot, K below
    and above one 1024-column chunk, at the worst case; the GEMMs built on it equal the same math on int64 dots."""
    g = torch.Generator().manual_seed(m)
    for k in (300, 2100):
        n = 192
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        w_q[:, :] = 127  # worst case: every product 16129, partial sums far above 2^24
        x_q[0, :] = -127
        exact = (x_q.long() @ w_q.long().T).double()
        dot = ref._int8_dot_exact(x_q, w_q)
        assert dot.dtype == (torch.float32 if k <= ref.EXACT_F32_K else torch.float64)
        assert torch.equal(dot.double(), exact)
        bias = torch.randn(n, generator=g).bfloat16()
        x_s, w_s = torch.rand(m, 1, generator=g) + 0.5, torch.rand(n, 1, generator=g) + 0.5
        for out in (torch.float32, torch.bfloat16):
            expected = (exact.float() * x_s.view(-1, 1) * w_s.view(1, -1) + bias.float().view(1, -1)).to(out)
            assert torch.equal(ref.int8_gemm_channel_ref(x_q, x_s, w_q, w_s, bias, out), expected)


def test_int8_layers_use_the_scheme_activation_quantizers():
    """int8-channel quantizes per token, int8-block per 128-group: the layer equals the GEMM reference fed with
    exactly ref.quantize_act_token / quantize_act_group."""
    x = make_x((33, 576), torch.bfloat16)
    layer, qw = make_linear("int8-channel", 192, 576, bias=True)
    x_q, x_s = ref.quantize_act_token(x)
    assert torch.equal(layer(x), ref.int8_gemm_channel_ref(x_q, x_s, qw.qweight, qw.scale, layer.bias, torch.bfloat16))
    layer, qw = make_linear("int8-block", 192, 576, bias=True)
    x_q, x_s = ref.quantize_act_group(x, "int8", 128)
    assert torch.equal(layer(x), ref.int8_gemm_block_ref(x_q, x_s, qw.qweight, qw.scale, (128, 128), layer.bias,
                                                         torch.bfloat16))


def test_fp8_ue8m0_scales_are_detected(native_fp8):
    """Power-of-two weight scales (fp8-block-ue8m0) make the activations ue8m0 too; float scales keep float."""
    k = 300
    x = make_x((33, k), torch.float32)
    ue, qw_ue = make_linear("fp8-block", 192, k, dtype=torch.float32, scheme=Scheme.from_name("fp8-block-ue8m0"))
    fl, qw_fl = make_linear("fp8-block", 192, k, dtype=torch.float32)
    assert ue.act_scale_fmt == "ue8m0" and fl.act_scale_fmt == "float"
    assert_summation_close(ue(x), ref.linear(x, qw_ue), x, qw_ue)
    assert_summation_close(fl(x), ref.linear(x, qw_fl), x, qw_fl)
    # the ue8m0 activation rounding is visible: the float rule on the same weights gives other numbers
    ue.act_scale_fmt = "float"
    assert not torch.allclose(ue(x), ref.linear(x, qw_ue), rtol=0, atol=1e-6)


def test_block_size_follows_the_stored_linear():
    """A 64x64-block checkpoint: the scale grid is re-shaped at load, activations grouped by 64."""
    scheme = replace(Scheme.from_name("int8-block"), block_size=(64, 64), act_group_size=64)
    layer, qw = make_linear("int8-block", 100, 300, dtype=torch.float32, scheme=scheme)
    assert layer.block_size == (64, 64) and layer.weight_scale.shape == (2, 5)
    x = make_x((33, 300), torch.float32)
    assert_summation_close(layer(x), ref.linear(x, qw), x, qw)


def test_empty_batch():
    layer, _ = make_linear("int8-block", 100, 300)
    assert layer(torch.zeros(0, 300, dtype=torch.bfloat16)).shape == (0, 100)


# ------------------------------------------------------------------------------ parameters and state dicts

EXPECTED_PARAMS = {
    "bf16": {"weight": (torch.bfloat16, (192, 300))},
    "int8-channel": {"weight": (torch.int8, (192, 300)), "weight_scale": (torch.float32, (192, 1))},
    "int8-block": {"weight": (torch.int8, (192, 300)), "weight_scale": (torch.float32, (2, 3))},
    "fp8-block": {"weight": (torch.float8_e4m3fn, (192, 300)), "weight_scale": (torch.float32, (2, 3))},
    "int8-weight": {"weight": (torch.int8, (192, 300)), "weight_scale": (torch.float32, (192, 1))},
    "int4-group": {"weight_packed": (torch.int32, (192, 38)), "weight_scale": (torch.float32, (192, 3))},
}


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_named_as_on_disk(kind, native_fp8):
    layer = Linear(300, 192, bias=True, kind=kind)
    expected = dict(EXPECTED_PARAMS[kind], bias=(torch.bfloat16, (192,)))
    got = {name: (p.dtype, tuple(p.shape)) for name, p in layer.named_parameters()}
    assert got == expected
    assert set(layer.state_dict()) == set(expected)
    assert layer.kind == kind and not any(p.requires_grad for p in layer.parameters())
    assert set(Linear(300, 192, kind=kind).state_dict()) == set(EXPECTED_PARAMS[kind])  # no bias: no entry


def test_bf16_linear_loads_an_nn_linear_state_dict():
    ref_layer = nn.Linear(300, 100, bias=True, dtype=torch.bfloat16)
    layer = Linear(300, 100, bias=True)
    layer.load_state_dict(ref_layer.state_dict())
    x = make_x((5, 300), torch.bfloat16)
    assert torch.equal(layer(x), ref_layer(x))


def test_int4_weight_is_packed_in_the_compressed_tensors_layout():
    layer, qw = make_linear("int4-group", 100, 300)
    assert torch.equal(layer.weight_packed, pack_int32(qw.qweight, 4))
    assert torch.equal(unpack_int32(layer.weight_packed, 4, 300), qw.qweight)
    assert torch.equal(layer.weight_scale, qw.scale)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_weight_is_the_reference_dequantization(kind, native_fp8):
    layer, qw = make_linear(kind, 192, 300, dtype=torch.float32)
    w = L.dequantized_weight(layer)
    assert w.dtype == torch.float32 and w.shape == (192, 300)
    assert torch.equal(w, ref.dequantize_weight(qw))
    assert torch.equal(L.dequantized_weight(layer, torch.bfloat16), ref.dequantize_weight(qw, torch.bfloat16))


def test_dequantized_weight_of_an_fp8_fallback_is_its_int8_weight(fresh_warning):
    fp8 = ref.quantize_weight(make_weight(100, 300, 5), Scheme.from_name("fp8-block"))
    layer = Linear(300, 100, kind="fp8-block", device="cpu")
    layer.load(StoredLinear("fp8-block", fp8.qweight, fp8.scale))
    int8 = ref.QuantizedWeight(Scheme.from_name("int8-block"), layer.weight, layer.weight_scale)
    assert torch.equal(L.dequantized_weight(layer), ref.dequantize_weight(int8))


# ------------------------------------------------------------------------------------------- fp8 fallback


def test_fp8_on_cpu_falls_back_to_int8_block_with_one_log_line(caplog, fresh_warning):
    n, k = 192, 300
    w = make_weight(n, k, 3)
    fp8 = ref.quantize_weight(w, Scheme.from_name("fp8-block"))
    with caplog.at_level(logging.WARNING, logger="ingot"):
        layers = [Linear(k, n, kind="fp8-block", device="cpu") for _ in range(5)]
    records = [r for r in caplog.records if r.name == "ingot"]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert "int8-block" in msg and "cpu" in msg and "fp8" in msg
    layer = layers[0]
    assert isinstance(layer.method, L.Fp8FallbackMethod) and layer.kind == "int8-block"
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (2, 3)
    layer.load(StoredLinear("fp8-block", fp8.qweight, fp8.scale))
    layer.process_weights_after_loading()
    # the int8 weight is the reference re-quantization of the fp8 blocks, and the layer computes with it
    int8 = Scheme.from_name("int8-block")
    expected, _ = fast.requantize_ref(fp8.qweight, fp8.scale, (128, 128), int8)
    assert torch.equal(layer.weight, expected.qweight) and torch.equal(layer.weight_scale, expected.scale)
    x = make_x((33, k), torch.bfloat16)
    assert_bf16_close(layer(x), ref.linear(x, expected), x, expected)
    # and close to the fp8 model itself: measured 26.8 dB here, where the outlier activation channel (20x) and
    # weight row (8x) coarsen the int8 activation groups and weight blocks; a wrong block mapping gives < 10 dB
    assert ref.snr_db(ref.linear(x.float(), fp8), layer(x.float())) > 20


def test_fp8_fallback_to_bf16(caplog, fresh_warning):
    n, k = 100, 300
    fp8 = ref.quantize_weight(make_weight(n, k, 4), Scheme.from_name("fp8-block"))
    with caplog.at_level(logging.WARNING, logger="ingot"):
        layer = Linear(k, n, bias=True, kind="fp8-block", device="cpu", fp8_fallback="bf16")
    assert "bf16" in caplog.records[0].getMessage()
    assert layer.kind == "bf16" and layer.weight.dtype == torch.bfloat16
    layer.load(StoredLinear("fp8-block", fp8.qweight, fp8.scale))
    assert torch.equal(layer.weight, ref.dequantize_weight(fp8, torch.bfloat16))


def test_fp8_fallback_decision_follows_the_gpu_capability(monkeypatch, caplog, fresh_warning):
    """A100 (8.0) falls back, naming the GPU and its capability; H100 (9.0) and Ada (8.9) run FP8. No CUDA needed:
    the device query is replaced, and methods are only chosen, not allocated."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(L, "cuda_device_info", lambda device: ("NVIDIA A100-SXM4-80GB", (8, 0)))
    with caplog.at_level(logging.WARNING, logger="ingot"):
        methods = [linear_method("fp8-block", cuda) for _ in range(3)]
    assert all(isinstance(m, L.Fp8FallbackMethod) and m.kind == "int8-block" for m in methods)
    assert len(caplog.records) == 1
    assert "A100" in caplog.records[0].getMessage() and "8.0" in caplog.records[0].getMessage()
    caplog.clear()
    for capability in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(L, "cuda_device_info", lambda device, c=capability: ("GPU", c))
        with caplog.at_level(logging.WARNING, logger="ingot"):
            method = linear_method("fp8-block", cuda)
        assert type(method) is L.Fp8BlockMethod and method.kind == "fp8-block"
    assert not caplog.records
    assert type(linear_method("int8-block", "cpu")) is L.Int8BlockMethod  # other kinds never fall back


def test_fp8_fallback_loads_only_fp8(fresh_warning):
    layer = Linear(300, 100, kind="fp8-block", device="cpu")
    qw = ref.quantize_weight(make_weight(100, 300, 0), Scheme.from_name("int8-block"))
    with pytest.raises(ValueError, match="cannot load a int8-block linear into a layer built for fp8-block"):
        layer.load(StoredLinear("int8-block", qw.qweight, qw.scale))


# ------------------------------------------------------------------------------------------- bad input


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown linear kind 'int3'"):
        Linear(8, 8, kind="int3")
    with pytest.raises(ValueError, match="fp8_fallback 'fp16'"):
        Linear(8, 8, kind="fp8-block", fp8_fallback="fp16")


@pytest.mark.parametrize("kind", QUANTIZED)
def test_load_rejects_wrong_shapes(kind, native_fp8):
    scheme = Scheme.from_name(kind)
    qw = ref.quantize_weight(make_weight(100, 300, 0), scheme)
    layer = Linear(300, 192, kind=kind)
    with pytest.raises(ValueError, match=r"weight: shape \(100, 300\) does not fit .* \[192, 300\]"):
        layer.load(StoredLinear(kind, qw.qweight, qw.scale))
    good = ref.quantize_weight(make_weight(192, 300, 0), scheme)
    bad_scale = torch.ones(good.scale.shape[0] + 1, good.scale.shape[1])
    with pytest.raises(ValueError, match=rf"weight_scale: shape {tuple(bad_scale.shape)}".replace("(", r"\(").replace(")", r"\)")):
        layer.load(StoredLinear(kind, good.qweight, bad_scale))
    with pytest.raises(ValueError, match="needs a scale"):
        layer.load(StoredLinear(kind, good.qweight, None))
    with pytest.raises(ValueError, match="cannot load a bf16 linear"):
        layer.load(StoredLinear("bf16", good.qweight.float(), None))


def test_load_rejects_wrong_dtypes_and_ranges():
    layer = Linear(300, 100, kind="int8-channel")
    with pytest.raises(ValueError, match="weight: dtype torch.float32, a int8-channel linear expects torch.int8"):
        layer.load(StoredLinear("int8-channel", torch.zeros(100, 300), torch.ones(100, 1)))
    layer = Linear(300, 100, kind="int4-group")
    q = torch.zeros(100, 300, dtype=torch.int8)
    q[5, 7] = 9
    with pytest.raises(ValueError, match=r"values span \[0, 9\], int4 holds \[-8, 7\]"):
        layer.load(StoredLinear("int4-group", q, torch.ones(100, 3)))
    with pytest.raises(ValueError, match="group size 64"):
        layer.load(StoredLinear("int4-group", q.clamp(max=7), torch.ones(100, 5), group_size=64))
    layer = Linear(300, 100)
    with pytest.raises(ValueError, match="bf16 linear expects a float weight"):
        layer.load(StoredLinear("bf16", torch.zeros(100, 300, dtype=torch.int8), None))


def test_apply_rejects_wrong_input_width():
    layer, _ = make_linear("int8-channel", 100, 300)
    with pytest.raises(ValueError, match="input has 299 features, this linear takes K = 300"):
        layer(torch.zeros(4, 299))


# --------------------------------------------------------------------------------- kernel path, interpreter


@pytest.fixture
def interpreter():
    """The Triton kernels on CPU (TRITON_INTERPRET=1, set by tests/conftest.py), with the kernel tests' fix for the
    interpreter's run-time loop bounds (tests/kernels/conftest.py)."""
    import os

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (CPU-only run)")
    pytest.importorskip("triton")
    path = Path(__file__).resolve().parents[1] / "kernels" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_ingot_kernel_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._fix_interpreter_index()


@pytest.mark.parametrize("kind", ["int8-channel", "int8-block"])
@pytest.mark.parametrize("m", [1, 33])
def test_kernel_path_equals_cpu_path_in_the_interpreter(kind, m, interpreter):
    """use_kernels=True runs the Triton kernels (interpreted): float32 output bit-identical to the CPU path, bf16
    within one bf16 ulp (the interpreter truncates fp32 -> bf16 casts)."""
    layer, qw = make_linear(kind, 100, 576, bias=True, seed=m)
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x((m, 576), dtype)
        expected = layer(x)
        layer.method.use_kernels = True
        got = layer(x)
        layer.method.use_kernels = None
        if dtype == torch.float32:
            assert torch.equal(got, expected)
        else:
            assert_bf16_close(got, expected, x, qw)


@pytest.mark.parametrize("kind", ["int8-weight", "int4-group"])
@pytest.mark.parametrize("m", [1, 33])
def test_weight_only_kernel_path_in_the_interpreter(kind, m, interpreter):
    """use_kernels=True runs w8a16_gemm / w4a16_gemm (interpreted) on the layer's own parameters (the packed int32
    layout for int4), bf16 in and out: within one bf16 ulp of the CPU path (interpreter casts truncate)."""
    if importlib.util.find_spec("ingot.kernels.weight_only") is None:
        pytest.skip("ingot.kernels.weight_only does not exist yet (the layer runs the reference)")
    layer, qw = make_linear(kind, 100, 300, bias=True, seed=m)
    x = make_x((m, 300), torch.bfloat16)
    expected = layer(x)
    layer.method.use_kernels = True
    assert_bf16_close(layer(x), expected, x, qw)


@pytest.mark.parametrize("kind", ["int8-channel", "int8-block", "bf16", "int8-weight", "int4-group"])
@pytest.mark.parametrize("m", [1, 3])
def test_row_max_activation_gives_what_x_gives(kind, m, interpreter):
    """A RowMaxActivation (x with the maxima of its column ranges) into any linear, kernel path: the result of x
    itself. Only int8-channel at one row takes it into its GEMV (takes_row_maxima); int8-channel at 3 rows quantizes
    from the maxima first; the other kinds take x."""
    layer, _ = make_linear(kind, 100, 576, bias=True, seed=m)
    layer.method.use_kernels = True
    x = make_x((m, 576), torch.bfloat16)
    maxima = torch.stack([c.float().abs().amax(-1) for c in x.chunk(5, dim=-1)], dim=-1)
    assert layer.takes_row_maxima(x) == (kind == "int8-channel" and m == 1)
    assert torch.equal(layer(L.RowMaxActivation(x, maxima)), layer(x))
    layer.method.use_kernels = False  # the reference path takes x as well
    assert not layer.takes_row_maxima(x) and torch.equal(layer(L.RowMaxActivation(x, maxima)), layer(x))


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-block-ue8m0"])
def test_fp8_kernel_path_in_the_interpreter(scheme, interpreter, native_fp8):
    """use_kernels=True: per_token_group_quant(fp8_e4m3, the detected scale_fmt) + fp8_gemm_block, interpreted,
    against the CPU path (float32 sums of e4m3 products in another order)."""
    layer, qw = make_linear("fp8-block", 100, 300, bias=True, dtype=torch.float32, scheme=Scheme.from_name(scheme))
    x = make_x((33, 300), torch.float32)
    expected = layer(x)
    layer.method.use_kernels = True
    assert_summation_close(layer(x), expected, x, qw)


def test_fp8_quantizes_column_major_scales_for_cublas(interpreter, native_fp8, monkeypatch):
    """Where fp8_gemm_block's "auto" picks cuBLAS, the layer quantizes its input with column-major scales (the layout
    cuBLAS reads, so the GEMM need not transpose them); elsewhere row-major. The interpreter has no cuBLAS: the
    choice is forced and the GEMM it was going to run is stood in for by the Triton kernel, which reads any scale
    strides; the output must not change."""
    from ingot.kernels import fp8_gemm

    layer, qw = make_linear("fp8-block", 100, 300, bias=True, dtype=torch.float32)
    x = make_x((33, 300), torch.float32)
    layer.method.use_kernels = True
    row_major = layer(x)
    seen = []
    real = fp8_gemm.fp8_gemm_block

    def gemm(x_q, x_s, *args, **kwargs):
        seen.append(x_s.stride())
        return real(x_q, x_s, *args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(fp8_gemm, "fp8_gemm_block", gemm)
    for backend, strides in (("cublas", (1, 33)), ("triton", (3, 1))):
        monkeypatch.setattr(fp8_gemm, "auto_backend", lambda *a, b=backend, **kw: b)
        assert torch.equal(layer(x), row_major)
        assert seen.pop() == strides, f"{backend}: x_s strides"


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m, n, k", [(1, 192, 576), (33, 100, 576), (222, 192, 300), (64, 4096, 4096)])
def test_cuda_apply_matches_the_cpu_reference(kind, m, n, k, monkeypatch):
    """The kernels on the GPU against the same layer's CPU reference math, bf16 in and out."""
    scheme = Scheme.from_name(kind)
    w = make_weight(n, k, m).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    qw = ref.quantize_weight(w, scheme)
    stored = StoredLinear(kind, qw.qweight, qw.scale)
    gpu = Linear(k, n, bias=True, kind=kind, device="cuda")
    with monkeypatch.context() as patch:
        if gpu.kind == "fp8-block":  # an FP8 GPU: the CPU twin runs the fp8 math too, not the fallback
            patch.setattr(L, "fp8_unsupported_reason", lambda device: None)
        cpu = Linear(k, n, bias=True, kind=kind, device="cpu")
    assert type(cpu.method) is type(gpu.method)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).bfloat16()
    for layer in (gpu, cpu):
        layer.load(stored)
        with torch.no_grad():
            layer.bias.copy_(bias)
        layer.process_weights_after_loading()
    x = make_x((m, k), torch.bfloat16)
    y = gpu(x.cuda()).cpu()
    r = cpu(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ref.snr_db(r, y) > 40, f"SNR {ref.snr_db(r, y):.1f} dB"
    torch.testing.assert_close(y.float(), r.float(), rtol=2**-7, atol=2**-7 * r.float().abs().max().item())


@pytest.mark.gpu
def test_cuda_fp8_native_or_fallback_by_capability():
    capability = torch.cuda.get_device_capability()
    layer = Linear(256, 256, kind="fp8-block", device="cuda")
    expected = "fp8-block" if capability >= (8, 9) else "int8-block"
    assert layer.kind == expected, (torch.cuda.get_device_name(), capability)


# ------------------------------------------------------------------------------------------------ fusion


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_equals_its_parts(kind, bias, native_fp8):
    """q/k/v-style fusion: one Linear over the concatenated parameters computes exactly the parts' outputs side by
    side (same activation quantization of the shared input, per-row weights and scales)."""
    parts = [make_linear(kind, n, 256, bias=bias, seed=s)[0] for s, n in enumerate((256, 128, 384))]
    fused = L.fuse_linears(parts)
    assert fused is not None and fused.kind == kind and fused.out_features == 768
    for name, p in fused.named_parameters():
        assert p.shape[0] == sum(getattr(q, name).shape[0] for q in parts), name
    x = make_x((5, 256), torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_fused_fp8_fallback_keeps_its_layout(fresh_warning):
    parts = [make_linear("fp8-block", 128, 256, seed=s)[0] for s in range(2)]  # CPU: int8-block fallback layouts
    fused = L.fuse_linears(parts)
    assert isinstance(fused.method, L.Fp8FallbackMethod) and fused.kind == "int8-block"
    x = make_x((3, 256), torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_fusion_refuses_what_cannot_share_a_launch(native_fp8):
    a = make_linear("int8-block", 192, 256)[0]  # 192 rows end inside the second 128-row block
    b = make_linear("int8-block", 128, 256, seed=1)[0]
    assert L.fuse_linears([a, b]) is None
    assert L.fuse_linears([b, a]) is not None  # a ragged *last* part is fine
    assert L.fuse_linears([b, make_linear("int8-channel", 128, 256)[0]]) is None  # kinds differ
    assert L.fuse_linears([b, make_linear("int8-block", 128, 256, bias=True)[0]]) is None  # bias on one only
    assert L.fuse_linears([b, make_linear("int8-block", 128, 384)[0]]) is None  # inputs differ
    assert L.fuse_linears([b]) is None
