"""RMSNorm against transformers' LlamaRMSNorm (the same op as DeepSeek-V3's and Qwen3's): bit-identical in fp32 and
bf16, because the statistics are taken in float32 and the weight multiply happens after the cast back."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ingot.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (33, 100), (3, 7, 4, 32)])
def test_matches_transformers_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(0)
    dim = shape[-1]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)
    ours = RMSNorm(dim, 1e-5, dtype=dtype)
    theirs = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    y = ours(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, theirs(x))


def test_parameters_and_errors():
    norm = RMSNorm(64, dtype=torch.bfloat16)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert norm.weight.dtype == torch.bfloat16 and not norm.weight.requires_grad
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=0.0)
