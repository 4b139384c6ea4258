"""The generation engine: small single-purpose classes over a paged KV cache.

``Sequence`` (one request's tokens and blocks), ``KVCache`` / ``BlockAllocator`` (the cache pool), ``Scheduler``
(continuous batching under a token budget, preemption by recompute), ``ModelRunner`` (inputs, CUDA-graph decode,
logits), ``Sampler`` (greedy / temperature / top-k / top-p, per-request seeds), ``LLM`` (generate and stream).
"""

from ingot.engine.config import EngineConfig
from ingot.engine.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "StreamDelta"]


def __getattr__(name: str):
    # LLM pulls in the models and transformers; importing SamplingParams alone stays light.
    if name in ("LLM", "RequestOutput", "StreamDelta"):
        from ingot.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'ingot.engine' has no attribute {name!r}")
