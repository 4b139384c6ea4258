"""Attention over a paged KV cache (torch reference), and the dense causal path used by ``CausalLM.score``.

The KV cache is a pool of fixed-size blocks. Each layer has
    k_cache [num_blocks, block_size, num_kv_heads, head_dim_k]
    v_cache [num_blocks, block_size, num_kv_heads, head_dim_v]   (None when shared_kv)
in the model dtype. A sequence's token at position p lives in block ``block_tables[b, p // block_size]`` at offset
``p % block_size``; the engine writes that as ``slot = block * block_size + offset`` in ``slot_mapping``.

A batch is flattened: T new tokens of B sequences (prefills of many tokens, decodes of one, mixed), described by
``AttnMetadata``. Each new token attends to its sequence's cached context plus its own causal prefix.

MLA (DeepSeek-V3) caches one "kv head" of 576 channels per token: the compressed latent (512) and the rotated
shared rope key (64). Values are the latent, i.e. the first ``head_dim_v`` channels of the keys (``shared_kv``), so
there is no v_cache: 576 values per token per layer instead of 128 heads x (192 + 128) = 40960, 71x less.

Decode steps (every query length 1) run ``_decode_attention``: fixed shapes, block tables gathered at their padded
width and masked by ``seq_lens``, no ``.item()`` / ``.tolist()`` / boolean indexing, so a CUDA graph can capture it.
Prefill and mixed steps loop over sequences on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KVSpec:
    """What one attention layer caches per token: num_kv_heads x head_dim_k keys (and head_dim_v values, unless
    shared_kv: MLA's latent cache, whose values are the first head_dim_v channels of the keys; v_cache is None)."""

    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    shared_kv: bool

    def __post_init__(self) -> None:
        if min(self.num_kv_heads, self.head_dim_k, self.head_dim_v) <= 0:
            raise ValueError(f"KVSpec: sizes must be positive, got {self}")
        if self.shared_kv and self.head_dim_v > self.head_dim_k:
            raise ValueError(
                f"KVSpec: shared_kv values are a prefix of the keys; head_dim_v {self.head_dim_v} > "
                f"head_dim_k {self.head_dim_k}"
            )


@dataclass
class AttnMetadata:
    """One step's batch, flattened to T new tokens of B sequences.

    cu_query_lens: int32 [B + 1]  cumulative new-token counts (sequence b's tokens are rows cu[b]:cu[b+1]).
    seq_lens:      int32 [B]      context length including this step's tokens (0 for a padded row).
    slot_mapping:  int64 [T]      block_id * block_size + offset where each new token's K/V is written; -1: padding.
    block_tables:  int32 [B, max_blocks]  each sequence's blocks, padded to a fixed width (the padding may hold any
                                  valid block id; it is never read past seq_len).
    max_query_len, max_seq_len: host ints (max_query_len == 1 marks a decode step).
    """

    cu_query_lens: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's keys k [T, Hkv, Dk] (and values v [T, Hkv, Dv]) at ``slot_mapping`` [T]; slot -1 writes
    nothing.

    Without host syncs or data-dependent shapes (CUDA-graph capturable): a padded row is redirected to the slot of
    the first valid row with that row's own data (or, when no row is valid, to slot 0 with slot 0's current
    contents), so every duplicate index writes identical bytes and the result does not depend on write order.
    """
    if k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"store_kv: k has {k.shape[0]} tokens but slot_mapping has {slot_mapping.shape[0]}")
    if (v is None) != (v_cache is None):
        raise ValueError("store_kv: v and v_cache must both be given (separate values) or both be None (shared_kv)")
    valid = slot_mapping >= 0
    # Indexing with a 0-d tensor would be a host sync (.item()): keep everything as 1-element tensors.
    first = torch.argmax(valid.to(torch.int32)).view(1)  # first valid row (0 when none is valid)
    any_valid = valid.index_select(0, first)  # (1,)
    slots = torch.where(valid, slot_mapping, torch.where(any_valid, slot_mapping.index_select(0, first), 0))
    for new, cache in ((k, k_cache), (v, v_cache)):
        if new is None:
            continue
        flat = cache.view(-1, *cache.shape[2:])  # (num_blocks * block_size, Hkv, D)
        if tuple(new.shape[1:]) != tuple(flat.shape[1:]):
            raise ValueError(
                f"store_kv: tokens of shape {tuple(new.shape[1:])} do not fit a cache of {tuple(flat.shape[1:])}"
            )
        fallback = torch.where(any_valid[:, None, None], new.index_select(0, first).to(cache.dtype), flat[:1])
        rows = torch.where(valid[:, None, None], new.to(cache.dtype), fallback)
        flat.index_copy_(0, slots, rows)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    meta: AttnMetadata,
    scale: float,
    head_dim_v: int,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the new tokens q [T, H, Dk] over the paged cache -> [T, H, Dv] in q.dtype.

    The cache must already hold this step's keys/values (``store_kv``). v_cache None: values are
    k_cache[..., :head_dim_v] (MLA). GQA/MQA: query head h reads kv head h // (H / Hkv). window: sliding-window
    attention (Mistral): a token at position p sees keys at positions > p - window. Rows of padded sequences
    (seq_len 0) come out as zeros.
    """
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    if meta.max_query_len == 1:
        if q.is_cuda and window is None:  # the Triton split-KV kernel, tested against this reference
            from ingot.kernels.attention import paged_decode_attention

            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, head_dim_v)
        return _decode_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window)
    return _prefill_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window)


def _values(k: torch.Tensor, v: torch.Tensor | None, head_dim_v: int) -> torch.Tensor:
    return k[..., :head_dim_v] if v is None else v


