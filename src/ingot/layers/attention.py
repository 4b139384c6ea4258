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
Prefill and mixed steps (``_prefill_attention``) split the batch once per step (``PrefillPlan``, from the host copies
of the query and context lengths the engine passes in ``AttnMetadata``): rows of one new token go through the decode
path, the rest through one padded ``scaled_dot_product_attention`` call for all of them. No host sync and no Python
loop over sequences per layer: the old per-sequence loop cost ~15 launches per sequence per layer (a mixed step of
256 sequences on Llama-3-8B: ~120K launches, over a second of host time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ingot.layers.linear import ActQuant, QuantizedActivation, RowMaxActivation
from ingot.layers.rotary import apply_rotary


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
    query_lens_host, seq_lens_host: optional host copies of the per-sequence new-token counts and seq_lens (the engine
                                  knows them): prefill and mixed steps then plan their batch without a device sync.
                                  Without them the prefill path reads the tensors back (one sync per step).
    prefill_plan:                 built by the first layer of a prefill/mixed step, reused by the others.
    """

    cu_query_lens: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...] | None = None
    seq_lens_host: tuple[int, ...] | None = None
    prefill_plan: "PrefillPlan | None" = field(default=None, repr=False, compare=False)


def _fused_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cos: torch.Tensor) -> bool:
    """Whether rope + cache write can run as one kernel: CUDA, bf16/fp16, separate values, the engine's [T, H, D]."""
    return (q.is_cuda and v is not None and q.dtype in (torch.bfloat16, torch.float16) and q.dim() == 3
            and cos.dim() == 2)


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
    if k.is_cuda:  # one Triton launch instead of the ~16 small torch ops below (a decode graph runs one per layer)
        from ingot.kernels.kv_store import store_kv_cache

        store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return
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
    new_kv: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    out_quant: ActQuant | None = None,
    row_maxima: bool = False,
) -> torch.Tensor | QuantizedActivation | RowMaxActivation:
    """Attention of the new tokens q [T, H, Dk] over the paged cache -> [T, H, Dv] in q.dtype.

    The cache must already hold this step's keys/values (``store_kv``); ``new_kv`` = those keys/values (k [T, Hkv,
    Dk], v or None) lets a step of whole fresh prompts attend over them without reading the cache back. v_cache None: values are
    k_cache[..., :head_dim_v] (MLA). GQA/MQA: query head h reads kv head h // (H / Hkv). window: sliding-window
    attention (Mistral): a token at position p sees keys at positions > p - window. Rows of padded sequences
    (seq_len 0) come out as zeros.

    out_quant: the next linear's input quantization (its ``input_quant``). A decode step on CUDA whose quantization
    is int8 per token (int8-channel's o_proj) or per token per group of exactly Dv channels (int8-block's o_proj
    where the K block is the head dim) gets the output already quantized, as a ``QuantizedActivation`` of
    [T, H * Dv] (``paged_decode_attention_int8``: one launch fewer where KV splits are combined); anything else
    returns the plain output. row_maxima (o_proj ``takes_row_maxima``: a batch-1 int8-channel GEMV that quantizes
    its input itself): a CUDA decode step returns a ``RowMaxActivation`` of [T, H * Dv] instead, the output with
    each head group's max |out| (``paged_decode_attention_maxima``), before out_quant is considered.
    """
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    if meta.max_query_len == 1:
        if q.is_cuda and window is None:  # the Triton split-KV kernel, tested against this reference
            return _cuda_decode(q, k_cache, v_cache, meta, scale, head_dim_v, out_quant, row_maxima)
        return _decode_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window)
    return _prefill_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window, *(new_kv or ()))


def _cuda_decode(q, k_cache, v_cache, meta, scale, head_dim_v, out_quant, row_maxima, new_kv=None):
    """The CUDA decode kernel (``kernels.attention``), its output with row maxima or quantized for o_proj where it
    can be; new_kv: a ``NewKV`` for the kernel to rotate and store (``Attention.forward``)."""
    from ingot.kernels.attention import (
        paged_decode_attention, paged_decode_attention_int8, paged_decode_attention_maxima,
    )

    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, head_dim_v)
    if row_maxima:
        return RowMaxActivation(*paged_decode_attention_maxima(*args, new_kv=new_kv))
    if _fused_int8_output(out_quant, head_dim_v):
        x_q, x_s = paged_decode_attention_int8(*args, out_quant.group_size, new_kv=new_kv)
        return QuantizedActivation(x_q, x_s, out_quant, q.dtype)
    return paged_decode_attention(*args, new_kv=new_kv)


