"""The seam between an op that produces an activation and the W8A8 linear that reads it: ``Linear.input_quant`` (what
a linear wants), ``QuantizedActivation`` (what a producer hands it), RMSNorm's ``quant=`` and ``add_forward``, and
MLP's silu * up with ``fused_ops``. The kernel paths run in Triton's interpreter on CPU (use_kernels=True); every
fused form must give the same bits as the unfused one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ingot.formats.base import StoredLinear
from ingot.layers import linear as L
from ingot.layers.linear import ActQuant, Linear, QuantizedActivation, quantize_activation, shared_input_quant
from ingot.layers.moe import MLP
from ingot.layers.norm import RMSNorm
from ingot.quant import ref
from ingot.quant.schemes import Scheme

W8A8 = {"int8-channel": ActQuant("int8"), "int8-block": ActQuant("int8", 128), "fp8-block": ActQuant("fp8_e4m3", 128)}


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


@pytest.fixture
def native_fp8(monkeypatch):
    """Every device runs FP8: an fp8-block Linear on CPU gets Fp8BlockMethod, not the fallback."""
    monkeypatch.setattr(L, "fp8_unsupported_reason", lambda device: None)


def make_linear(kind: str, n: int, k: int, seed: int = 0, scheme: str | None = None) -> Linear:
    scheme = Scheme.from_name(scheme or kind)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    if kind == "bf16":
        w = w.bfloat16()
    qw = ref.quantize_weight(w, scheme)
    layer = Linear(k, n, kind=kind, dtype=torch.bfloat16)
    layer.load(StoredLinear(kind, qw.qweight, qw.scale, block_size=scheme.block_size, group_size=scheme.group_size))
    layer.process_weights_after_loading()
    return layer


def make_x(shape, seed=1, dtype=torch.bfloat16) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2
    x[..., 3] *= 20
    return x.to(dtype)


def make_norm(dim: int, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(dim, 1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


# ----------------------------------------------------------------------------------- Linear


def test_input_quant_per_kind(native_fp8):
    x = make_x((2, 256))
    for kind in ("bf16", "int8-weight", "int4-group", *W8A8):
        layer = make_linear(kind, 128, 256)
        want = W8A8.get(kind)
        assert layer.method.act_quant(layer) == want
        assert layer.input_quant(x) is None  # CPU input, use_kernels None: the reference path quantizes itself
        layer.method.use_kernels = True
        assert layer.input_quant(x) == want
        layer.method.use_kernels = False
        assert layer.input_quant(x) is None
    ue8m0 = make_linear("fp8-block", 128, 256, scheme="fp8-block-ue8m0")
    ue8m0.method.use_kernels = True
    assert ue8m0.input_quant(x) == ActQuant("fp8_e4m3", 128, "ue8m0")


def test_fp8_fallback_asks_for_its_inner_kind():
    layer = Linear(256, 128, kind="fp8-block", dtype=torch.bfloat16)  # CPU: re-quantized to int8-block
    assert isinstance(layer.method, L.Fp8FallbackMethod)
    layer.method.use_kernels = True
    assert layer.input_quant(make_x((1, 256))) == ActQuant("int8", 128)


@pytest.mark.parametrize("kind", list(W8A8))
@pytest.mark.parametrize("shape", [(1, 320), (33, 320), (2, 3, 320)])
def test_quantized_activation_equals_the_tensor(kind, shape, interpreter, native_fp8):
    """Linear(QuantizedActivation) is Linear(x) when the activation was quantized as the linear would: on the
    kernels (interpreted) and on the reference GEMM."""
    layer = make_linear(kind, 192, 320)
    x = make_x(shape)
    for kernels in (True, False):
        layer.method.use_kernels = kernels
        quant = W8A8[kind]
        x_q, x_s = quantize_activation(x, quant)
        got = layer(QuantizedActivation(x_q, x_s, quant, x.dtype))
        assert got.shape == (*shape[:-1], 192) and got.dtype == x.dtype
        assert torch.equal(got, layer(x)), f"use_kernels={kernels}"


def test_quantized_activation_mismatch_is_refused(native_fp8):
    x = make_x((2, 256))
    x_q, x_s = ref.quantize_act_token(x)
    qa = QuantizedActivation(x_q, x_s, ActQuant("int8"), x.dtype)
    with pytest.raises(ValueError, match="quantizes its input as ActQuant.*int8.*128"):
        make_linear("int8-block", 128, 256)(qa)
    with pytest.raises(ValueError, match="bf16 linear.*None"):
        make_linear("bf16", 128, 256)(qa)
    with pytest.raises(ValueError, match="takes K = 512"):
        make_linear("int8-channel", 128, 512)(qa)


def test_shared_input_quant():
    a, b = make_linear("int8-channel", 64, 256), make_linear("int8-channel", 32, 256)
    c = make_linear("int8-block", 64, 256)
    for lin in (a, b, c):
        lin.method.use_kernels = True
    x = make_x((1, 256))
    assert shared_input_quant(x, a, b) == ActQuant("int8")
    assert shared_input_quant(x, a, c) is None  # they disagree: the producer emits the tensor
    b.method.use_kernels = False
    assert shared_input_quant(x, a, b) is None


# ----------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_forward_cpu_is_the_unfused_code(dtype):
    norm = make_norm(100)
    norm.weight.data = norm.weight.data.to(dtype)
    x, r = make_x((5, 100), 1, dtype), make_x((5, 100), 2, dtype)
    normed, h = norm.add_forward(x, r)
    assert torch.equal(h, r + x) and torch.equal(normed, norm(r + x))
    normed, h = norm.add_forward(x, None)
    assert h is x and torch.equal(normed, norm(x))
    assert isinstance(norm(x, ActQuant("int8")), torch.Tensor)  # the torch path never quantizes


@pytest.mark.parametrize("quant", [ActQuant("int8"), ActQuant("int8", 128), ActQuant("fp8_e4m3", 128, "ue8m0")],
                         ids=["token", "int8-g128", "fp8-ue8m0"])
def test_norm_kernel_path_emits_the_linear_quantization(quant, interpreter):
    norm = make_norm(320)
    norm.use_kernels = True
    x, r = make_x((7, 320), 1), make_x((7, 320), 2)
    qa, h = norm.add_forward(x, r, quant)
    assert isinstance(qa, QuantizedActivation) and qa.quant == quant and qa.dtype == torch.bfloat16
    assert torch.equal(h, x + r)
    normed, h2 = norm.add_forward(x, r)
    assert torch.equal(h2, h)
    x_q, x_s = quantize_activation(normed, quant)
    assert torch.equal(qa.x_q.view(torch.uint8), x_q.view(torch.uint8)) and torch.equal(qa.x_s, x_s)
    qa = norm(x, quant)
    x_q, x_s = quantize_activation(norm(x), quant)
    assert torch.equal(qa.x_q.view(torch.uint8), x_q.view(torch.uint8)) and torch.equal(qa.x_s, x_s)
    # within one ulp of the torch path (the sum of squares in another order)
    norm.use_kernels = False
    diff = (normed.float() - norm(x + r).float()).abs()
    assert bool((diff <= normed.float().abs() * 2**-7).all())


# ----------------------------------------------------------------------------------- MLP


def _mlp(kind: str, hidden: int = 256, inter: int = 384) -> MLP:
    mlp = MLP("mlp", hidden, inter, lambda p, k, n, b: make_linear(kind, n, k, seed=len(p)))
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.method.use_kernels = True
    return mlp


@pytest.mark.parametrize("rows", [5, 1])
@pytest.mark.parametrize("kind", ["int8-channel", "int8-block", "bf16"])
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "gate_up"])
def test_mlp_fused_ops_keep_the_bits(kind, fuse, rows, interpreter):
    """fused_ops (silu * up quantized in its launch, decode's split rows included): the bits of the unfused MLP."""
    mlp = _mlp(kind)
    if fuse:
        mlp.fuse_projections()
    x = make_x((rows, 256))
    mlp.use_kernels = True
    mlp.fused_ops = False
    unfused = mlp(x)
    mlp.fused_ops = True
    assert torch.equal(mlp(x), unfused)
    want = W8A8.get(kind)
    assert mlp.input_quant(x) == want
    if want is not None:  # and with gate/up's input quantized by the producer too
        x_q, x_s = quantize_activation(x, want)
        assert torch.equal(mlp(QuantizedActivation(x_q, x_s, want, x.dtype)), unfused)
    # the silu * up kernel against torch's (CPU): numpy's exp vs torch's, the last bits only
    mlp.use_kernels = False
    torch_path = mlp(x)
    assert (unfused.float() - torch_path.float()).abs().max() <= 0.02 * torch_path.float().abs().max()


def test_mlp_float32_keeps_torch(interpreter):
    mlp = MLP("mlp", 64, 96, lambda p, k, n, b: Linear(k, n, kind="bf16", dtype=torch.float32))
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        with torch.no_grad():
            lin.weight.normal_(0, 0.05)
    mlp.use_kernels = mlp.fused_ops = True
    x = torch.randn(3, 64)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(mlp(x), want)
