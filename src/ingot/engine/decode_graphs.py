"""Decode steps in CUDA graphs: the persistent input buffers every decode step fills in place (``DecodeBuffers``),
one captured graph per batch-size bucket over them (``DecodeGraphs``), and the previous step's sampled ids that a
step copies in on the device (``PendingTokens``). ``ModelRunner`` (runner.py) owns them.

Buffers: a host staging copy (pinned on CUDA; on CPU the buffers are the host arrays), then two host-to-device
copies per step. Graphs replay at the smallest bucket >= the batch (1, 2, 4, 8, 16, 24, 32, ..., max_num_seqs):
padded rows get slot -1 and seq_len 0 (they write no cache and produce zeros, per ingot.layers.attention.AttnMetadata).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ingot.engine.sampling import host_to_device
from ingot.engine.scheduler import ScheduledSeq
from ingot.engine.sequence import Sequence
from ingot.engine.weight_prefetch import PREFETCH_MAX_BATCH, WeightPrefetch
from ingot.layers.attention import AttnMetadata


@dataclass(frozen=True)
class PendingTokens:
    """The previous step's sampled ids, still on the device: tokens int64 [n], row j the pending token of seqs[j]."""

    tokens: torch.Tensor
    seqs: list[Sequence]

    def copy_into(self, input_ids: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        """input_ids[rows[i]] = the pending token of seqs[i], on the device."""
        if not rows:
            return
        n = len(rows)
        if rows == list(range(n)) and n == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs)):
            input_ids[:n].copy_(self.tokens)  # steady decoding: the same sequences, in the same order
            return
        where = {id(q): j for j, q in enumerate(self.seqs)}
        try:
            src = [where[id(q)] for q in seqs]
        except KeyError:
            raise RuntimeError("a pending token that the previous step did not sample") from None
        dev = input_ids.device
        input_ids.index_copy_(0, host_to_device(rows, torch.int64, dev),
                              self.tokens.index_select(0, host_to_device(src, torch.int64, dev)))


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, then every 8 up to 32, then every 16 (a batch of 33 pads
    to 48, not 64), always ending at max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    b = 8
    while b < max_num_seqs:
        sizes.append(b)
        b += 8 if b < 32 else 16
    return sizes + [max_num_seqs]


