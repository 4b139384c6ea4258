"""ModelRunner: turns a scheduled step into model inputs, runs the model, and returns the logits that sample.

Eager steps (prefill, mixed, and everything on CPU) build exact-size inputs. Decode steps on CUDA replay a CUDA
graph captured at the smallest bucket >= the batch (1, 2, 4, 8, 16, 24, 32, ..., max_num_seqs): the step's inputs
are copied into static buffers, padded rows get slot -1 and seq_len 0 (they write no cache and produce zeros, per
ingot.layers.attention.AttnMetadata), and the graph runs the forward with no host work per layer (a decode of a
30-layer model launches hundreds of kernels; the graph launches one); compute_logits follows eagerly. A forward
that syncs with the host (DeepSeek's MoE counts tokens per expert; such models say so with
``supports_cuda_graphs = False``) cannot be captured: decode then runs eagerly, with a warning, as it does when
a capture fails.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ingot.engine.kv_cache import KVCache
from ingot.engine.scheduler import SchedulerOutput
from ingot.layers.attention import AttnMetadata


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, then every 8 up to 32, then every 16 (a batch of 33 pads
    to 48, not 64), always ending at max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    b = 8
    while b < max_num_seqs:
        sizes.append(b)
        b += 8 if b < 32 else 16
    return sizes + [max_num_seqs]


@dataclass(frozen=True)
class RunnerConfig:
    max_num_seqs: int
    max_model_len: int
    cuda_graphs: bool = True


@dataclass
class StepInputs:
    """One step's model inputs. input_ids/positions: int64 [T]; meta: the attention batch; logits_rows: int64 [n]
    rows of the hidden states whose logits are sampled (each sampling sequence's last new token)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttnMetadata
    logits_rows: torch.Tensor


def build_inputs(out: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    """Exact-size inputs of a scheduled step (host lists, one copy per tensor)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    cu = [0]
    seq_lens: list[int] = []
    rows: list[int] = []
    width = max(len(s.seq.block_table) for s in out.scheduled)
    tables = []
    for s in out.scheduled:
        seq, start, n = s.seq, s.start, s.num_new_tokens
        ids.extend(seq.token_ids[start : start + n])
        pos.extend(range(start, start + n))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        cu.append(cu[-1] + n)
        seq_lens.append(start + n)
        tables.append(table + [0] * (width - len(table)))
        if s.samples:
            rows.append(cu[-1] - 1)

    def tensor(data, dtype):
        return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)

    meta = AttnMetadata(
        cu_query_lens=tensor(cu, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        slot_mapping=tensor(slots, torch.int64),
        block_tables=tensor(tables, torch.int32),
        max_query_len=max(s.num_new_tokens for s in out.scheduled),
        max_seq_len=max(seq_lens),
    )
    return StepInputs(tensor(ids, torch.int64), tensor(pos, torch.int64), meta, tensor(rows, torch.int64))


class _DecodeGraphs:
    """Static decode buffers of max_num_seqs rows and one captured graph per bucket (views of those buffers)."""

    def __init__(self, model, config: RunnerConfig, block_size: int, device: torch.device):
        self.model, self.block_size = model, block_size
        n, self.max_blocks = config.max_num_seqs, math.ceil(config.max_model_len / block_size)
        self.max_model_len = config.max_model_len
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.cu_query_lens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.buckets = graph_buckets(n)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> AttnMetadata:
        return AttnMetadata(
            cu_query_lens=self.cu_query_lens[: b + 1], seq_lens=self.seq_lens[:b], slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b], max_query_len=1, max_seq_len=self.max_model_len,
        )

    def _run(self, b: int) -> torch.Tensor:
        """The forward of bucket b over the static buffers: hidden [b, hidden_size]."""
        return self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller graphs then fit in the largest one's memory pool).
        The buffers hold padding (slot -1, seq_len 0) while capturing: warm-up and capture write no cache.
        Graphs hold the forward only: their outputs stay allocated, and hidden states of every bucket take
        sum(buckets) x hidden x 2 B (18 MB for Llama-3-8B up to 256), where logits would take 1.1 GB; the lm_head
        GEMM runs after the replay."""
        for b in reversed(self.buckets):
            self._run(b)  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._run(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize()

    def fill(self, out: SchedulerOutput) -> int:
        """Copy a decode step into the static buffers, padded to its bucket; returns the bucket."""
        b = len(out.scheduled)
        bucket = next(x for x in self.buckets if x >= b)
        ids, pos, slots, lens = [], [], [], []
        # Only the columns this batch uses are copied (256 rows x 512 blocks would be 512 KB a step); columns past
        # them keep stale but valid block ids, which are never read (masked by seq_lens).
        width = max(len(s.seq.block_table) for s in out.scheduled)
        table = np.zeros((bucket, width), dtype=np.int32)
        for i, s in enumerate(out.scheduled):
            p = s.start  # the one new token's position
            bt = s.seq.block_table
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(bt[p // self.block_size] * self.block_size + p % self.block_size)
            lens.append(p + 1)
            table[i, : len(bt)] = bt
        pad = bucket - b
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad, lens + [0] * pad], dtype=torch.int64)
        host = host.to(self.input_ids.device, non_blocking=True)
        self.input_ids[:bucket].copy_(host[0])
        self.positions[:bucket].copy_(host[1])
        self.slot_mapping[:bucket].copy_(host[2])
        self.seq_lens[:bucket].copy_(host[3])
        table_dev = torch.from_numpy(table).to(self.block_tables.device, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(table_dev)
        return bucket

    def replay(self, out: SchedulerOutput) -> torch.Tensor:
        """hidden [B, hidden_size] of a decode step (a view of the graph's output: read it before the next replay)."""
        graph, hidden = self.graphs[self.fill(out)]
        graph.replay()
        return hidden[: len(out.scheduled)]


class ModelRunner:
    """Runs a CausalLM (ingot.models contract) over scheduled steps with a bound paged KV cache."""

    def __init__(self, model, kv_cache: KVCache, config: RunnerConfig):
        self.model, self.kv_cache, self.config = model, kv_cache, config
        self.device = next(model.parameters()).device
        model.bind_kv_cache(kv_cache.caches)
        self.graphs = None
        self.graphs_error: str | None = None  # why decode runs eagerly although CUDA graphs were asked for
        if config.cuda_graphs and self.device.type == "cuda" and not getattr(model, "supports_cuda_graphs", True):
            self.graphs_error = "the model's decode step syncs with the host (model.supports_cuda_graphs is False)"
            logging.getLogger("ingot").warning("CUDA graphs off, decode runs eagerly: %s", self.graphs_error)
        elif config.cuda_graphs and self.device.type == "cuda":
            graphs = _DecodeGraphs(model, config, kv_cache.block_size, self.device)
            try:
                graphs.capture()
                self.graphs = graphs
            except RuntimeError as error:  # a host sync in the forward (MoE token counts): eager decode instead
                torch.cuda.synchronize()
                self.graphs_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                logging.getLogger("ingot").warning("CUDA graphs off, decode runs eagerly: capture failed (%s)",
                                                   self.graphs_error)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; float32 logits [n, vocab] of the sequences that sample, in scheduled order."""
        if not out.scheduled:
            raise ValueError("execute: an empty step")
        if self.graphs is not None and out.is_decode and len(out.scheduled) <= self.config.max_num_seqs:
            return self.model.compute_logits(self.graphs.replay(out))
        inputs = build_inputs(out, self.kv_cache.block_size, self.device)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))
