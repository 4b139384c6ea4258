"""Writing a step's keys and values into the paged KV cache: one launch for the keys, one for the values.

``store_kv_cache(k [T, Hkv, Dk], v [T, Hkv, Dv] or None, k_cache, v_cache, slot_mapping [T])``: token t goes to
block ``slot // block_size``, offset ``slot % block_size``; slot -1 (a padded CUDA-graph row) writes nothing.

Why a kernel: the torch version (ingot.layers.attention.store_kv) must stay free of host syncs and data-dependent
shapes, so it redirects padded rows with where/index_select and writes with index_copy_: ~16 small launches per
layer. A decode step of Llama-3-8B in a CUDA graph ran ~60 kernels per layer, 2000 in all, each a few microseconds
at batch 1 even when replayed; this makes store_kv two of them per layer. Each program copies a tile of one token's row
(Hkv x D values, cast to the cache dtype); distinct real slots never overlap, so the result is order-free.

``rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)``: a Llama layer's rotary embedding of q and k and
the cache write of the rotated k and of v, one launch per layer instead of four (two rotary, two stores; ~157 us of a
4 ms int8 Llama-3-8B decode step at batch 1 on the H100, session-4 profile). Bit for bit ``rotary`` then
``store_kv_cache``.

Reference: ingot.layers.attention.store_kv (the torch path every CPU run takes); ingot.layers.rotary.apply_rotary.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ingot.kernels.checks import cdiv, next_pow2
from ingot.kernels.norm_rope import DTYPES, _cos_sin, _rotate

BLOCK = 1024  # values per program: a Llama-3 row of 8 x 128 (or an MLA latent row of 576) in one program


@triton.jit
def _store_kv_kernel(
    src_ptr, cache_ptr, slot_ptr,
    D, ROW,  # D: values per head; ROW: Hkv * D
    s_t, s_h, s_d,  # source strides (token, head, channel)
    c_b, c_o, c_h, c_d,  # cache strides (block, offset, head, channel)
    PAGE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # position in the flattened (head, channel) row
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = (r < ROW) & (slot >= 0)
    h = r // D
    d = r % D
    x = tl.load(src_ptr + t.to(tl.int64) * s_t + h * s_h + d * s_d, mask=ok)
    blk = tl.where(slot >= 0, slot, 0) // PAGE
    off = tl.where(slot >= 0, slot, 0) % PAGE
    dst = cache_ptr + blk * c_b + off * c_o + h * c_h + d * c_d
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, slot_ptr,
    H, HKV, HALF, DV,
    s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
    s_ct, s_cp, s_st, s_sp,
    s_qot, s_qoh, s_kot, s_koh,
    kc_b, kc_o, kc_h, kc_d, vc_b, vc_o, vc_h, vc_d,
    PAGE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)[None, :]
    c, s = _cos_sin(cos_ptr, sin_ptr, t, s_ct, s_cp, s_st, s_sp, HALF, qo_ptr.dtype.element_ty, BLOCK_P)
    y1, y2, h, ok = _rotate(q_ptr + t * s_qt, c, s, H, HALF, s_qh, s_qd, INTERLEAVED, BLOCK_H, BLOCK_P)
    out = qo_ptr + t * s_qot + h * s_qoh
    tl.store(out + p, y1, mask=ok)
    tl.store(out + p + HALF, y2, mask=ok)
    y1, y2, h, ok = _rotate(k_ptr + t * s_kt, c, s, HKV, HALF, s_kh, s_kd, INTERLEAVED, BLOCK_HKV, BLOCK_P)
    out = ko_ptr + t * s_kot + h * s_koh
    tl.store(out + p, y1, mask=ok)
    tl.store(out + p + HALF, y2, mask=ok)
    # the cache: slot -1 (a padded CUDA-graph row) writes nothing
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = slot >= 0
    blk = tl.where(valid, slot, 0) // PAGE
    off = tl.where(valid, slot, 0) % PAGE
    dst = kc_ptr + blk * kc_b + off * kc_o + h * kc_h
    tl.store(dst + p * kc_d, y1.to(kc_ptr.dtype.element_ty), mask=ok & valid)
    tl.store(dst + (p + HALF) * kc_d, y2.to(kc_ptr.dtype.element_ty), mask=ok & valid)
    d = tl.arange(0, BLOCK_DV)[None, :]
    v_ok = (h < HKV) & (d < DV)
    vals = tl.load(v_ptr + t * s_vt + h * s_vh + d * s_vd, mask=v_ok)
    dst = vc_ptr + blk * vc_b + off * vc_o + h * vc_h + d * vc_d
    tl.store(dst, vals.to(vc_ptr.dtype.element_ty), mask=v_ok & valid)


INTERPRETED = not isinstance(_store_kv_kernel, triton.runtime.JITFunction)


def _launch(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    t, hkv, d = src.shape
    if tuple(cache.shape[2:]) != (hkv, d):
        raise ValueError(f"store_kv: tokens of shape {tuple(src.shape[1:])} do not fit a cache of "
                         f"{tuple(cache.shape[2:])} per slot")
    row = hkv * d
    _store_kv_kernel[(t, cdiv(row, BLOCK))](
        src, cache, slot_mapping, d, row, *src.stride(), *cache.stride(), PAGE=cache.shape[1], BLOCK_R=BLOCK,
    )


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k [T, Hkv, Dk] (and v [T, Hkv, Dv]) at slot_mapping [T] (int32/int64; -1 writes nothing) into
    k_cache [num_blocks, block_size, Hkv, Dk] (v_cache [..., Dv]; None for a shared latent cache). Any strides; values
    are cast to the cache dtype. No host sync: CUDA-graph capturable."""
    if k.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"store_kv: k must be [T, Hkv, D] and k_cache [blocks, block_size, Hkv, D], got "
                         f"{tuple(k.shape)} and {tuple(k_cache.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"store_kv: k has {k.shape[0]} tokens but slot_mapping has shape {tuple(slot_mapping.shape)}")
    if (v is None) != (v_cache is None):
        raise ValueError("store_kv: v and v_cache must both be given (separate values) or both be None (shared_kv)")
    if k.shape[0] == 0:
        return
    ctx = torch.cuda.device(k.device) if k.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _launch(k, k_cache, slot_mapping)
        if v is not None:
            _launch(v, v_cache, slot_mapping)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] (bf16/fp16, any strides) by float32 cos/sin [T, D / 2], write the rotated
    k and v [T, Hkv, Dv] at slot_mapping [T] (-1 writes nothing) into k_cache / v_cache [blocks, block_size, Hkv, D /
    Dv], and return the rotated (q, k) as new contiguous tensors: one launch, bit for bit ``rotary(q)``,
    ``rotary(k)`` then ``store_kv_cache(k_rot, v, ...)``. No host sync: CUDA-graph capturable."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rope_store_kv: q, k, v must share a dtype in {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"rope_store_kv: q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv], cos/sin [T, D/2]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    t, h, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    if d % 2 or k.shape != (t, hkv, d) or v.shape[:2] != (t, hkv) or cos.shape != (t, d // 2):
        raise ValueError(f"rope_store_kv: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cos {tuple(cos.shape)} (want k [{t}, Hkv, {d}], v [{t}, Hkv, Dv], cos [{t}, {d // 2}])")
    if tuple(k_cache.shape[2:]) != (hkv, d) or v_cache.shape[:3] != k_cache.shape[:3] or v_cache.shape[3] != dv:
        raise ValueError(f"rope_store_kv: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit k "
                         f"{tuple(k.shape)} / v {tuple(v.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != t:
        raise ValueError(f"rope_store_kv: {t} tokens but slot_mapping has shape {tuple(slot_mapping.shape)}")
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, d), dtype=q.dtype, device=q.device)
    if t:
        ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            _rope_store_kv_kernel[(t,)](
                q, k, v, cos, sin, q_out, k_out, k_cache, v_cache, slot_mapping,
                h, hkv, d // 2, dv,
                *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
                q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                *k_cache.stride(), *v_cache.stride(),
                PAGE=k_cache.shape[1], INTERLEAVED=interleaved,
                BLOCK_H=next_pow2(h), BLOCK_HKV=next_pow2(hkv), BLOCK_P=next_pow2(d // 2), BLOCK_DV=next_pow2(dv),
                enable_fp_fusion=False,  # torch's roundings (norm_rope's docstring)
            )
    return q_out, k_out
