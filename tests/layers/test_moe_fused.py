"""The MoE layer's fused grouped-GEMM path against its per-expert loop, and the stacked expert weights behind it.

CPU: the fused path under Triton's interpreter (``use_fused=True``) equals the loop (``use_fused=False``, the experts'
own Linears on their reference math) - to fp32 summation order in float32, within bf16 rounding in bfloat16 - for
every grouped kind, E = 8, top_k = 2, T in 1, 5, 33, H = 256 / I = 128 and a ragged H = 200 / I = 96 (block kinds
pad I to 128 rows in the stack). GPU (``gpu``): DeepSeek-V3-like sizes, and the layer captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ingot.formats.base import StoredLinear
from ingot.layers import linear as L
from ingot.layers.linear import Linear
from ingot.layers.moe import MoE, MoEConfig
from ingot.quant import ref
from ingot.quant.schemes import Scheme

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KINDS = ("bf16", "int8-channel", "int8-block", "fp8-block")


@pytest.fixture
def interpreter():
    """The Triton kernels on CPU (TRITON_INTERPRET=1, set by tests/conftest.py), with the kernel tests' fix for the
    interpreter's run-time loop bounds (tests/kernels/conftest.py)."""
    import os

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (CPU-only run)")
    pytest.importorskip("triton")
    path = Path(__file__).resolve().parents[1] / "kernels" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_ingot_kernel_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._fix_interpreter_index()


@pytest.fixture
def native_fp8(monkeypatch):
    """Every device runs FP8: an fp8-block Linear on CPU gets Fp8BlockMethod (its reference math), not the fallback."""
    monkeypatch.setattr(L, "fp8_unsupported_reason", lambda device: None)


def _scheme(kind: str, block_size=(128, 128)) -> Scheme:
    scheme = Scheme.from_name(kind)
    if kind in ("int8-block", "fp8-block"):
        scheme = replace(scheme, block_size=block_size, act_group_size=block_size[1])
    return scheme


def make_moe(kind: str, hidden: int = 256, inter: int = 128, *, dtype=torch.float32, seed: int = 0, experts: int = 8,
             top_k: int = 2, block_size=(128, 128), device=DEVICE) -> MoE:
    """A MoE (one shared expert, 2 groups) whose every linear is ``kind``, random weights loaded the way the loader
    does (quantized by ref.quantize_weight, StoredLinear, Linear.load, processing), router bias random."""
    cfg = MoEConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                    num_experts_per_tok=top_k, n_shared_experts=1, n_group=2, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5)
    moe = MoE("model.layers.1.mlp", cfg, lambda p, k, n, b: Linear(k, n, b, kind=kind, device=device, dtype=dtype),
              device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    scheme = _scheme(kind, block_size)
    with torch.no_grad():
        for name, lin in moe.named_modules():
            if not isinstance(lin, Linear):
                continue
            w = torch.randn(lin.out_features, lin.in_features, generator=g, device=device) * 0.05
            if kind == "bf16":
                lin.load(StoredLinear("bf16", w, None))
            else:
                qw = ref.quantize_weight(w, scheme, name=name)
                lin.load(StoredLinear(kind, qw.qweight, qw.scale, block_size=scheme.block_size))
            lin.process_weights_after_loading()
        moe.gate.weight.copy_(torch.randn(experts, hidden, generator=g, device=device) * 0.3)
        moe.gate.e_score_correction_bias.copy_(torch.rand(experts, generator=g, device=device) * 0.2 - 0.1)
    moe.process_weights_after_loading()
    return moe


def _run(moe: MoE, x: torch.Tensor, fused: bool) -> torch.Tensor:
    moe.use_fused = fused
    with torch.no_grad():
        return moe(x)


def _rel(y: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return (y.float() - expected.float()).abs().max().item() / expected.float().abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden, inter", [(256, 128), (200, 96)])
def test_fused_equals_loop(kind, hidden, inter, interpreter, native_fp8):
    moe = make_moe(kind, hidden, inter, seed=1)
    assert moe.grouped_kind == kind and moe.supports_cuda_graphs
    # fp32 summation order only (the top_k sum, the interpreter's fp32 dots); fp8: dots of e4m3 products too
    tol = 1e-5 if kind != "fp8-block" else 2e-5
    for t in (1, 5, 33):
        x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(t))
        assert _rel(_run(moe, x, True), _run(moe, x, False)) <= tol, f"T={t}"


def test_fused_equals_loop_bf16(interpreter):
    """Model dtype bfloat16: the fused path rounds (expert output x routing weight) once, the loop rounds the expert
    output then multiplies in fp32; the interpreter truncates its casts. Within a few bf16 ulps of the output."""
    moe = make_moe("int8-block", dtype=torch.bfloat16, seed=2)
    x = torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    got, expected = _run(moe, x, True), _run(moe, x, False)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert _rel(got, expected) <= 2**-6


def test_stacks_are_the_expert_parameters():
    """Each expert's Linear parameters are views of the MoE's stacks (the loader fills the stacks through them),
    named as in the checkpoint; gate and up rows of w13 at 0 and I_pad."""
    moe = make_moe("int8-block", 200, 96, device="cpu", seed=4)
    w13, s13, w2 = moe.stacked["w13.weight"], moe.stacked["w13.weight_scale"], moe.stacked["w2.weight"]
    assert w13.shape == (8, 256, 200) and s13.shape == (8, 2, 2) and w2.shape == (8, 200, 96)  # I_pad = 128
    for e, mlp in enumerate(moe.experts):
        assert mlp.gate_proj.weight.data_ptr() == w13[e].data_ptr()
        assert mlp.up_proj.weight.data_ptr() == w13[e, 128].data_ptr()
        assert mlp.down_proj.weight.data_ptr() == w2[e].data_ptr()
        assert mlp.up_proj.weight_scale.data_ptr() == s13[e, 1].data_ptr()
        assert mlp.gate_proj.weight.is_contiguous() and mlp.up_proj.weight_scale.is_contiguous()
    assert (w13[:, 96:128] == 0).all() and (w13[:, 224:] == 0).all()  # padding rows
    names = {n for n, _ in moe.named_parameters()}
    assert {"experts.7.up_proj.weight", "experts.7.up_proj.weight_scale", "experts.0.down_proj.weight"} <= names
    assert not any("w13" in n or "stacked" in n for n in moe.state_dict())  # nothing new on disk
    storage = sum(t.untyped_storage().nbytes() for t in moe.stacked.values())
    assert storage == sum(t.numel() * t.element_size() for t in moe.stacked.values())


def test_other_block_size_restacks_scales(interpreter):
    """A checkpoint with 64 x 64 blocks: Linear.load gives each expert a new scale grid; processing moves them into
    a new stack (the weights stay put) and the fused path still equals the loop."""
    moe = make_moe("int8-block", 256, 96, block_size=(64, 64), device="cpu", seed=5)
    assert moe.grouped_kind == "int8-block" and moe.block_size == (64, 64)
    assert moe.stacked["w13.weight_scale"].shape == (8, 4, 4)  # I_pad = 128 rows = 2 block rows of 64, twice
    assert moe.experts[3].up_proj.weight_scale.data_ptr() == moe.stacked["w13.weight_scale"][3, 2].data_ptr()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(6))
    assert _rel(_run(moe, x, True), _run(moe, x, False)) <= 1e-5