def _fused_int8_output(quant: ActQuant | None, head_dim_v: int) -> bool:
    """Whether the decode kernels can emit ``quant``'s int8 input themselves: int8 with float scales, in the shapes
    ``kernels.attention.int8_output_supported`` takes (per token or one group per head)."""
    from ingot.kernels.attention import int8_output_supported

    return (quant is not None and quant.dtype == "int8" and quant.scale_fmt == "float"
            and int8_output_supported(head_dim_v, quant.group_size))


def _values(k: torch.Tensor, v: torch.Tensor | None, head_dim_v: int) -> torch.Tensor:
    return k[..., :head_dim_v] if v is None else v


def _decode_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window):
    """One new token per sequence: q [B, H, Dk] (row b is sequence b). Fixed shapes; float32 math."""
    b, h, dk = q.shape
    if meta.block_tables.shape[0] != b:
        raise ValueError(f"paged_attention (decode): {b} query rows but block_tables has {meta.block_tables.shape[0]} rows")
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    # (B, MB); padding entries past seq_len are masked below. Contiguous: the engine's table is a transposed view,
    # and the gathered K would inherit its strides
    tables = meta.block_tables.long().clamp(min=0).contiguous()
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


# A padded group may hold at most this factor times the query rows and context rows its sequences really have (plus
# PAD_SLACK): 64 fresh prompts of 128 tokens are one group, while a long chunk does not pad short ones to its length
# (one prompt of 8000 tokens with 63 of 3 would otherwise make 64 x 8000 query rows, 4 GB of q for Llama-3-8B).
PAD_FACTOR = 2
PAD_SLACK = 256


@dataclass
class PrefillGroup:
    """Sequences of more than one new token that share one padded scaled_dot_product_attention call.

    Query slot (b, i) of group sequence b holds token row ``q_index[b * tq + i]`` (padding repeats a real row); the
    real slots ``q_real`` fill token rows ``out_rows``. ``qpos`` [Bp, tq, 1]: each query's position (padding: ctx - 1);
    ``ctx`` [Bp, 1, 1]: context lengths; ``lk``: the longest. ``causal``: every sequence is a whole fresh prompt of tq
    tokens (ctx == n == tq), so no mask is needed (the flash kernel).
    """

    seqs: torch.Tensor
    q_index: torch.Tensor
    q_real: torch.Tensor
    out_rows: torch.Tensor
    qpos: torch.Tensor
    ctx: torch.Tensor
    tq: int
    lk: int
    causal: bool


