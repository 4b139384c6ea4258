"""store_kv_cache (Triton; the interpreter on CPU) against the torch store_kv: padded rows, strided inputs, casts,
MLA's shared latent cache."""

from __future__ import annotations

import pytest
import torch

from ingot.kernels.kv_store import store_kv_cache
from ingot.layers import attention


def _torch_store(k, v, kc, vc, slots):
    attention.store_kv(k.cpu(), None if v is None else v.cpu(), kc, vc, slots.cpu())


@pytest.mark.parametrize("hkv, dk, dv, shared", [(2, 16, 16, False), (3, 24, 8, False), (1, 40, 32, True)])
@pytest.mark.parametrize("dtype, src_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16)])
def test_store_kv_cache_matches_torch(hkv, dk, dv, shared, dtype, src_dtype):
    """Exact copies, and an exact upcast (Triton's interpreter truncates float32 -> bf16 where the GPU rounds to
    nearest even, so a downcast is not compared here; the engine hands the cache its own dtype anyway)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(hkv * 100 + dk)
    blocks, page, t = 6, 4, 7
    kc = torch.randn(blocks, page, hkv, dk, generator=g).to(dtype)
    vc = None if shared else torch.randn(blocks, page, hkv, dv, generator=g).to(dtype)
    # k, v as strided views of one fused projection (the toy model's qkv.split)
    fused = torch.randn(t, hkv, dk + dv + 5, generator=g).to(src_dtype)
    k, v = fused[..., :dk], (None if shared else fused[..., dk + 5 :])
    slots = torch.tensor([-1, 13, 0, -1, 23, 5, 6])  # padding first and in the middle; last slot of the pool
    want_k, want_v = kc.clone(), None if shared else vc.clone()
    _torch_store(k, v, want_k, want_v, slots)
    got_k, got_v = kc.to(dev), None if shared else vc.to(dev)
    store_kv_cache(k.to(dev), None if shared else v.to(dev), got_k, got_v, slots.to(dev))
    assert torch.equal(got_k.cpu(), want_k)
    if not shared:
        assert torch.equal(got_v.cpu(), want_v)
    # an all-padding step writes nothing; int32 slots work too
    before = got_k.clone()
    pad = torch.full((t,), -1, dtype=torch.int32, device=dev)
    store_kv_cache(k.to(dev), None if shared else v.to(dev), got_k, got_v, pad)
    assert torch.equal(got_k, before)


def test_store_kv_cache_errors():
    kc = torch.zeros(2, 4, 1, 6)
    with pytest.raises(ValueError, match="both"):
        store_kv_cache(torch.zeros(3, 1, 6), torch.zeros(3, 1, 6), kc, None, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping has shape"):
        store_kv_cache(torch.zeros(3, 1, 6), None, kc, None, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit"):
        store_kv_cache(torch.zeros(3, 2, 6), None, kc, None, torch.zeros(3, dtype=torch.int64))
