"""Engine settings (EngineConfig, the CLI's flags) and what they resolve to for one model on one device (EnginePlan):
batch limits, max_model_len, and the KV pool's size."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ingot.engine.kv_cache import cuda_num_blocks, kv_bytes_per_token, reserve_bytes
from ingot.engine.weight_prefetch import DEFAULT_PREFETCH_MB

# Defaults where the GPU's memory does not decide: CPU runs a handful of sequences of modest length.
CUDA_MAX_NUM_SEQS = 256
CPU_MAX_NUM_SEQS = 16
CPU_MAX_MODEL_LEN = 2048
CUDA_MAX_NUM_BATCHED_TOKENS = 8192  # a prefill chunk: enough to saturate the tensor cores, bounded activations
CPU_MAX_NUM_BATCHED_TOKENS = 1024
# A lone prompt of up to this many tokens prefills from a captured CUDA graph (engine/prefill_graphs.py): Llama-3-8B
# 1 x 128 tokens on the H100, TTFT 42.0 -> 7.5 ms (bf16) and 42.4 -> 5.5 ms (int8-channel), engine NOTES.
CUDA_PREFILL_GRAPH_TOKENS = 512


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. None = decided from the device and the model (``plan_engine``)."""

    device: str | None = None
    dtype: torch.dtype | None = None
    mem_fraction: float = 0.85
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # override the memory-derived pool size (tests, benchmarks)
    cuda_graphs: bool = True
    async_steps: bool = True  # queue step t + 1 before reading step t's tokens (host work overlaps the GPU's)
    # CUDA graphs for a step that is one whole fresh prompt of up to this many tokens (engine/prefill_graphs.py;
    # the batch-1 TTFT, host-bound when eager). 0: off; None: CUDA_PREFILL_GRAPH_TOKENS on CUDA, off on CPU (where
    # nothing is captured and a padded prefill would only cost).
    prefill_graph_tokens: int | None = None
    # Decode graphs of up to PREFETCH_MAX_BATCH rows pull the next int8 W8A8 linear's first MB of weight into L2 while
    # the kernels before it run (engine/weight_prefetch.py). 0: off; None: DEFAULT_PREFETCH_MB (it does nothing
    # without CUDA graphs or on GPUs before sm_90).
    weight_prefetch_mb: int | None = None
    fp8_fallback: str = "int8-block"
    seed: int = 0  # seeds the generators of sampled requests that bring no seed

    def __post_init__(self) -> None:
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"EngineConfig.mem_fraction must be in (0, 1], got {self.mem_fraction}")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "num_kv_blocks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be an int >= 1 or None, got {v!r}")
        for name in ("prefill_graph_tokens", "weight_prefetch_mb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"EngineConfig.{name} must be an int >= 0 or None, got {v!r}")
        if self.block_size < 1:
            raise ValueError(f"EngineConfig.block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class EnginePlan:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int
    cache_dtype: torch.dtype
    prefill_graph_tokens: int  # 0: no prefill graphs
    weight_prefetch_bytes: int = 0  # per linear in small-batch decode graphs (0: none)


def cache_dtype(model) -> torch.dtype:
    """The model's activation dtype: that of its first floating-point parameter of >= 2 bytes (the embedding;
    quantized linears hold int8/fp8 weights and float32 scales, which never come first in ingot models)."""
    for _, t in model.named_parameters():
        if t.is_floating_point() and t.element_size() >= 2:
            return t.dtype
    raise ValueError("model has no floating-point parameters to take the KV cache dtype from")


def dequant_scratch_bytes(model) -> int:
    """The largest transient weight copy a forward makes: weight-only linears (int8-weight, int4-group) dequantize
    their weight to the model dtype at prefill sizes (ingot.kernels.weight_only, DEQUANT_MIN_M) - 235 MB for
    Llama-3-8B's gate_up_proj. 0 for models without them."""
    from ingot.layers.linear import Linear

    return max((m.out_features * m.in_features * torch.empty((), dtype=m.params_dtype).element_size()
                for m in model.modules()
                if isinstance(m, Linear) and m.method.kind in ("int8-weight", "int4-group")), default=0)


def plan_engine(model, config: EngineConfig, device: torch.device) -> EnginePlan:
    """Resolve the config for ``model`` on ``device``.

    CUDA: the KV pool takes mem_fraction of the GPU's memory minus what is allocated (the weights) and an
    activation reserve (``kv_cache.reserve_bytes``, plus ``dequant_scratch_bytes``); max_model_len defaults to the
    config's max_position_embeddings, capped by the pool; prefill graphs (their activations are held by the graphs'
    own memory pool) add to the reserve. CPU: the pool holds max_num_seqs x max_model_len tokens (max_model_len <=
    2048 by default). num_kv_blocks overrides the pool size. The pool must hold one sequence of max_model_len.
    """
    cuda = device.type == "cuda"
    max_pos = int(model.config.get("max_position_embeddings") or 2**31)
    max_num_seqs = config.max_num_seqs or (CUDA_MAX_NUM_SEQS if cuda else CPU_MAX_NUM_SEQS)
    batched = config.max_num_batched_tokens or (CUDA_MAX_NUM_BATCHED_TOKENS if cuda else CPU_MAX_NUM_BATCHED_TOKENS)
    batched = max(batched, max_num_seqs)  # a decode step of every sequence always fits the budget
    specs = model.kv_cache_spec()
    dtype = cache_dtype(model)
    bs = config.block_size
    cap = max_pos if cuda else min(max_pos, CPU_MAX_MODEL_LEN)
    prefill_graphs = config.prefill_graph_tokens
    if prefill_graphs is None:
        prefill_graphs = CUDA_PREFILL_GRAPH_TOKENS if cuda and config.cuda_graphs else 0
    prefill_graphs = min(prefill_graphs, batched)  # a graph step is one prefill step; max_model_len caps it below
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif cuda:
        reserve = reserve_bytes(batched + prefill_graphs, max_num_seqs, int(model.config["vocab_size"]))
        reserve += dequant_scratch_bytes(model)
        num_blocks = cuda_num_blocks(specs, bs, dtype, device, config.mem_fraction, reserve)
    else:
        num_blocks = max_num_seqs * math.ceil((config.max_model_len or cap) / bs)
    max_model_len = config.max_model_len or min(cap, num_blocks * bs)
    if num_blocks * bs < max_model_len or max_model_len < 2:
        raise ValueError(
            f"KV cache of {num_blocks} blocks x {bs} tokens ({kv_bytes_per_token(specs, dtype)} B per token) cannot "
            f"hold one sequence of max_model_len {max_model_len}: lower max_model_len or raise mem_fraction"
        )
    prefill_graphs = min(prefill_graphs, max_model_len)
    prefetch_mb = DEFAULT_PREFETCH_MB if config.weight_prefetch_mb is None else config.weight_prefetch_mb
    prefetch = prefetch_mb * 2**20 if cuda and config.cuda_graphs else 0
    return EnginePlan(max_num_seqs, batched, max_model_len, bs, num_blocks, dtype, prefill_graphs, prefetch)


def eos_token_ids(model_dir: Path, tokenizer) -> tuple[int, ...]:
    """eos ids from generation_config.json (an int or a list) and the tokenizer's eos token."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))
