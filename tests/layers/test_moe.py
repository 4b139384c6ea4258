"""DeepSeek-V3 MoE against transformers' DeepseekV3TopkRouter / DeepseekV3MoE, and the sparse compute (only experts
that received tokens run)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from ingot.layers.linear import Linear
from ingot.layers.moe import MLP, MoE, MoEConfig


def _make_linear(prefix, k, n, bias):
    return Linear(k, n, bias, dtype=torch.float32)


def _configs(**overrides):
    base = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3,
                n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    base.update(overrides)
    hf = DeepseekV3Config(vocab_size=16, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, **base)
    return MoEConfig(**base), hf


def _hf_moe(hf_cfg, seed=0):
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(hf_cfg).float()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.uniform_(-0.5, 0.5)  # large enough to change which experts are picked
    return moe


def _ours_from(hf_moe, cfg):
    ours = MoE("model.layers.1.mlp", cfg, _make_linear, dtype=torch.float32)
    state = {"gate.weight": hf_moe.gate.weight, "gate.e_score_correction_bias": hf_moe.gate.e_score_correction_bias}
    inter = cfg.moe_intermediate_size
    for e in range(cfg.n_routed_experts):
        state[f"experts.{e}.gate_proj.weight"] = hf_moe.experts.gate_up_proj[e, :inter]
        state[f"experts.{e}.up_proj.weight"] = hf_moe.experts.gate_up_proj[e, inter:]
        state[f"experts.{e}.down_proj.weight"] = hf_moe.experts.down_proj[e]
    for name in ("gate_proj", "up_proj", "down_proj"):
        state[f"shared_experts.{name}.weight"] = getattr(hf_moe.shared_experts, name).weight
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("overrides", [{}, {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}, {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 6}])
def test_router_matches_transformers(overrides):
    cfg, hf_cfg = _configs(**overrides)
    hf = _hf_moe(hf_cfg)
    ours = _ours_from(hf, cfg)
    x = torch.randn(33, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    _, ref_w, ref_ids = hf.gate(x)
    w, ids = ours.gate(x)
    order_ref, order = ref_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, order_ref))  # the same experts (topk order aside)
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, order_ref), rtol=1e-6, atol=0)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64


def test_correction_bias_steers_selection_only():
    cfg, hf_cfg = _configs()
    ours = _ours_from(_hf_moe(hf_cfg), cfg)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    w, ids = ours.gate(x)
    bias = ours.gate.e_score_correction_bias.clone()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.zero_()
    w0, ids0 = ours.gate(x)
    assert not torch.equal(ids.sort(-1).values, ids0.sort(-1).values)  # the bias moved some choices
    scores = torch.sigmoid(x @ ours.gate.weight.T)
    picked = scores.gather(1, ids)
    assert torch.allclose(w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-6)  # weights: unbiased scores
    # group limit: every picked expert lies in one of the topk_group best groups by (biased) top-2 sums
    grouped = (scores + bias).view(64, cfg.n_group, -1)
    best = grouped.topk(2, -1).values.sum(-1).topk(cfg.topk_group, -1).indices
    group_of = ids // (cfg.n_routed_experts // cfg.n_group)
    assert all(set(group_of[t].tolist()) <= set(best[t].tolist()) for t in range(64))


@pytest.mark.parametrize("t", [1, 33])
def test_moe_matches_transformers(t):
    cfg, hf_cfg = _configs()
    hf = _hf_moe(hf_cfg)
    ours = _ours_from(hf, cfg)
    x = torch.randn(2, t, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(x)
        got = ours(x)
    assert got.shape == x.shape
    assert (ref - got).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_only_routed_experts_run():
    cfg, hf_cfg = _configs(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=2)
    ours = _ours_from(_hf_moe(hf_cfg), cfg)
    calls = [0] * cfg.n_routed_experts
    rows = [0] * cfg.n_routed_experts
    for e, expert in enumerate(ours.experts):
        def hook(module, args, e=e):
            calls[e] += 1
            rows[e] += args[0].shape[0]
        expert.register_forward_pre_hook(hook)
    x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours(x)
    assert sum(calls) == 2 and max(calls) == 1  # one token, top-2: two experts run, once each
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    _, ids = ours.gate(x)
    calls[:] = [0] * cfg.n_routed_experts
    rows[:] = [0] * cfg.n_routed_experts
    with torch.no_grad():
        ours(x)
    used = set(ids.flatten().tolist())
    assert {e for e, c in enumerate(calls) if c} == used and all(c <= 1 for c in calls)
    assert sum(rows) == 5 * 2  # each (token, expert) pair computed once: no dense all-experts pass


def test_names_and_dtypes():
    cfg, _ = _configs()
    moe = MoE("model.layers.3.mlp", cfg, _make_linear, dtype=torch.bfloat16)
    names = {n for n, _ in moe.named_parameters()}
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.15.down_proj.weight", "shared_experts.up_proj.weight"} <= names
    assert moe.gate.e_score_correction_bias.dtype == torch.float32 and moe.gate.weight.dtype == torch.bfloat16
    assert moe.shared_experts.up_proj.out_features == 2 * cfg.moe_intermediate_size
    assert isinstance(moe.experts[0], MLP)
    assert not isinstance(moe.gate, Linear)  # the router is never a quantizable linear
    seen = []
    MoE("p", cfg, lambda prefix, k, n, b: seen.append(prefix) or _make_linear(prefix, k, n, b))
    assert "p.experts.3.gate_proj" in seen and "p.shared_experts.down_proj" in seen and len(seen) == 3 * 17


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_group": 3}, "multiple of n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 16, "topk_group": 2}, "top-2"),
        ({"n_shared_experts": -1}, "n_shared_experts"),
    ],
)
def test_config_errors(overrides, match):
    base = dict(hidden_size=8, moe_intermediate_size=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **overrides})
