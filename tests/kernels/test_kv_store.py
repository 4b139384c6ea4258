"""store_kv_cache (Triton; the interpreter on CPU) against the torch store_kv: padded rows, strided inputs, casts,
MLA's shared latent cache."""

from __future__ import annotations

import pytest
import torch

from ingot.kernels.kv_store import rope_store_kv, store_kv_cache
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


@pytest.mark.parametrize("h, hkv, d, dv", [(8, 2, 16, 16), (9, 3, 24, 24), (4, 1, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_store_kv_equals_rotary_then_store(h, hkv, d, dv, dtype, interleaved):
    """One launch = apply_rotary of q and k, then store_kv of the rotated k and of v: the same bits (GQA, head dims
    that are not powers of two, strided q/k/v views of one projection, padded slots)."""
    from ingot.kernels.norm_rope import rotary
    from ingot.layers.rotary import apply_rotary

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(h * 31 + d)
    blocks, page, t = 5, 4, 6
    kc = torch.randn(blocks, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(blocks, page, hkv, dv, generator=g).to(dtype)
    qkv = (torch.randn(t, (h + hkv) * d + hkv * dv, generator=g) * 3).to(dtype)
    q = qkv[:, : h * d].unflatten(-1, (h, d))
    k = qkv[:, h * d : (h + hkv) * d].unflatten(-1, (hkv, d))
    v = qkv[:, (h + hkv) * d :].unflatten(-1, (hkv, dv))
    angles = torch.randn(t, d // 2, generator=g) * 4
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([3, -1, 0, 19, -1, 7])
    q, k, v, cos, sin, slots = (x.to(dev) for x in (q, k, v, cos, sin, slots))
    want_q, want_k = rotary(q, cos, sin, interleaved), rotary(k, cos, sin, interleaved)
    want_kc, want_vc = kc.to(dev), vc.to(dev)
    store_kv_cache(want_k, v, want_kc, want_vc, slots)

    got_kc, got_vc = kc.to(dev), vc.to(dev)
    got_q, got_k = rope_store_kv(q, k, v, cos, sin, got_kc, got_vc, slots, interleaved)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(got_kc, want_kc) and torch.equal(got_vc, want_vc)
    if dtype == torch.float16 and dev == "cpu":  # the interpreter rounds bf16 differently from torch; compiled,
        # the rotary is within one ulp of torch (test_norm_rope): the exact comparison is the kernels' one above
        ref_q = apply_rotary(q, cos, sin, interleaved)
        ref_k = apply_rotary(k, cos, sin, interleaved)
        ref_kc, ref_vc = kc.clone(), vc.clone()
        attention.store_kv(ref_k, v, ref_kc, ref_vc, slots)
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
        assert torch.equal(got_kc, ref_kc) and torch.equal(got_vc, ref_vc)


def test_rope_store_kv_errors():
    kc, vc = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    q, k, v = (torch.zeros(3, n, 8, dtype=torch.bfloat16) for n in (2, 1, 1))
    cs = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="share a dtype"):
        rope_store_kv(q.float(), k, v, cs, cs, kc, vc, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping has shape"):
        rope_store_kv(q, k, v, cs, cs, kc, vc, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit"):
        wide = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16)
        rope_store_kv(q, k, v, cs, cs, wide, vc, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shapes disagree"):
        rope_store_kv(q, k, v, torch.zeros(3, 3), torch.zeros(3, 3), kc, vc, torch.zeros(3, dtype=torch.int64))
