"""A step reads the device exactly once (the sampled ids): no .item() / .tolist() / bool(tensor) / nonzero in the
scheduler, the runner, the model forward or the linears, in decode, prefill and mixed steps alike.

Counted on CPU with a TorchFunctionMode that sees every such call: on CPU they are cheap, on CUDA each one stalls
the host until the GPU drains. (int8 linears are left out: their CPU reference checks activations for NaN; on CUDA
they run Triton kernels, which a CUDA-graph capture shows to be sync-free.)"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model

TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.any, torch.Tensor.all}


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheme", ["bf16", "int4-group"])
def test_one_device_read_per_step(scheme):
    model = random_model(TINY, scheme, "cpu", dtype=torch.float32, seed=1)
    # budget 8: the long prompt first fills whole steps (no sample), then chunks mix with decodes; 3 decode together
    llm = LLM.from_model(model, max_num_seqs=4, max_model_len=64, block_size=4, max_num_batched_tokens=8)
    counts, sampled = [], []
    step = llm._step

    def counted(requests):
        mode = CountReads()
        with mode:
            touched = step(requests)
        counts.append(dict(mode.calls))
        sampled.append(len(touched))
        return touched

    llm._step = counted
    llm.generate([list(range(20)), [1, 2, 3], [5] * 9], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(counts) > 6 and 0 in sampled  # decodes, mixed steps, and a chunk that ends no prompt
    for c, n in zip(counts, sampled):
        assert c == ({"tolist": 1} if n else {}), c  # the sampled ids; a step that samples nothing reads nothing

