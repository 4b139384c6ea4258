"""DeepSeek-V3 parity with transformers: MLA in the absorbed form over a latent cache, group-routed MoE, YaRN.

Tiny random configs, float32, logits via ``score`` and via the paged forward. Bound: max |logit diff| <= 1e-4
(measured ~1e-6) and 100% top-1 agreement.
"""

from __future__ import annotations

import pytest
import torch
from _parity import hf_state_dict, load_from_hf, paged_vs_hf
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ingot.formats.base import QUANTIZABLE
from ingot.layers.attention import KVSpec
from ingot.layers.moe import MoE
from ingot.models import build_model

TOL = 1e-4
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
            max_position_embeddings=256, initializer_range=0.08)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

CASES = {
    # V3/R1 layout: q_lora, 4 groups of 2 experts, 2 groups kept, YaRN with mscale != mscale_all_dim (cos/sin scaled
    # by 0.96 and the softmax by 1.30), interleaved rope, routed_scaling_factor 2.5, normalized top-k weights
    "v3": dict(q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_parameters=YARN),
    # plain q_proj (q_lora_rank null), one group, unnormalized weights, half-layout rope, attention biases
    "q-proj": dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False,
                   attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def _hf(case: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**TINY, **CASES[case]})
    cfg._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # transformers zero-inits the correction bias; a random one tests that it steers selection only
        for layer in hf.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return hf


def _pair(case: str, seed: int = 0):
    hf = _hf(case, seed)
    model = build_model(hf.config.to_dict(), dtype=torch.float32)
    load_from_hf(model, hf)
    return model, hf


def _prompts(lengths=(11, 9, 3), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("case", list(CASES))
def test_score_matches_transformers(case):
    model, hf = _pair(case)
    ids = torch.tensor(_prompts(lengths=(13, 13)))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = model.score(ids)
    assert (ref - got).abs().max().item() <= TOL
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_paged_forward_matches_transformers(case):
    model, hf = _pair(case)
    with torch.no_grad():
        diff, agree, n = paged_vs_hf(model, hf, _prompts())
    assert n == 11 + 9 + 3 + 1 + 3 * 3
    assert diff <= TOL, f"max |logit diff| {diff:.3g}"
    assert agree == n


def test_latent_cache_spec_and_layers():
    model, hf = _pair("v3")
    a = model.args
    assert model.kv_cache_spec() == [KVSpec(1, a.kv_lora_rank + a.qk_rope_head_dim, a.kv_lora_rank, True)] * 3
    assert [isinstance(layer.mlp, MoE) for layer in model.model.layers] == [False, True, True]
    assert a.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    assert a.softmax_scale != pytest.approx(a.qk_head_dim**-0.5)  # YaRN's mscale^2 is in


def test_moe_layer_freq():
    """DeepSeek's own code puts MoE on layers >= first_k_dense_replace with layer % moe_layer_freq == 0."""
    cfg = {**_hf("v3").config.to_dict(), "num_hidden_layers": 6, "moe_layer_freq": 2}
    model = build_model(cfg, dtype=torch.float32)
    assert [isinstance(layer.mlp, MoE) for layer in model.model.layers] == [False, False, True, False, True, False]


def test_linear_kinds_and_names():
    """Every quantizable linear is an ingot Linear of linear_kind(prefix); the router and norms are not linears;
    parameter names are exactly the checkpoint's."""
    hf = _hf("v3")
    asked = []

    def kind(prefix):
        asked.append(prefix)
        return "int8-weight" if prefix.endswith("kv_b_proj") else "bf16"

    model = build_model(hf.config.to_dict(), dtype=torch.float32, linear_kind=kind)
    expected = {n.removesuffix(".weight") for n in hf_state_dict(hf) if QUANTIZABLE.match(n.removesuffix(".weight"))}
    assert set(asked) == expected and len(asked) == len(expected)
    assert model.model.layers[0].self_attn.kv_b_proj.kind == "int8-weight"
    names = {n for n, _ in model.named_parameters()}
    hf_names = set(hf_state_dict(hf))
    assert {n for n in names if "kv_b_proj" not in n} == {n for n in hf_names if "kv_b_proj" not in n}
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_mtp_layers_built_only_when_asked():
    cfg = _hf("v3").config.to_dict()
    assert cfg["num_nextn_predict_layers"] == 1
    plain = build_model(cfg, dtype=torch.float32)
    assert not any(n.startswith("model.layers.3.") for n, _ in plain.named_parameters())
    mtp = build_model(cfg, dtype=torch.float32, load_mtp=True)
    names = {n for n, _ in mtp.named_parameters() if n.startswith("model.layers.3.")}
    for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "self_attn.kv_b_proj.weight", "mlp.gate.weight", "mlp.experts.7.down_proj.weight",
              "input_layernorm.weight"):
        assert f"model.layers.3.{n}" in names
    assert len(mtp.kv_cache_spec()) == 3  # MTP layers are not run by forward


def test_quantized_kv_b_proj_is_absorbed_dequantized():
    """kv_b_proj stored int8-weight: the absorbed W_UK / W_UV come from its dequantized weight, so ingot equals
    transformers running the dequantized weights."""
    from ingot.formats.base import StoredLinear
    from ingot.quant import ref
    from ingot.quant.schemes import Scheme

    hf = _hf("v3")
    model = build_model(hf.config.to_dict(), dtype=torch.float32,
                        linear_kind=lambda p: "int8-weight" if p.endswith("kv_b_proj") else "bf16")
    state = hf_state_dict(hf)
    scheme = Scheme.from_name("int8-weight")
    for i, layer in enumerate(hf.model.layers):
        w = layer.self_attn.kv_b_proj.weight
        qw = ref.quantize_weight(w.detach(), scheme)
        with torch.no_grad():
            w.copy_(ref.dequantize_weight(qw))
        model.model.layers[i].self_attn.kv_b_proj.load(StoredLinear("int8-weight", qw.qweight, qw.scale))
        del state[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("kv_b_proj" in n for n in missing)
    model.process_weights_after_loading()
    ids = torch.tensor(_prompts(lengths=(13,)))
    with torch.no_grad():
        assert (hf(ids).logits - model.score(ids)).abs().max().item() <= TOL


@pytest.fixture
def interpreter():
    """Triton's interpreter on CPU (TRITON_INTERPRET=1, set by tests/conftest.py) with the kernel tests' fix for its
    run-time loop bounds (tests/kernels/conftest.py)."""
    import importlib.util
    import os
    from pathlib import Path

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (CPU-only run)")
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location(
        "_ingot_kernel_conftest", Path(__file__).resolve().parents[1] / "kernels" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._fix_interpreter_index()


def test_fused_moe_matches_transformers(interpreter):
    """The MoE layers on the fused grouped-GEMM path (the kernels, interpreted): the same logits as transformers,
    through score and the paged forward (prefill, mixed and padded decode steps)."""
    model, hf = _pair("v3")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(layers) == 2 and all(m.grouped_kind == "bf16" for m in layers) and model.supports_cuda_graphs
    for m in layers:
        m.use_fused = True
    ids = torch.tensor(_prompts(lengths=(13,)))
    with torch.no_grad():
        assert (hf(ids).logits.float() - model.score(ids)).abs().max().item() <= TOL
        diff, agree, n = paged_vs_hf(model, hf, _prompts(), decode_steps=1)
    assert diff <= TOL and agree == n, f"max |logit diff| {diff:.3g}"