class DecodeBuffers:
    """Decode inputs of up to max_num_seqs rows, in persistent device tensors filled in place every step.

    Host staging (pinned on CUDA; on CPU the staging arrays are the buffers themselves) holds int64
    input_ids | positions | slot_mapping and int32 seq_lens | block table. The block table is stored column-major
    (entry j of row i at j * max_num_seqs + i), so the columns a step uses are one contiguous prefix: a step copies
    3 x max_num_seqs int64 and (1 + widest table) x max_num_seqs int32, two host-to-device copies (6 KB + 13 KB for
    256 rows of 192 tokens), whatever max_model_len is. A row's table is rewritten only when its sequence changes or
    gains a block (every block_size tokens), not every step.
    """

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device):
        n, mb = max_num_seqs, math.ceil(max_model_len / block_size)
        self.n, self.max_blocks, self.block_size, self.max_model_len = n, mb, block_size, max_model_len
        cuda = device.type == "cuda"
        self.host_i64 = torch.zeros(3 * n, dtype=torch.int64, pin_memory=cuda)
        self.host_i32 = torch.zeros(n + mb * n, dtype=torch.int32, pin_memory=cuda)
        self.dev_i64 = torch.zeros(3 * n, dtype=torch.int64, device=device) if cuda else self.host_i64
        self.dev_i32 = torch.zeros(n + mb * n, dtype=torch.int32, device=device) if cuda else self.host_i32
        self.host_i64[2 * n :] = -1  # every row starts as padding: slot -1, seq_len 0
        self.dev_i64.copy_(self.host_i64)
        self.input_ids, self.positions, self.slot_mapping = self.dev_i64.view(3, n)
        self.seq_lens = self.dev_i32[:n]
        self.block_tables = self.dev_i32[n:].view(mb, n).t()  # [n, mb], strides (1, n)
        h64, h32 = self.host_i64.numpy(), self.host_i32.numpy()
        self._ids, self._pos, self._slots = h64[:n], h64[n : 2 * n], h64[2 * n :]
        self._lens, self._table = h32[:n], h32[n:].reshape(mb, n)
        self._rows: list[tuple | None] = [None] * n  # (sequence, its preemption count, blocks) a table column holds
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of the staging buffers
        self._cu = torch.arange(n + 1, dtype=torch.int32, device=device)  # one new token per row

    def meta(self, b: int, width: int | None = None, max_seq_len: int | None = None) -> AttnMetadata:
        """The attention batch of the first b rows (views of the buffers).

        Graphs capture the full width (width None: every one of max_blocks table columns, max_seq_len =
        max_model_len), since the same graph replays every later step. An eager decode passes the step's widest
        table and longest context (``fill`` returns them): the torch decode attention gathers and masks every
        table column it is given, so the full width would attend over max_model_len slots per layer (2048 on CPU:
        for a short prompt ~25x the real context, and ~40% of a SmolLM2-135M decode step, NOTES.md).
        """
        return AttnMetadata(
            cu_query_lens=self._cu[: b + 1], seq_lens=self.seq_lens[:b], slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b, :width], max_query_len=1,
            max_seq_len=self.max_model_len if max_seq_len is None else max_seq_len,
        )

    def fill(self, scheduled: tuple[ScheduledSeq, ...], rows: int,
             pending: PendingTokens | None = None) -> tuple[int, int]:
        """Write a decode step into rows [0, len(scheduled)); rows up to ``rows`` (the graph bucket) are padding.
        A row whose token is pending gets it on the device from ``pending``. Returns (widest block table, longest
        context) of the step's real rows."""
        if self._copied is not None:
            self._copied.synchronize()  # returns at once: the step's token read came after the previous copy
        b, bs, n = len(scheduled), self.block_size, self.n
        ids, pos, slots = [], [], []
        width = longest = 0
        pending_rows, pending_seqs = [], []
        cache, table = self._rows, self._table
        for i, s in enumerate(scheduled):
            seq, p = s.seq, s.start  # the one new token's position
            bt = seq.block_table
            nb = len(bt)
            if p < len(seq.token_ids):
                ids.append(seq.token_ids[p])
            else:  # sampled by the step still running: copied in on the device below
                ids.append(0)
                pending_rows.append(i)
                pending_seqs.append(seq)
            pos.append(p)
            slots.append(bt[p // bs] * bs + p % bs)
            key = cache[i]
            if key is None or key[0] is not seq or key[1] != seq.num_preemptions:
                table[:nb, i] = bt
                cache[i] = (seq, seq.num_preemptions, nb)
            elif key[2] != nb:  # the same sequence gained blocks
                table[key[2] : nb, i] = bt[key[2] :]
                cache[i] = (seq, seq.num_preemptions, nb)
            if nb > width:
                width = nb
            if p >= longest:
                longest = p + 1
        self._ids[:b], self._pos[:b], self._slots[:b] = ids, pos, slots
        self._lens[:b] = self._pos[:b] + 1
        # padding rows write no cache and attend to nothing; their stale table columns hold valid ids, never read
        self._ids[b:rows], self._pos[b:rows], self._slots[b:rows], self._lens[b:rows] = 0, 0, -1, 0
        if self._copied is not None:
            self.dev_i64.copy_(self.host_i64, non_blocking=True)
            self.dev_i32[: n + width * n].copy_(self.host_i32[: n + width * n], non_blocking=True)
            self._copied.record()
        if pending_rows:
            if pending is None:
                raise RuntimeError("DecodeBuffers.fill: a pending token, and no PendingTokens were given")
            pending.copy_into(self.input_ids, pending_rows, pending_seqs)
        return width, longest


class DecodeGraphs:
    """One captured graph per bucket over the decode buffers (views of them). Buckets up to PREFETCH_MAX_BATCH are
    captured with weight prefetches (engine/weight_prefetch.py) when ``prefetch_bytes`` > 0 and the GPU has them."""

    def __init__(self, model, buffers: DecodeBuffers, max_num_seqs: int, prefetch_bytes: int = 0):
        self.model, self.buffers = model, buffers
        self.buckets = graph_buckets(max_num_seqs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        device = buffers.input_ids.device
        self.prefetch = (WeightPrefetch(model, prefetch_bytes, device)
                         if WeightPrefetch.active(device, prefetch_bytes) else None)
        self.prefetched: dict[int, int] = {}  # bucket -> prefetches its graph launches per step

    def _run(self, b: int) -> torch.Tensor:
        """The forward of bucket b over the static buffers: hidden [b, hidden_size]."""
        buf = self.buffers
        return self.model.forward(buf.input_ids[:b], buf.positions[:b], buf.meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller graphs then fit in the largest one's memory pool).
        The buffers hold padding (slot -1, seq_len 0) while capturing: warm-up and capture write no cache.
        Graphs hold the forward only: their outputs stay allocated, and hidden states of every bucket take
        sum(buckets) x hidden x 2 B (18 MB for Llama-3-8B up to 256), where logits would take 1.1 GB; the lm_head
        GEMM runs after the replay."""
        for b in reversed(self.buckets):
            pf = self.prefetch if self.prefetch is not None and b <= PREFETCH_MAX_BATCH else None
            with pf.recording() if pf else contextlib.nullcontext():
                self._run(b)  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                with pf.prefetching() if pf else contextlib.nullcontext():
                    hidden = self._run(b)
            if pf:
                self.prefetched[b] = pf.prefetches
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize()

    def bucket(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    def replay(self, b: int) -> torch.Tensor:
        """hidden [b, hidden_size] of the filled buffers (a view of the graph's output: read it before the next
        replay)."""
        graph, hidden = self.graphs[self.bucket(b)]
        graph.replay()
        return hidden[:b]