@pytest.mark.parametrize("kind", ["int8-weight", "int4-group"])
def test_kinds_without_a_grouped_kernel_loop(kind):
    """int8-weight / int4-group experts keep their own parameters and the per-expert loop: not graph-safe."""
    moe = make_moe(kind, device="cpu", seed=7)
    assert moe.grouped_kind is None and not moe.stacked and f"no grouped GEMM kernel for {kind}" in moe.grouped_reason
    assert not moe.supports_cuda_graphs
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(_run(moe, x, False)).all()
    with pytest.raises(RuntimeError, match="fused path is unavailable: no grouped GEMM kernel"):
        _run(moe, x, True)


def test_fp8_scale_format_must_agree(native_fp8):
    """fp8-block: the activations of a GEMM are quantized once for all its experts, so their linears' detected
    scale formats (ue8m0 when every weight scale is a power of two) must agree, else the loop runs."""
    moe = make_moe("fp8-block", device="cpu", seed=9)
    assert moe.grouped_kind == "fp8-block" and moe.act_scale_fmt == ("float", "float")
    moe.experts[2].down_proj.act_scale_fmt = "ue8m0"
    moe.process_weights_after_loading()
    assert moe.grouped_kind is None and "disagree on the activation scale format" in moe.grouped_reason


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_fused_equals_loop(kind):
    """On the GPU at E = 64 (DeepSeek-V3's top_k 8, H 7168 / I 2048 shapes per expert), bf16: the fused path against
    the per-expert loop (each expert's own Linear kernels)."""
    from ingot.kernels.fp8_gemm import fp8_supported

    if kind == "fp8-block" and not fp8_supported("cuda"):
        pytest.skip("no FP8 tensor cores on this GPU")
    moe = make_moe(kind, 7168, 2048, dtype=torch.bfloat16, experts=64, top_k=8, seed=10)
    assert moe.grouped_kind == kind
    for t in (1, 16, 256):
        x = torch.randn(t, 7168, device="cuda", generator=torch.Generator("cuda").manual_seed(t)).bfloat16()
        assert _rel(_run(moe, x, True), _run(moe, x, False)) <= 2e-2, f"T={t}"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "int8-block"])
def test_gpu_moe_layer_replays_in_a_cuda_graph(kind):
    """The whole layer (router, alignment, act quant, two grouped GEMMs, shared expert) captured once at T = 16 and
    replayed with new inputs: each replay equals the eager fused forward on the same input (bit for bit: same
    kernels, same launches) and the loop within bf16 rounding."""
    moe = make_moe(kind, 2048, 512, dtype=torch.bfloat16, experts=64, top_k=8, seed=11)
    assert moe.supports_cuda_graphs
    moe.use_fused = None  # the default: fused on CUDA
    static_x = torch.randn(16, 2048, device="cuda").bfloat16()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            moe(static_x)  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = moe(static_x)
        for step in range(3):
            x = torch.randn(16, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(step)).bfloat16()
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, moe(x)), f"step {step}"
            assert _rel(static_y, _run(moe, x, False)) <= 2e-2
            moe.use_fused = None
