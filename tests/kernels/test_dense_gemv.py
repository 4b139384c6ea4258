"""ingot.kernels.dense_gemv: the one-token GEMV of unquantized weights (the lm_head at batch 1).

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by this directory's conftest before triton is imported) on small
shapes, ragged N and K included, against ``ref.dense_gemv_ref``. GPU (marker ``gpu``): the Llama-3-8B and DeepSeek-V3
lm_head shapes against the reference and cuBLAS's F.linear, into NaN-poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from ingot.kernels.dense_gemv import BLOCK_K, dense_gemv
from ingot.quant import ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn((1, k), generator=g, device=DEVICE).to(dtype)
    w = (torch.randn((n, k), generator=g, device=DEVICE) * 0.05).to(dtype)
    return x, w


def _within_one_rounding(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Equal, or one rounding step of ``dtype`` apart (one ulp at the larger of the two magnitudes: the fp32 sums may
    differ in their last bits and round to neighbouring values, across a power of two too), plus a floor of 1e-5 of
    the largest output for sums that cancel to near zero."""
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]  # significand bits
    larger = torch.maximum(y.float().abs(), expected.float().abs())
    _, exponent = torch.frexp(larger)
    ulp = torch.ldexp(torch.ones_like(larger), exponent - bits)
    bound = ulp + 1e-5 * expected.float().abs().max()
    excess = ((y.float() - expected.float()).abs() - bound).max().item()
    assert excess <= 0, f"{what}: off by more than one rounding step ({excess:.3g} over)"


@pytest.mark.parametrize("n,k", [(100, 576), (37, BLOCK_K), (5, 2 * BLOCK_K + 3), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_the_reference(n, k, dtype):
    """Ragged N (the last program's extra rows are not stored) and K (masked steps); float32 output = the rounded
    value exactly."""
    x, w = _operands(n, k, dtype, seed=n + k)
    y = dense_gemv(x, w, torch.float32)
    assert y.shape == (1, n) and y.dtype == torch.float32
    expected = ref.dense_gemv_ref(x, w, torch.float32)
    assert torch.equal(y.to(dtype).float(), y), "float32 output must hold a value of the model dtype"
    _within_one_rounding(y, expected, dtype, f"N={n} K={k}")
    assert torch.equal(dense_gemv(x, w), y.to(dtype))  # out_dtype defaults to x's


def test_row_stride_view():
    """w may be a view with a row stride larger than K (a slice of a wider matrix)."""
    x, w = _operands(48, 256, torch.bfloat16, seed=3)
    wide = torch.zeros((48, 300), dtype=torch.bfloat16, device=DEVICE)
    wide[:, :256] = w
    assert torch.equal(dense_gemv(x, wide[:, :256]), dense_gemv(x, w))


def test_refusals_name_the_problem():
    x, w = _operands(8, 64, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match=r"x must be \[1, K\]"):
        dense_gemv(torch.cat([x, x]), w)
    with pytest.raises(ValueError, match=r"w \[N >= 1, K\] with unit stride along K"):
        dense_gemv(x, w.T.contiguous().T)
    with pytest.raises(TypeError, match=r"w is torch.float16, x is torch.bfloat16"):
        dense_gemv(x, w.half())
    with pytest.raises(TypeError, match=r"x must be"):
        dense_gemv(x.float(), w.float())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(128256, 4096), (129280, 7168), (49152, 576)])
def test_gpu_lm_head_shapes(n, k):
    """The Llama-3-8B, DeepSeek-V3 and SmolLM2 lm_head shapes: within one bf16 rounding of the reference and of
    cuBLAS, every output written (NaN-poisoned buffer), the argmax of cuBLAS's logits where its top two are apart."""
    for seed in range(3):
        x, w = _operands(n, k, torch.bfloat16, seed)
        y = dense_gemv(x, w, torch.float32)
        torch.cuda.synchronize()
        _within_one_rounding(y, ref.dense_gemv_ref(x, w, torch.float32), torch.bfloat16, f"ref N={n} K={k}")
        cublas = torch.nn.functional.linear(x, w).float()
        _within_one_rounding(y, cublas, torch.bfloat16, f"cuBLAS N={n} K={k}")
        top2 = cublas.topk(2).values[0]
        if top2[0] - top2[1] > 2 ** -6 * top2[0].abs():
            assert y.argmax() == cublas.argmax()