@dataclass
class PrefillPlan:
    """How a prefill/mixed step splits into attention calls, as index tensors on the device (built once per step,
    from host lengths: one host-to-device copy). Rows of one new token (decodes, 1-token chunks) run the decode path
    (``decode_rows``: their token rows; ``decode_meta``: their block tables and seq_lens); longer ones run
    ``groups``."""

    decode_rows: torch.Tensor | None
    decode_meta: AttnMetadata | None
    groups: list[PrefillGroup]
    dense: tuple[int, int] | None = None  # (B, n): the step is B whole fresh prompts of n tokens each, in row order

    @staticmethod
    def _group(many: list[int], qlens: list[int], ctxs: list[int]) -> list[list[int]]:
        """Greedy over sequences by context length (longest first): a sequence joins the open group while the padded
        query and context rows stay within PAD_FACTOR x the real ones (+ PAD_SLACK)."""
        groups: list[list[int]] = []
        tq = lk = real_q = real_k = 0
        for b in sorted(many, key=lambda b: (-ctxs[b], -qlens[b])):
            if groups:
                n, new_tq, new_lk = len(groups[-1]) + 1, max(tq, qlens[b]), max(lk, ctxs[b])
                if (n * new_tq <= PAD_FACTOR * (real_q + qlens[b]) + PAD_SLACK
                        and n * new_lk <= PAD_FACTOR * (real_k + ctxs[b]) + PAD_SLACK):
                    groups[-1].append(b)
                    tq, lk, real_q, real_k = new_tq, new_lk, real_q + qlens[b], real_k + ctxs[b]
                    continue
            groups.append([b])
            tq, lk, real_q, real_k = qlens[b], ctxs[b], qlens[b], ctxs[b]
        return groups

    @classmethod
    def build(cls, meta: AttnMetadata) -> "PrefillPlan":
        if meta.query_lens_host is not None and meta.seq_lens_host is not None:
            qlens, ctxs = list(meta.query_lens_host), list(meta.seq_lens_host)
        else:  # a caller without host copies: one read-back per step (not per layer: the plan is kept)
            cu = meta.cu_query_lens.tolist()
            qlens, ctxs = [b - a for a, b in zip(cu, cu[1:])], meta.seq_lens.tolist()
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        one, many = [], []
        for b, (n, c) in enumerate(zip(qlens, ctxs)):
            if n == 0 or c == 0:
                continue  # no new tokens, or a padded row: its outputs stay zero
            if c < n:
                raise ValueError(f"paged_attention: sequence {b} has seq_len {c} < its {n} new tokens")
            (one if n == 1 else many).append(b)
        ints: list[int] = [starts[b] for b in one] + one  # every index of the step, copied to the device at once
        sizes = [len(one), len(one)]
        shapes = []
        for group in cls._group(many, qlens, ctxs):
            tq, lk = max(qlens[b] for b in group), max(ctxs[b] for b in group)
            q_index, q_real, out_rows, qpos = [], [], [], []
            for j, b in enumerate(group):
                n, c, s0 = qlens[b], ctxs[b], starts[b]
                q_index += [s0 + min(i, n - 1) for i in range(tq)]
                q_real += range(j * tq, j * tq + n)
                out_rows += range(s0, s0 + n)
                qpos += [c - n + min(i, n - 1) for i in range(tq)]
            parts = (group, q_index, q_real, out_rows, qpos, [ctxs[b] for b in group])
            for part in parts:
                ints += part
            sizes += [len(part) for part in parts]
            causal = all(qlens[b] == tq and ctxs[b] == tq for b in group)
            shapes.append((len(group), tq, lk, causal))
        dev = meta.seq_lens.device
        pieces = torch.tensor(ints, dtype=torch.int64).to(dev, non_blocking=True).split(sizes)
        decode_meta = None
        if one:
            decode_meta = AttnMetadata(
                cu_query_lens=torch.arange(len(one) + 1, dtype=torch.int32, device=dev),
                seq_lens=meta.seq_lens.index_select(0, pieces[1]),
                slot_mapping=meta.slot_mapping.new_full((len(one),), -1),
                block_tables=meta.block_tables.index_select(0, pieces[1]),
                max_query_len=1,
                max_seq_len=max(ctxs[b] for b in one),
            )
        groups = []
        for g, (bp, tq, lk, causal) in enumerate(shapes):
            seqs, q_index, q_real, out_rows, qpos, ctx = pieces[2 + 6 * g : 8 + 6 * g]
            groups.append(PrefillGroup(seqs, q_index, q_real, out_rows, qpos.view(bp, tq, 1), ctx.view(bp, 1, 1),
                                       tq, lk, causal))
        dense = None
        if not one and len(shapes) == 1 and shapes[0][3] and shapes[0][0] * shapes[0][1] == starts[-1]:
            dense = shapes[0][:2]  # one causal group covering every row: grouped in row order (a stable sort)
        return cls(pieces[0] if one else None, decode_meta, groups, dense)


def _prefill_attention(q, k_cache, v_cache, meta, scale, head_dim_v, window, k=None, v=None):
    """Any mix of prefills and decodes (see ``PrefillPlan``): q [T, H, Dk] -> [T, H, Dv]; padded rows give zeros.
    k, v: this step's new keys/values (as stored): when the step is whole fresh prompts of one length (``plan.dense``,
    a batch of new requests), their context is exactly these rows, and attention runs on them directly (no cache
    gather, no index copies: the same numbers, about 6 fewer launches per layer)."""
    t, h, _ = q.shape
    plan = meta.prefill_plan
    if plan is None:
        plan = meta.prefill_plan = PrefillPlan.build(meta)
    if plan.dense is not None and k is not None and k.dtype == k_cache.dtype:
        b, n = plan.dense
        kd = k.view(b, n, *k.shape[1:])
        vd = _values(kd, None if v is None else v.view(b, n, *v.shape[1:]), head_dim_v)
        return causal_attention(q.view(b, n, h, -1), kd, vd, scale, window).reshape(t, h, head_dim_v)
    if plan.dense is not None and not plan.groups and plan.decode_rows is None:  # a dense-only plan (prefill graphs)
        raise RuntimeError("paged_attention: this step's plan is dense-only, and its new keys were not given in the "
                           f"cache dtype ({None if k is None else k.dtype} vs {k_cache.dtype})")
    out = q.new_zeros(t, h, head_dim_v)
    if plan.decode_rows is not None:
        qd = q.index_select(0, plan.decode_rows)
        od = paged_attention(qd, k_cache, v_cache, plan.decode_meta, scale, head_dim_v, window)
        out.index_copy_(0, plan.decode_rows, od.to(out.dtype))
    for group in plan.groups:
        o = _group_attention(q, k_cache, v_cache, meta.block_tables, group, scale, head_dim_v, window)
        out.index_copy_(0, group.out_rows, o.to(out.dtype))
    return out


