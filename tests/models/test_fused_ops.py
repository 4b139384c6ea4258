"""The engine's fused forms over whole models (``CausalLM.set_fused_ops``, turned on by ``fuse_projections``): the
residual adds inside the norms, the norms and silu * up emitting their W8A8 linears' quantized inputs. With every
kernel forced on (Triton's interpreter on CPU), the logits with the fusions on equal those with them off bit for
bit, and the activation-quantization launches drop to one per layer (o_proj's); on the CPU torch path the fused
residual stream is bit-identical to the plain forward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ingot.kernels import act_quant, norm_rope, silu_mul
from ingot.layers import linear as L
from ingot.layers.linear import Linear
from ingot.layers.moe import MLP, MoE
from ingot.layers.norm import RMSNorm
from ingot.models.loader import random_model

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# 192 channels: ragged groups of 128, and q/k/v/gate/up that fuse_linears keeps apart for block kinds (N % 128)
LLAMA_RAGGED = {**LLAMA, "hidden_size": 192, "intermediate_size": 320, "num_attention_heads": 3,
                "num_key_value_heads": 1}
DSV3 = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "kv_lora_rank": 64, "q_lora_rank": 96, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1, "max_position_embeddings": 64}


@pytest.fixture
def interpreter():
    import os

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (CPU-only run)")
    path = Path(__file__).resolve().parents[1] / "kernels" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_ingot_kernel_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._fix_interpreter_index()


@pytest.fixture
def launches(monkeypatch):
    """Counts of the activation-producing launches by name (wrapping the kernel modules' public functions, which the
    layers import at call time)."""
    counts: dict[str, int] = {}

    def wrap(module, name):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module, names in ((act_quant, ("per_token_quant_int8", "per_token_group_quant")),
                          (norm_rope, ("rms_norm", "fused_add_rms_norm", "rms_norm_quant")),
                          (silu_mul, ("silu_mul", "silu_mul_quant"))):
        for name in names:
            wrap(module, name)
    return counts


def _model(config: dict, scheme: str):
    model = random_model(config, scheme, "cpu", dtype=torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # norm weights of 1 would hide a weight applied twice or not at all
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
    return model


def _force_kernels(model, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, Linear):
            m.method.use_kernels = on
        elif isinstance(m, (RMSNorm, MLP)):
            m.use_kernels = on
        elif isinstance(m, MoE):
            m.use_fused = on


def _ids(config: dict) -> torch.Tensor:
    return torch.randint(0, config["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))


def _quant_launches(counts: dict[str, int]) -> int:
    return counts.get("per_token_quant_int8", 0) + counts.get("per_token_group_quant", 0)


@pytest.mark.parametrize("config, scheme", [(LLAMA, "int8-channel"), (LLAMA, "int8-block"),
                                            (LLAMA_RAGGED, "int8-block"), (LLAMA, "fp8-block-ue8m0"),
                                            (LLAMA, "bf16")],
                         ids=["int8-channel", "int8-block", "int8-block-ragged", "fp8-ue8m0", "bf16"])
def test_llama_fusions_keep_the_logits(config, scheme, interpreter, launches, monkeypatch):
    if scheme.startswith("fp8"):
        monkeypatch.setattr(L, "fp8_unsupported_reason", lambda device: None)
    model = _model(config, scheme)
    model.fuse_projections()  # the engine's set-up: fused projections, fused ops on
    _force_kernels(model)
    ids = _ids(config)
    fused = model.score(ids)
    fused_launches = dict(launches)
    launches.clear()
    model.set_fused_ops(False)
    unfused = model.score(ids)
    assert torch.equal(fused, unfused)
    layers = config["num_hidden_layers"]
    if scheme != "bf16":
        separate = 7 if config is LLAMA_RAGGED else 4  # q, k, v, o, gate, up, down vs qkv, o, gate_up, down
        assert _quant_launches(launches) == separate * layers
        assert _quant_launches(fused_launches) == layers  # o_proj only
        assert fused_launches["rms_norm_quant"] == 2 * layers and fused_launches["silu_mul_quant"] == layers
    else:
        assert fused_launches["fused_add_rms_norm"] == 2 * layers  # layer 0's input norm has nothing to add; +final
        assert fused_launches["rms_norm"] == 1 and fused_launches["silu_mul"] == layers
    # the kernels (interpreted) against the CPU reference path: bf16 rounding of the same math
    _force_kernels(model, False)
    model.set_fused_ops(True)
    reference = model.score(ids)
    assert (fused - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.mark.parametrize("scheme", ["int8-channel", "int8-block"])
def test_deepseek_fusions_keep_the_logits(scheme, interpreter, launches):
    """MLA (q_lora: q_a/kv_a read one quantized input, q_a_layernorm quantizes for q_b), a dense MLP, a MoE layer
    (its router reads the norm's tensor; the grouped path's silu * up is quantized in one launch, fused or not)."""
    model = _model(DSV3, scheme)
    model.process_weights_after_loading()
    model.fuse_projections()
    _force_kernels(model)
    ids = _ids(DSV3)
    fused = model.score(ids)
    fused_launches = dict(launches)
    launches.clear()
    model.set_fused_ops(False)
    unfused = model.score(ids)
    assert torch.equal(fused, unfused)
    # per layer, unfused: q_a, kv_a, q_b, o + (dense: gate_up, down | MoE: routed gate_up, shared gate_up, shared down)
    assert _quant_launches(launches) == (4 + 2) + (4 + 3)
    # fused: o_proj x 2, and in the MoE layer the routed experts' and the shared expert's gate_up (the router reads
    # the norm's output, so the norm emits a tensor there)
    assert _quant_launches(fused_launches) == 2 + 2
    # the input norms of both layers, both q_a_layernorms, the dense layer's post-attention norm
    assert fused_launches["rms_norm_quant"] == 5
    assert fused_launches["fused_add_rms_norm"] == 2  # the MoE layer's post-attention norm, the final norm
    assert fused_launches["silu_mul_quant"] == 3  # dense MLP, routed experts, shared expert
    assert launches["silu_mul_quant"] == 1  # unfused: the routed experts' (MoE's own, always one launch)


@pytest.mark.parametrize("config", [LLAMA, DSV3], ids=["llama", "deepseek_v3"])
def test_cpu_residual_stream_is_bit_identical(config):
    """The torch path (CPU, float32 and bf16): the fused residual stream does the same adds."""
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(config, "int8-channel", "cpu", dtype=dtype, seed=1)
        ids = _ids(config)
        plain = model.score(ids)
        model.set_fused_ops(True)
        assert torch.equal(model.score(ids), plain)


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("config, scheme", [(LLAMA, "int8-channel"), (LLAMA, "int8-block"), (LLAMA, "fp8-block"),
                                            (LLAMA, "fp8-block-ue8m0"), (LLAMA, "bf16"), (LLAMA_RAGGED, "int8-block"),
                                            (DSV3, "int8-channel"), (DSV3, "fp8-block")])
def test_gpu_fusions_keep_the_logits(config, scheme, launches):
    """On CUDA (every kernel compiled): fusions on and off give the same logits bit for bit (the fused norm reduces
    in the same order as rms_norm, silu_mul_quant quantizes silu_mul's bits), with fewer quantization launches."""
    model = random_model(config, scheme, "cuda", dtype=torch.bfloat16, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g, device="cuda"))
    model.process_weights_after_loading()
    model.fuse_projections()
    ids = _ids(config).cuda()
    fused = model.score(ids)
    fused_quant = _quant_launches(launches)
    launches.clear()
    model.set_fused_ops(False)
    unfused = model.score(ids)
    assert torch.equal(fused, unfused)
    if scheme != "bf16":
        assert fused_quant < _quant_launches(launches)
    assert torch.isfinite(fused).all()
