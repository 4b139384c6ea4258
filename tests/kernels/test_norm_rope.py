"""rms_norm and rotary (Triton; the interpreter on CPU) against the torch modules they replace on CUDA.

fp16 is compared bit for bit where the kernels promise it (rotary), since the interpreter rounds float32 -> fp16 to
nearest even as the GPU does; its float32 -> bf16 cast truncates, so bf16 rotary is compared within one ulp here
(rms_norm rounds bf16 on the bits in the interpreter: within one ulp of the module, as on the GPU)."""

from __future__ import annotations

import pytest
import torch

from ingot.kernels.norm_rope import rms_norm, rotary
from ingot.layers.norm import RMSNorm
from ingot.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the last place of b's dtype (relative to |b|)."""
    eps = torch.finfo(b.dtype).eps
    unit = (b.float().abs() * eps).clamp_min(torch.finfo(torch.float32).tiny)
    return ((a.float() - b.float()).abs() / unit).max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (3, 2, 100), (1, 576)])
def test_rms_norm_matches_the_module(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], 1e-5, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[-1], generator=g))
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    want = norm(x)  # the torch path (CPU)
    got = rms_norm(x.to(DEV), norm.weight.to(DEV), 1e-5).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    # one rounding apart at most: the sum of squares runs in another order (the kernel rounds bf16 to nearest even
    # in the interpreter too, act_quant._cast_rn)
    bound = 1.0
    assert _ulps(got, want) <= bound + 1e-6
    strided = torch.randn(4, 2 * shape[-1], generator=g).to(dtype)[:, : shape[-1]]  # a row-strided view (MLA's split)
    assert _ulps(rms_norm(strided.to(DEV), norm.weight.to(DEV), 1e-5).cpu(), norm(strided)) <= bound + 1e-6


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads, dim", [(4, 16), (3, 64), (1, 10)])
def test_rotary_matches_apply_rotary(interleaved, heads, dim):
    g = torch.Generator().manual_seed(heads * dim)
    t = 7
    rope = RotaryEmbedding(dim, RopeScaling(theta=10000.0))
    cos, sin = rope(torch.tensor([0, 1, 5, 17, 100, 1000, 4095]))
    fused = torch.randn(t, heads, dim + 6, generator=g)  # x as a strided slice of a wider projection
    for dtype in (torch.float16, torch.bfloat16):
        x = fused.to(dtype)[..., 3 : 3 + dim]
        # torch's formula on the kernel's device (a 4-D view: apply_rotary sends 3-D CUDA tensors to the kernel)
        want = apply_rotary(x.to(DEV)[None], cos.to(DEV)[None], sin.to(DEV)[None], interleaved)[0].cpu()
        got = rotary(x.to(DEV), cos.to(DEV), sin.to(DEV), interleaved).cpu()
        assert got.dtype == dtype and got.shape == (t, heads, dim)
        if dtype == torch.float16 or DEV == "cuda":
            assert torch.equal(got, want)  # compiled without fp fusion: torch's roundings (norm_rope's docstring)
        else:  # the interpreter truncates fp32 -> bf16 casts
            bound = 4 * torch.finfo(dtype).eps * x.float().abs().max().item()
            assert (got.float() - want.float()).abs().max().item() <= bound


def test_errors_name_the_input():
    with pytest.raises(TypeError, match="rms_norm"):
        rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="weight of shape"):
        rms_norm(torch.zeros(2, 4, dtype=torch.float16), torch.ones(3, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="cos/sin must be"):
        rotary(torch.zeros(2, 1, 8, dtype=torch.float16), torch.zeros(2, 3), torch.zeros(2, 3))
