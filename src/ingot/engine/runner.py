"""ModelRunner: turns a scheduled step into model inputs, runs the model, and returns the logits that sample.

Decode steps (one new token per sequence) fill persistent buffers of max_num_seqs rows in place (``DecodeBuffers``:
a host staging copy, pinned on CUDA, then two host-to-device copies; on CPU the buffers are the host arrays). On CUDA
they replay a CUDA graph captured at the smallest bucket >= the batch (1, 2, 4, 8, 16, 24, 32, ..., max_num_seqs)
over those buffers: padded rows get slot -1 and seq_len 0 (they write no cache and produce zeros, per
ingot.layers.attention.AttnMetadata), and the graph runs the forward with no host work per layer (a decode of a
32-layer model launches ~1000 kernels; the graph launches one); compute_logits follows eagerly. Without graphs (CPU,
or a model whose forward syncs with the host) the same buffers feed an eager forward of exactly the batch and its
widest block table.

(DecodeBuffers, DecodeGraphs and PendingTokens live in decode_graphs.py; a lone fresh prompt's prefill may replay a
graph too: prefill_graphs.py.) Prefill and mixed steps build exact-size inputs (``build_inputs``: numpy on the host, one copy per dtype) and pass
the host copies of query and context lengths in the metadata, so attention plans the step without reading them back.

A forward that syncs with the host (a MoE layer on its per-expert loop - experts of a kind without a grouped-GEMM
kernel, or use_fused=False - counts tokens per expert; such models say so with ``supports_cuda_graphs = False``)
cannot be captured: decode then runs eagerly, with a warning, as it does when
a capture fails. The step's only device-to-host read is the sampled token ids (``Sampler.sample``).

Overlap: the engine launches step t + 1 before it reads step t's tokens, so a sequence's newest token may still be
on the device (``Sequence.num_pending``). Its row's input id is then copied on the device from the previous step's
sampled ids (``PendingTokens``): one slice copy in steady decoding (the same sequences in the same order), an
index copy otherwise. Every copy is queued on the one stream behind the previous step, so it reads finished ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ingot.engine.decode_graphs import DecodeBuffers, DecodeGraphs, PendingTokens
from ingot.engine.kv_cache import KVCache
from ingot.engine.prefill_graphs import PrefillGraphs
from ingot.engine.sampling import host_to_device
from ingot.engine.scheduler import SchedulerOutput
from ingot.layers.attention import AttnMetadata


@dataclass(frozen=True)
class RunnerConfig:
    max_num_seqs: int
    max_model_len: int
    cuda_graphs: bool = True
    prefill_graph_tokens: int = 0  # PrefillGraphs up to this many tokens (0: none)
    weight_prefetch_bytes: int = 0  # per linear, in small-batch decode graphs (engine/weight_prefetch.py; 0: none)


@dataclass
class StepInputs:
    """One step's model inputs. input_ids/positions: int64 [T]; meta: the attention batch; logits_rows: int64 [n]
    rows of the hidden states whose logits are sampled (each sampling sequence's last new token)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttnMetadata
    logits_rows: torch.Tensor


def build_inputs(out: SchedulerOutput, block_size: int, device: torch.device,
                 pending: PendingTokens | None = None) -> StepInputs:
    """Exact-size inputs of a scheduled step: built in numpy, one host-to-device copy per dtype (pinned on CUDA);
    pending tokens (a chunk ending at len(seq.token_ids) + 1) are copied in on the device from ``pending``."""
    scheduled = out.scheduled
    b = len(scheduled)
    qlens = [s.num_new_tokens for s in scheduled]
    ctxs = [s.start + s.num_new_tokens for s in scheduled]
    t = sum(qlens)
    width = max(len(s.seq.block_table) for s in scheduled)
    rows = []
    # int64: input_ids [T] | positions [T] | slot_mapping [T] | logits_rows [n]
    i64 = np.empty(3 * t + sum(s.samples for s in scheduled), dtype=np.int64)
    # int32: cu_query_lens [B + 1] | seq_lens [B] | block_tables [B, width] (padding: block 0, never read)
    i32 = np.zeros(2 * b + 1 + b * width, dtype=np.int32)
    table = i32[2 * b + 1 :].reshape(b, width)
    row = 0
    pending_rows, pending_seqs = [], []
    for i, s in enumerate(scheduled):
        seq, start, n = s.seq, s.start, s.num_new_tokens
        bt = seq.block_table
        pos = np.arange(start, start + n)
        known = seq.token_ids[start : start + n]
        i64[row : row + len(known)] = known
        if len(known) < n:  # the chunk ends with the pending token
            i64[row + n - 1] = 0
            pending_rows.append(row + n - 1)
            pending_seqs.append(seq)
        i64[t + row : t + row + n] = pos
        blocks = np.asarray(bt, dtype=np.int64)[pos // block_size]
        i64[2 * t + row : 2 * t + row + n] = blocks * block_size + pos % block_size
        table[i, : len(bt)] = bt
        row += n
        if s.samples:
            rows.append(row - 1)
    i64[3 * t :] = rows
    i32[1 : b + 1] = np.cumsum(qlens)
    i32[b + 1 : 2 * b + 1] = ctxs
    d64, d32 = torch.from_numpy(i64), torch.from_numpy(i32)
    if device.type == "cuda":  # pinned: a pageable copy may wait for the step still running
        d64 = d64.pin_memory().to(device, non_blocking=True)
        d32 = d32.pin_memory().to(device, non_blocking=True)
    if pending_rows:
        if pending is None:
            raise RuntimeError("build_inputs: a chunk ends with a pending token, and no PendingTokens were given")
        pending.copy_into(d64, pending_rows, pending_seqs)
    meta = AttnMetadata(
        cu_query_lens=d32[: b + 1],
        seq_lens=d32[b + 1 : 2 * b + 1],
        slot_mapping=d64[2 * t : 3 * t],
        block_tables=d32[2 * b + 1 :].view(b, width),
        max_query_len=max(qlens),
        max_seq_len=max(ctxs),
        query_lens_host=tuple(qlens),
        seq_lens_host=tuple(ctxs),
    )
    return StepInputs(d64[:t], d64[t : 2 * t], meta, d64[3 * t :])


class ModelRunner:
    """Runs a CausalLM (ingot.models contract) over scheduled steps with a bound paged KV cache."""

    def __init__(self, model, kv_cache: KVCache, config: RunnerConfig):
        self.model, self.kv_cache, self.config = model, kv_cache, config
        self.device = next(model.parameters()).device
        model.bind_kv_cache(kv_cache.caches)
        self.decode = DecodeBuffers(config.max_num_seqs, config.max_model_len, kv_cache.block_size, self.device)
        self.graphs = None
        self.graphs_error: str | None = None  # why decode runs eagerly although CUDA graphs were asked for
        if config.cuda_graphs and self.device.type == "cuda" and not getattr(model, "supports_cuda_graphs", True):
            self.graphs_error = "the model's decode step syncs with the host (model.supports_cuda_graphs is False)"
            logging.getLogger("ingot").warning("CUDA graphs off, decode runs eagerly: %s", self.graphs_error)
        elif config.cuda_graphs and self.device.type == "cuda":
            graphs = DecodeGraphs(model, self.decode, config.max_num_seqs, config.weight_prefetch_bytes)
            try:
                graphs.capture()
                self.graphs = graphs
            except RuntimeError as error:  # a host sync in the forward (MoE token counts): eager decode instead
                torch.cuda.synchronize()
                self.graphs_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                logging.getLogger("ingot").warning("CUDA graphs off, decode runs eagerly: capture failed (%s)",
                                                   self.graphs_error)
        self.prefill: PrefillGraphs | None = None  # one-prompt prefill graphs (captured on CUDA, eager on CPU)
        if config.prefill_graph_tokens and (self.device.type != "cuda" or self.graphs is not None):
            try:
                self.prefill = PrefillGraphs(model, config.prefill_graph_tokens, kv_cache.block_size, self.device,
                                             capture=self.graphs is not None)
            except RuntimeError as error:  # a host sync in the forward, or no memory left for the graphs
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                logging.getLogger("ingot").warning("prefill graphs off: capture failed (%s: %s)",
                                                   type(error).__name__, str(error).splitlines()[0][:200])

    def _decode_hidden(self, out: SchedulerOutput, pending: PendingTokens | None) -> torch.Tensor:
        b = len(out.scheduled)
        if self.graphs is not None:
            self.decode.fill(out.scheduled, self.graphs.bucket(b), pending)
            return self.graphs.replay(b)
        width, longest = self.decode.fill(out.scheduled, b, pending)
        buf = self.decode
        return self.model.forward(buf.input_ids[:b], buf.positions[:b], buf.meta(b, width, longest))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, pending: PendingTokens | None = None) -> torch.Tensor:
        """Run one step; float32 logits [n, vocab] of the sequences that sample, in scheduled order. ``pending``:
        the previous step's sampled ids, when some of this step's tokens were not read back yet. Only queues work
        on CUDA: nothing here waits for the device."""
        if not out.scheduled:
            raise ValueError("execute: an empty step")
        if getattr(self.model, "bound_kv_caches", None) is not self.kv_cache.caches:
            # another engine built on the same model bound its pool since our last step; our captured graphs hold
            # our pool's addresses, so the eager paths must write and read it too
            self.model.bind_kv_cache(self.kv_cache.caches)
        if out.is_decode and len(out.scheduled) <= self.config.max_num_seqs:
            hidden = self._decode_hidden(out, pending)
            if not all(s.samples for s in out.scheduled):  # a 1-token prefill chunk that does not end its prompt
                rows = [i for i, s in enumerate(out.scheduled) if s.samples]
                hidden = hidden.index_select(0, host_to_device(rows, torch.int64, hidden.device))
            return self.model.compute_logits(hidden)
        if self.prefill is not None and self.prefill.fits(out):
            return self.model.compute_logits(self.prefill.run(out))
        inputs = build_inputs(out, self.kv_cache.block_size, self.device, pending)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))
