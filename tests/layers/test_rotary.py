"""RoPE against transformers: inverse frequencies and attention factors of every supported scaling bit for bit
(default, linear, llama3, yarn with and without mscale), the two rotation layouts, the YaRN softmax scale, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave, yarn_apply_mscale
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ingot.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary, rope_inv_freq, yarn_softmax_mscale

BASE = dict(vocab_size=32, hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=131072)
SCALINGS = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10000.0},
}


def _hf_config(params: dict):
    return LlamaConfig(**BASE, rope_parameters=dict(params))


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inv_freq_and_attention_factor_match_transformers(name):
    cfg = _hf_config(SCALINGS[name])
    rope = RopeScaling.from_hf_config(cfg.to_dict())
    assert rope.rope_type == SCALINGS[name]["rope_type"]
    dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    if name == "default":
        ref, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, factor = ROPE_INIT_FUNCTIONS[rope.rope_type](cfg)
    ours, our_factor = rope_inv_freq(dim, rope)
    assert ours.dtype == torch.float32 and ours.shape == (dim // 2,)
    assert torch.equal(ours, ref)
    assert our_factor == factor
    if name != "default":  # the scaling changed something (else the comparison proves little)
        assert not torch.equal(ours, rope_inv_freq(dim, RopeScaling(theta=rope.theta))[0])


def test_yarn_mscale_gives_a_cos_sin_factor_and_a_softmax_scale():
    rope = RopeScaling.from_hf_config(_hf_config(SCALINGS["yarn-mscale"]).to_dict())
    _, factor = rope_inv_freq(64, rope)
    assert factor == pytest.approx((0.1 * 0.707 * torch.tensor(40.0).log().item() + 1) / (0.1 * torch.tensor(40.0).log().item() + 1))
    scale = 192**-0.5
    assert scale * yarn_softmax_mscale(rope) == pytest.approx(yarn_apply_mscale(SCALINGS["yarn-mscale"], scale), rel=1e-15)
    assert yarn_softmax_mscale(rope) == pytest.approx(1.8739, abs=1e-4)  # DeepSeek-V3: (0.1 ln 40 + 1)^2
    assert yarn_softmax_mscale(RopeScaling.from_hf_config(_hf_config(SCALINGS["yarn"]).to_dict())) == 1.0


def test_legacy_rope_scaling_spelling():
    """``rope_scaling`` with ``type`` + a top-level ``rope_theta`` (transformers 4.x config.json) reads the same."""
    new = RopeScaling.from_hf_config({**BASE, "rope_parameters": dict(SCALINGS["llama3"])})
    params = {k: v for k, v in SCALINGS["llama3"].items() if k not in ("rope_type", "rope_theta")}
    old = RopeScaling.from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **params}})
    assert old == new
    # DeepSeek-V3's config.json: yarn without original_max_position_embeddings in a 4.x spelling still resolves it
    ds = RopeScaling.from_hf_config({"max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": {
        "type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1}})
    assert (ds.rope_type, ds.factor, ds.original_max_position_embeddings) == ("yarn", 40.0, 4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_layout_matches_transformers(dtype):
    cfg = _hf_config(SCALINGS["llama3"])
    positions = torch.tensor([[0, 1, 5, 17, 900, 8191, 70000]])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 7, 4, 128, generator=g).to(dtype)  # (B, T, H, D)
    k = torch.randn(1, 7, 2, 128, generator=g).to(dtype)
    cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_hf, sin_hf, unsqueeze_dim=2)
    cos, sin = RotaryEmbedding(128, RopeScaling.from_hf_config(cfg.to_dict()))(positions)
    assert torch.equal(cos.to(dtype), cos_hf[..., :64]) and torch.equal(sin.to(dtype), sin_hf[..., :64])
    assert torch.equal(apply_rotary(q, cos, sin), q_ref)
    assert torch.equal(apply_rotary(k, cos, sin), k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_layout_matches_transformers_deepseek(dtype):
    cfg = DeepseekV3Config(vocab_size=32, hidden_size=64, num_attention_heads=4, qk_rope_head_dim=64,
                           max_position_embeddings=163840, rope_parameters=dict(SCALINGS["yarn-mscale"]))
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    positions = torch.tensor([[0, 3, 4095, 4096, 100000]])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 64, generator=g).to(dtype)  # (B, H, T, D): transformers' layout
    k = torch.randn(1, 1, 5, 64, generator=g).to(dtype)
    cos_hf, sin_hf = DeepseekV3RotaryEmbedding(cfg)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb_interleave(q, k, cos_hf, sin_hf)
    cos, sin = RotaryEmbedding(64, RopeScaling.from_hf_config(cfg.to_dict()))(positions)
    ours_q = apply_rotary(q.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
    ours_k = apply_rotary(k.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
    assert torch.equal(ours_q, q_ref) and torch.equal(ours_k, k_ref)
    # the layouts differ: the half layout on the same input gives other values
    assert not torch.equal(apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2), q_ref)


def test_rotation_preserves_relative_position():
    """q(m) . k(n) depends on m - n only: the property RoPE exists for (both layouts)."""
    rope = RotaryEmbedding(32, RopeScaling())
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 32, generator=g, dtype=torch.float64), torch.randn(1, 1, 32, generator=g, dtype=torch.float64)
    for interleaved in (False, True):
        dots = []
        for m, n in ((7, 3), (104, 100), (4, 0)):
            cq, sq = rope(torch.tensor([m]))
            ck, sk = rope(torch.tensor([n]))
            dots.append((apply_rotary(q, cq.double(), sq.double(), interleaved) * apply_rotary(k, ck.double(), sk.double(), interleaved)).sum().item())
        assert dots[0] == pytest.approx(dots[1], rel=1e-4) and dots[0] == pytest.approx(dots[2], rel=1e-4)  # fp32 angles


@pytest.mark.parametrize(
    "params, match",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic.*longest sequence"),
        ({"rope_type": "longrope", "factor": 2.0}, "longrope"),
        ({"rope_type": "su"}, "unknown rope type"),
        ({"rope_type": "linear"}, "factor must be positive"),
        ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_refusals_name_the_field(params, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling.from_hf_config({**BASE, "rope_scaling": params})


def test_odd_dim_refused():
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(63, RopeScaling())
