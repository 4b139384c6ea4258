"""PrefillGraphs: CUDA graphs for a step that is one whole fresh prompt (a lone request's prefill, the batch-1 TTFT).

Why: an eager prefill forward is host-bound at small token counts. Llama-3-8B, 1 x 128 tokens on the H100 queues
~620-720 launches: 25-30 ms (bf16) and 49-59 ms (int8) of host time against 6-8 ms of GPU work (engine NOTES,
session 4), so the first token of a lone request waits on Python. Replaying a graph is one launch.

How: buckets of T tokens (16, 32, 64, ... up to ``max_tokens``), each a graph of the forward over static buffers.
A prompt of n tokens runs in the smallest bucket T >= n: rows n..T-1 are padding - token 0, slot -1 (no cache write),
positions n..T-1 - and, attention being causal over the step's own keys (``PrefillPlan.dense``), no real row sees
them. The hidden state of row n - 1 goes to the lm_head after the replay, as decode graphs do.

Only a step of exactly one sequence, starting at position 0 with its whole prompt, no pending token, qualifies;
anything else (batches, chunks, preempted sequences coming back) runs the eager path. Without capture (CPU, tests)
the same padded forward runs eagerly, which is how its padding is tested off the GPU.
"""

from __future__ import annotations

import torch

from ingot.engine.scheduler import SchedulerOutput
from ingot.layers.attention import AttnMetadata, PrefillPlan

MIN_BUCKET = 16


def prefill_buckets(max_tokens: int) -> list[int]:
    """Powers of two from MIN_BUCKET up to max_tokens (which ends the list when it is not one)."""
    sizes, t = [], MIN_BUCKET
    while t < max_tokens:
        sizes.append(t)
        t *= 2
    return sizes + [max_tokens] if max_tokens >= 1 else []


class PrefillGraphs:
    """One graph per bucket over static input buffers (int64 ids | positions | slots, one host-to-device copy)."""

    def __init__(self, model, max_tokens: int, block_size: int, device: torch.device, capture: bool):
        self.model, self.block_size, self.device = model, block_size, device
        self.buckets = prefill_buckets(max_tokens)
        n = self.buckets[-1]
        cuda = device.type == "cuda"
        self.host = torch.zeros(3 * n, dtype=torch.int64, pin_memory=cuda)
        self.dev = torch.zeros(3 * n, dtype=torch.int64, device=device) if cuda else self.host
        self.input_ids, self.positions, self.slots = self.dev.view(3, n)
        self._copied = torch.cuda.Event() if cuda else None
        self.metas = {t: self._meta(t) for t in self.buckets}  # made before any capture: they copy from the host
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if capture:
            self.capture()

    def _meta(self, t: int) -> AttnMetadata:
        """A batch of one fresh prompt of t rows: attention over its own keys (the dense plan), cache writes at the
        static slots (-1 for padding)."""
        dev = self.device
        return AttnMetadata(
            cu_query_lens=torch.tensor([0, t], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
            slot_mapping=self.slots[:t],
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=dev),  # the dense plan reads no table
            max_query_len=t,
            max_seq_len=t,
            query_lens_host=(t,),
            seq_lens_host=(t,),
            prefill_plan=PrefillPlan(decode_rows=None, decode_meta=None, groups=[], dense=(1, t)),
        )

    def _run(self, t: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:t], self.positions[:t], self.metas[t])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, with padding-only buffers (slot -1: warm-up and capture write no
        cache). The smaller graphs share the largest one's memory pool."""
        self.slots.fill_(-1)
        for t in reversed(self.buckets):
            self._run(t)  # warm-up outside the graph: Triton compiles these shapes, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._run(t)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[t] = (graph, hidden)
        torch.cuda.synchronize()

    def fits(self, out: SchedulerOutput) -> bool:
        """One sequence, its whole prompt from position 0 in this step, sampling at the end, within the buckets."""
        if len(out.scheduled) != 1:
            return False
        s = out.scheduled[0]
        n = s.num_new_tokens
        return s.start == 0 and s.samples and n == len(s.seq.token_ids) and 1 < n <= self.buckets[-1]

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """hidden [1, hidden_size] of the prompt's last token (a view of the graph's output: read it before the
        next replay). Call only when ``fits(out)``."""
        s = out.scheduled[0]
        seq, n = s.seq, s.num_new_tokens
        t = next(b for b in self.buckets if b >= n)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy out of the staging buffer has finished
        cap = self.buckets[-1]
        ids, pos, slots = self.host[:cap], self.host[cap : 2 * cap], self.host[2 * cap :]
        ids[:n] = torch.as_tensor(seq.token_ids[:n], dtype=torch.int64)
        ids[n:t] = 0
        pos[:t] = torch.arange(t)
        blocks = torch.as_tensor(seq.block_table, dtype=torch.int64)[pos[:n] // self.block_size]
        slots[:n] = blocks * self.block_size + pos[:n] % self.block_size
        slots[n:t] = -1
        if self._copied is not None:
            self.dev.copy_(self.host, non_blocking=True)
            self._copied.record()
        if t in self.graphs:
            graph, hidden = self.graphs[t]
            graph.replay()
        else:  # not captured (CPU): the same padded forward, eagerly
            hidden = self._run(t)
        return hidden[n - 1 : n]