def _group_attention(q, k_cache, v_cache, block_tables, group: PrefillGroup, scale, head_dim_v, window):
    """One padded SDPA over a PrefillGroup -> [real query rows, H, Dv] in group.out_rows order."""
    h = q.shape[1]
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    bp, tq, lk = group.seqs.shape[0], group.tq, group.lk
    nb = -(-lk // bs)
    tables = block_tables.index_select(0, group.seqs)[:, :nb].long()  # (Bp, nb)
    k = k_cache[tables].view(bp, nb * bs, hkv, -1)[:, :lk]  # (Bp, Lk, Hkv, Dk)
    v = _values(k, None if v_cache is None else v_cache[tables].view(bp, nb * bs, hkv, -1)[:, :lk], head_dim_v)
    qp = q.index_select(0, group.q_index).view(bp, tq, h, -1)  # (Bp, tq, H, Dk)
    mask = None
    if not group.causal or window is not None:
        kpos = torch.arange(lk, device=q.device)
        mask = (kpos <= group.qpos) & (kpos < group.ctx)  # (Bp, tq, Lk); query i of b sits at ctx - n + i
        if window is not None:
            mask &= kpos > group.qpos - window
        # Slots past a sequence's context hold whatever the pool held (another sequence's tokens, or NaN in tests);
        # masked scores become -inf but 0 * NaN in p @ v (or NaN + -inf in a fused kernel's bias) would not vanish.
        seen = (kpos < group.ctx)[:, 0, :, None, None]  # (Bp, Lk, 1, 1)
        k = torch.where(seen, k, 0.0)
        v = torch.where(seen, v, 0.0)
        mask = mask[:, None]  # (Bp, 1, tq, Lk): broadcast over heads
    o = _sdpa(qp, k, v, scale, mask).reshape(bp * tq, h, -1)  # (Bp * tq, H, Dv)
    return o.index_select(0, group.q_real)


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
    """q [B, Tq, H, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv], mask bool [Tq, Tk] or [B, 1, Tq, Tk] (True: attend),
    or None (causal, Tq == Tk)."""
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, meta: AttnMetadata | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                out_quant: ActQuant | None = None,
                row_maxima: bool = False) -> torch.Tensor | QuantizedActivation | RowMaxActivation:
        """rope: (cos, sin) to rotate q and k by first (``apply_rotary``, channel i with i + dim / 2); on the engine's
        CUDA path the decode kernel rotates and writes the cache itself (``kernels.attention.NewKV``, where
        ``rope_supported``), other steps run one launch for both (``kernels.kv_store.rope_store_kv``). out_quant:
        the output linear's input quantization, which a CUDA decode step may return already applied
        (``paged_attention``), or row_maxima its ``RowMaxActivation``: the caller passes any result to that linear."""
        dv = self.spec.head_dim_v
        if meta is None:
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            return causal_attention(q, k, _values(k, v, dv), self.scale, self.window)
        if self.k_cache is None:
            raise RuntimeError("Attention: no KV cache bound; call model.bind_kv_cache(...) before a paged forward")
        if rope is not None and _fused_rope_store(q, k, v, rope[0]):
            from ingot.kernels import attention as kernels
            from ingot.kernels.kv_store import rope_store_kv

            if meta.max_query_len == 1 and self.window is None and kernels.rope_supported(q, self.v_cache):
                new = kernels.NewKV(k, v, *rope, meta.slot_mapping)  # the decode kernel rotates and stores
                return _cuda_decode(q, self.k_cache, self.v_cache, meta, self.scale, dv, out_quant, row_maxima, new)
            q, k = rope_store_kv(q, k, v, *rope, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, dv, self.window, (k, v), out_quant,
                               row_maxima)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, {self.spec}, scale={self.scale:.4g}, window={self.window}"