def _decode_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window):
    """One new token per sequence: q [B, H, Dk] (row b is sequence b). Fixed shapes; float32 math."""
    b, h, dk = q.shape
    if meta.block_tables.shape[0] != b:
        raise ValueError(f"paged_attention (decode): {b} query rows but block_tables has {meta.block_tables.shape[0]} rows")
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    tables = meta.block_tables.long().clamp(min=0)  # (B, MB); padding entries past seq_len are masked below
    length = tables.shape[1] * bs
    k = k_cache[tables].view(b, length, hkv, -1)  # (B, L, Hkv, Dk)
    v = _values(k, None if v_cache is None else v_cache[tables].view(b, length, hkv, -1), head_dim_v)
    qg = q.float().view(b, hkv, h // hkv, dk)  # (B, Hkv, G, Dk)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k.float()) * scale  # (B, Hkv, G, L)
    pos = torch.arange(length, device=q.device)
    seq_lens = meta.seq_lens.long()[:, None]
    visible = pos[None, :] < seq_lens  # (B, L)
    if window is not None:
        visible &= pos[None, :] > seq_lens - 1 - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padded row (seq_len 0) is all -inf: NaN -> 0
    # Slots past seq_len hold whatever the pool held (torch.empty: possibly NaN bit patterns): 0 * NaN is NaN.
    v = torch.where(visible[:, :, None, None], v.float(), 0.0)
    out = torch.einsum("bkgl,blkd->bkgd", probs, v)
    return out.reshape(b, h, -1).to(q.dtype)


def _prefill_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window):
    """Any mix of prefills and decodes: one scaled_dot_product_attention per sequence over its gathered blocks."""
    t, h, _ = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = q.new_zeros(t, h, head_dim_v)
    cu = meta.cu_query_lens.tolist()
    seq_lens = meta.seq_lens.tolist()
    for b, ctx in enumerate(seq_lens):
        start, end = cu[b], cu[b + 1]
        n = end - start
        if n == 0 or ctx == 0:
            continue  # no new tokens, or a padded row: its outputs stay zero
        if ctx < n:
            raise ValueError(f"paged_attention: sequence {b} has seq_len {ctx} < its {n} new tokens")
        blocks = meta.block_tables[b, : -(-ctx // bs)].long()
        k = k_cache[blocks].view(-1, hkv, k_cache.shape[-1])[:ctx]  # (ctx, Hkv, Dk)
        v = _values(k, None if v_cache is None else v_cache[blocks].view(-1, hkv, v_cache.shape[-1])[:ctx], head_dim_v)
        mask = None
        if ctx != n or window is not None:  # query i sits at position ctx - n + i
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            kpos = torch.arange(ctx, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
        out[start:end] = _sdpa(q[start:end].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale, mask).squeeze(0)
    return out


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Dense causal attention of whole rows (no cache): q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv]
    -> [B, T, H, Dv]. Token t of row b sees tokens 0..t of row b (and only the last ``window`` of them if set)."""
    mask = None
    if window is not None:
        pos = torch.arange(q.shape[1], device=q.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    return _sdpa(q, k, v, scale, mask)


def _sdpa(q, k, v, scale, mask):
    """q [B, Tq, H, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv], mask bool [Tq, Tk] or None (causal, Tq == Tk)."""
    h, hkv = q.shape[2], k.shape[2]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if hkv == 1:  # MQA (MLA's latent): a broadcast view, no copy of 128 heads x 576 channels per token
        k, v = k.expand(-1, -1, h, -1), v.expand(-1, -1, h, -1)
    elif hkv < h:  # GQA: repeat kv heads (enable_gqa needs torch >= 2.5)
        k, v = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return o.transpose(1, 2)


class Attention(nn.Module):
    """The attention op of one layer: owns that layer's KV cache (bound by the engine) and picks the path.

    forward(q, k, v, meta):
      meta None (``score``): q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] or None (shared_kv) -> [B, T, H, Dv].
      meta AttnMetadata:     q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] or None -> [T, H, Dv]; writes k/v into the
                             cache, then attends over it.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim_k: int,
        head_dim_v: int,
        scale: float,
        *,
        shared_kv: bool = False,
        window: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if window is not None and window <= 0:
            raise ValueError(f"Attention: sliding window must be positive, got {window}")
        self.num_heads, self.scale, self.window = num_heads, scale, window
        self.spec = KVSpec(num_kv_heads, head_dim_k, head_dim_v, shared_kv)
        self.k_cache: torch.Tensor | None = None  # plain attributes, not buffers: no checkpoint holds them
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor | None) -> None:
        s = self.spec
        if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (s.num_kv_heads, s.head_dim_k):
            raise ValueError(
                f"k_cache of shape {tuple(k_cache.shape)} does not fit {s}: "
                f"expected [blocks, block_size, {s.num_kv_heads}, {s.head_dim_k}]"
            )
        if s.shared_kv and v_cache is not None:
            raise ValueError("this layer caches a shared latent (shared_kv): v_cache must be None")
        if not s.shared_kv and (v_cache is None or tuple(v_cache.shape) != (*k_cache.shape[:3], s.head_dim_v)):
            got = None if v_cache is None else tuple(v_cache.shape)
            raise ValueError(f"v_cache of shape {got} does not fit {s}: expected {(*k_cache.shape[:3], s.head_dim_v)}")
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, meta: AttnMetadata | None) -> torch.Tensor:
        dv = self.spec.head_dim_v
        if meta is None:
            return causal_attention(q, k, _values(k, v, dv), self.scale, self.window)
        if self.k_cache is None:
            raise RuntimeError("Attention: no KV cache bound; call model.bind_kv_cache(...) before a paged forward")
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, dv, self.window)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, {self.spec}, scale={self.scale:.4g}, window={self.window}"
