"""Weight prefetch in decode graphs (ingot.engine.weight_prefetch): which weight follows which linear, the config,
and on the GPU that the prefetched graphs give the same tokens and logits as graphs without."""

from __future__ import annotations

import pytest
import torch

from ingot.engine.config import EngineConfig
from ingot.engine.weight_prefetch import WeightPrefetch, prefetch_plan, streamed_weight
from ingot.layers.linear import Linear

LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _linear(kind, n=64, k=128):
    lin = Linear(k, n, kind=kind, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.ones_like(p))
    return lin


def test_streamed_weight_is_the_largest_parameter():
    assert streamed_weight(_linear("int8-channel")).dtype == torch.int8
    int4 = _linear("int4-group")
    assert streamed_weight(int4) is int4.weight_packed
    assert streamed_weight(_linear("bf16")).shape == (64, 128)


def test_plan_prefetches_the_next_int8_linear():
    a, b, c, d = _linear("int8-channel"), _linear("bf16"), _linear("int8-block"), _linear("int4-group")
    e = _linear("int8-weight")
    plan = prefetch_plan([a, b, c, d, a, e, c])
    assert len(plan) == 7
    assert plan[0] is None  # b is bf16
    assert plan[1] is c.weight
    assert plan[2] is None  # d is int4-group (measured slower with prefetches)
    assert plan[3] is a.weight
    assert plan[4] is e.weight  # int8-weight: measured faster once its GEMV was the Gluon kernel
    assert plan[5] is c.weight
    assert plan[6] is None  # the last call
    assert prefetch_plan([]) == []


def test_recording_follows_the_forward_order():
    """The plan follows call order, not module order, and hooks are gone afterwards."""
    first, second = _linear("int8-channel", 128, 128), _linear("int8-channel", 128, 128)
    third = _linear("bf16", 128, 128)
    model = torch.nn.ModuleDict({"first": first, "second": second, "third": third})
    pf = WeightPrefetch(model, 1 << 20, torch.device("cpu"))
    x = torch.ones(1, 128)
    with pf.recording():
        first(third(second(x)))
    assert pf.plan == [None, first.weight, None]  # second -> third (bf16: none) -> first -> end
    assert all(not m._forward_hooks for m in (first, second, third))


def test_inactive_off_the_gpu_and_at_zero_bytes():
    assert not WeightPrefetch.active(torch.device("cpu"), 1 << 20)
    if torch.cuda.is_available():
        assert not WeightPrefetch.active(torch.device("cuda"), 0)


def test_config_validates_the_prefetch_size():
    EngineConfig(weight_prefetch_mb=0)
    EngineConfig(weight_prefetch_mb=None)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="weight_prefetch_mb"):
            EngineConfig(weight_prefetch_mb=bad)


def test_cpu_engine_plans_no_prefetch():
    from ingot.engine import LLM
    from ingot.models.loader import random_model

    model = random_model(LLAMA, "int8-channel", "cpu", dtype=torch.float32, seed=0)
    llm = LLM.from_model(model, max_model_len=64, max_num_seqs=2)
    assert llm.plan.weight_prefetch_bytes == 0


@pytest.mark.gpu
def test_l2_prefetch_leaves_data_alone_and_takes_any_size():
    from ingot.kernels.l2_prefetch import l2_prefetch, supported

    if not supported(torch.device("cuda")):
        pytest.skip("bulk L2 prefetch needs sm_90+")
    for numel, nbytes in ((1, None), (7, None), (4096 * 4096, None), (4096 * 4096, 3 << 20), (1000, 10**9), (64, 8)):
        t = torch.randint(-128, 128, (numel,), dtype=torch.int8, device="cuda")
        before = t.clone()
        l2_prefetch(t, nbytes)
        torch.cuda.synchronize()
        assert torch.equal(t, before)
    with pytest.raises(ValueError, match="not contiguous"):
        l2_prefetch(torch.zeros(64, 64, device="cuda").t())


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8-channel", "int8-block", "int8-weight", "int4-group"])
def test_prefetched_graphs_equal_plain_graphs(scheme):
    """Same random Llama, engines with and without prefetch: identical greedy tokens, and the graphs of buckets up to
    PREFETCH_MAX_BATCH (only) launch one prefetch per int8 linear but the last (none for weight-only int4)."""
    from ingot.engine import LLM, SamplingParams
    from ingot.engine.weight_prefetch import PREFETCH_MAX_BATCH
    from ingot.kernels.l2_prefetch import supported
    from ingot.models.loader import random_model

    if not supported(torch.device("cuda")):
        pytest.skip("bulk L2 prefetch needs sm_90+")
    model = random_model(LLAMA, scheme, "cuda", dtype=torch.bfloat16, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 33, 16, 90, 3, 64, 5, 12)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (20, 5, 12, 1, 8, 30, 2, 17, 9)]
    outs = {}
    for mb in (0, 1):
        # a fixed pool: the first engine's cache stays bound to the model, so the second cannot size one from free
        # memory
        llm = LLM.from_model(model, max_model_len=256, max_num_seqs=32, num_kv_blocks=256, weight_prefetch_mb=mb)
        graphs = llm.runner.graphs
        assert graphs is not None, llm.runner.graphs_error
        if mb:
            # one per linear of the decoder layers (after fusion: qkv, o, gate_up, down; int8-block keeps q / k / v
            # apart here, k and v being 64 rows) but the last; the lm_head runs after the graph
            linears = sum(isinstance(m, Linear) for m in model.model.layers.modules())
            want = 0 if scheme == "int4-group" else linears - 1
            assert graphs.prefetched == {b: want for b in graphs.buckets if b <= PREFETCH_MAX_BATCH}
        else:
            assert graphs.prefetch is None and graphs.prefetched == {}
        outs[mb] = [o.token_ids for o in llm.generate(prompts, params)]
        del llm
    assert outs[0] == outs[1]
