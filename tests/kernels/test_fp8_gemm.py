"""FP8 block GEMM (ingot.kernels.fp8_gemm) against ingot.quant.ref.fp8_gemm_block_ref.

On CPU the kernel runs in Triton's interpreter (numpy dots of the fp8 values, upcast); on the GPU the tensor cores
accumulate each 128-K block in reduced precision before the fp32 promotion, so GPU bounds are relative (1e-3 of the
largest output) rather than the interpreter's near-exact ones.
"""

from __future__ import annotations

import os

import pytest
import torch

from ingot.kernels import fp8_gemm
from ingot.kernels.fp8_gemm import fp8_gemm_block, fp8_supported
from ingot.kernels.tuning import GemmConfig
from ingot.quant import ref
from ingot.quant.schemes import Scheme

CUDA = torch.cuda.is_available()
if not CUDA and not fp8_gemm.INTERPRETED:
    pytest.skip("ingot.kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-5  # interpreter: per-block float64-exact-ish dots, same fp32 promotion order as the reference
GPU_TOL = 2e-3  # tensor-core FP8 accumulation inside a block (~14 bits per DeepSeek-V3's measurements) + ordering


def _operands(m: int, n: int, k: int, seed: int, scale_fmt: str = "float"):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    w = torch.randn(n, k, generator=g, device=DEVICE) * 0.02
    w[: min(n, 3)] *= 50  # a few loud rows: block scales must differ a lot
    x_q, x_s = ref.quantize_act_group(x, "fp8_e4m3", 128, scale_fmt)
    qw = ref.quantize_weight(w, Scheme.from_name("fp8-block-ue8m0" if scale_fmt == "ue8m0" else "fp8-block"))
    return x_q, x_s, qw.qweight, qw.scale


def _close(y, expected, rel, what):
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs (unwritten?)"
    err = (y.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:.1e} * {scale:.3g}"


@pytest.mark.parametrize("n,k", [(256, 256), (576, 192), (192, 576), (100, 300)])
@pytest.mark.parametrize("m", [1, 33, 222])
def test_matches_ref(m, n, k):
    args = _operands(m, n, k, seed=m + n + k)
    y = fp8_gemm_block(*args, out_dtype=torch.float32)
    _close(y, ref.fp8_gemm_block_ref(*args, out_dtype=torch.float32), GPU_TOL if CUDA else FP32_TOL, f"{m, n, k}")


def test_ue8m0_scales_bias_and_split_k():
    m, n, k = 33, 300, 576
    args = _operands(m, n, k, seed=5, scale_fmt="ue8m0")
    assert torch.equal(args[3], torch.exp2(torch.log2(args[3]).round())), "ue8m0 weight scales are powers of two"
    bias = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    expected = ref.fp8_gemm_block_ref(*args, bias=bias, out_dtype=torch.float32)
    for cfg in (None, GemmConfig(16, 64, 128, group_m=1, split_k=3), GemmConfig(32, 256, 128)):
        y = fp8_gemm_block(*args, bias=bias, out_dtype=torch.float32, config=cfg)
        _close(y, expected, GPU_TOL if CUDA else FP32_TOL, f"config {cfg}")


def test_bf16_output_is_rounded_fp32():
    args = _operands(33, 192, 576, seed=9)
    y = fp8_gemm_block(*args)
    assert y.dtype == torch.bfloat16
    _close(y, ref.fp8_gemm_block_ref(*args, out_dtype=torch.float32), 2.0**-7 + (GPU_TOL if CUDA else 0), "bf16")


def test_refusals():
    x_q, x_s, w_q, w_s = _operands(4, 100, 300, seed=1)
    with pytest.raises(TypeError, match=r"x_q must be torch.float8_e4m3fn, got torch.int8"):
        fp8_gemm_block(x_q.view(torch.int8), x_s, w_q, w_s)
    with pytest.raises(TypeError, match=r"w_q must be torch.float8_e4m3fn, got torch.bfloat16"):
        fp8_gemm_block(x_q, x_s, w_q.to(torch.bfloat16), w_s)
    with pytest.raises(ValueError, match=r"config.block_k = 64 must equal the K quantization block 128"):
        fp8_gemm_block(x_q, x_s, w_q, w_s, config=GemmConfig(16, 64, 64))
    with pytest.raises(ValueError, match=r"w_s must be per 128x128 block"):
        fp8_gemm_block(x_q, x_s, w_q, w_s[:, :2].contiguous())


def test_fp8_supported():
    assert fp8_supported("cpu") == fp8_gemm.INTERPRETED
    if CUDA:
        assert fp8_supported("cuda") == (torch.cuda.get_device_capability() >= (8, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (7168, 2048), (576, 7168), (24576, 1536)])
@pytest.mark.parametrize("m", [1, 16, 128, 1024, 4096])
def test_gpu_real_shapes(m, n, k):
    if not fp8_supported("cuda"):
        pytest.skip("no FP8 tensor cores on this GPU")
    seed = int.from_bytes(os.urandom(4), "little")
    args = _operands(m, n, k, seed)
    out = torch.full((m, n), float("nan"), device="cuda")
    fp8_gemm_block(*args, out_dtype=torch.float32, out=out)
    torch.cuda.synchronize()
    _close(out, ref.fp8_gemm_block_ref(*args, out_dtype=torch.float32), GPU_TOL, f"M={m} N={n} K={k} seed={seed}")


def test_backend_choice_is_checked():
    args = _operands(4, 256, 256, seed=3)
    with pytest.raises(ValueError, match=r"backend must be one of auto, triton, cublas, got 'cutlass'"):
        fp8_gemm_block(*args, backend="cutlass")
    if not CUDA:
        with pytest.raises(ValueError, match=r"backend 'cublas': needs a CUDA device"):
            fp8_gemm_block(*args, backend="cublas")
        # auto on CPU is the (interpreted) Triton kernel: bit-identical to asking for it
        assert torch.equal(fp8_gemm_block(*args), fp8_gemm_block(*args, backend="triton"))


def test_cublas_refusals_name_the_reason():
    x_q, x_s, w_q, w_s = _operands(4, 256, 256, seed=3)
    why = fp8_gemm.cublas_block_unsupported
    if not CUDA or torch.cuda.get_device_capability() != (9, 0):
        assert why(x_q, w_q, (128, 128), None, torch.bfloat16) is not None
        return
    assert why(x_q, w_q, (128, 128), None, torch.bfloat16) is None
    assert "multiples of 128" in why(x_q, w_q[:192], (128, 128), None, torch.bfloat16)
    assert "bias" in why(x_q, w_q, (128, 128), torch.zeros(256, device="cuda"), torch.bfloat16)
    assert "bf16 only" in why(x_q, w_q, (128, 128), None, torch.float32)
    assert "128x128 weight blocks" in why(x_q, w_q, (64, 128), None, torch.bfloat16)


def _cublas_or_skip():
    if not fp8_supported("cuda") or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cuBLAS block-scaled FP8 is sm_90 only")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (7168, 2048), (2048, 7168), (24576, 1536)])
@pytest.mark.parametrize("m", [65, 128, 333, 1024, 4096])
def test_gpu_cublas_backend(m, n, k):
    """cuBLAS's block-scaled FP8 GEMM against the reference (row- and column-major activation scales, a poisoned out
    buffer), and "auto" picks it at these M: the same bits as asking for cuBLAS."""
    _cublas_or_skip()
    seed = int.from_bytes(os.urandom(4), "little")
    x_q, x_s, w_q, w_s = _operands(m, n, k, seed)
    expected = ref.fp8_gemm_block_ref(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    for scales in (x_s.contiguous(), x_s.t().contiguous().t()):
        y = fp8_gemm_block(x_q, scales, w_q, w_s, backend="cublas", out=out)
        torch.cuda.synchronize()
        assert y.data_ptr() == out.data_ptr(), "the result is written into out"
        _close(y, expected, 2.0**-8 + GPU_TOL, f"cublas M={m} N={n} K={k} seed={seed} x_s strides {scales.stride()}")
    assert torch.equal(fp8_gemm_block(x_q, x_s, w_q, w_s), fp8_gemm_block(x_q, x_s, w_q, w_s, backend="cublas"))


@pytest.mark.gpu
def test_gpu_auto_keeps_triton_at_decode_sizes_and_in_graphs():
    _cublas_or_skip()
    for m in (1, 16, 64):
        args = _operands(m, 4096, 4096, seed=m)
        assert torch.equal(fp8_gemm_block(*args), fp8_gemm_block(*args, backend="triton")), f"M={m}"
    args = _operands(256, 4096, 4096, seed=5)
    eager = fp8_gemm_block(*args)
    out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_gemm_block(*args, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "cuBLAS block FP8 replayed from a CUDA graph differs from the eager call"
