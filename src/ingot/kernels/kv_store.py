"""Writing a step's keys and values into the paged KV cache: one launch for the keys, one for the values.

``store_kv_cache(k [T, Hkv, Dk], v [T, Hkv, Dv] or None, k_cache, v_cache, slot_mapping [T])``: token t goes to
block ``slot // block_size``, offset ``slot % block_size``; slot -1 (a padded CUDA-graph row) writes nothing.

Why a kernel: the torch version (ingot.layers.attention.store_kv) must stay free of host syncs and data-dependent
shapes, so it redirects padded rows with where/index_select and writes with index_copy_: ~16 small launches per
layer. A decode step of Llama-3-8B in a CUDA graph ran ~60 kernels per layer, 2000 in all, each a few microseconds
at batch 1 even when replayed; this makes store_kv two of them per layer. Each program copies a tile of one token's row
(Hkv x D values, cast to the cache dtype); distinct real slots never overlap, so the result is order-free.

Reference: ingot.layers.attention.store_kv (the torch path every CPU run takes).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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


INTERPRETED = not isinstance(_store_kv_kernel, triton.runtime.JITFunction)


def _launch(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    t, hkv, d = src.shape
    if tuple(cache.shape[2:]) != (hkv, d):
        raise ValueError(f"store_kv: tokens of shape {tuple(src.shape[1:])} do not fit a cache of "
                         f"{tuple(cache.shape[2:])} per slot")
    row = hkv * d
    _store_kv_kernel[(t, triton.cdiv(row, BLOCK))](
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
