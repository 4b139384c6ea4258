"""build_model: dispatch and refusals, linear kinds per prefix, quantized linears inside a model, tied embeddings,
args validation, and a whole decode step without host syncs (CUDA-graph safety, checked on the meta device)."""

from __future__ import annotations

import pytest
import torch
from _parity import hf_state_dict
from transformers import DeepseekV3Config, LlamaConfig, LlamaForCausalLM

from ingot.formats.base import QUANTIZABLE, StoredLinear
from ingot.layers.attention import AttnMetadata
from ingot.layers.linear import Linear
from ingot.models import LlamaArgs, build_model, model_type
from ingot.quant import ref
from ingot.quant.schemes import Scheme

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
DSV3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, max_position_embeddings=128)


def test_dispatch_and_refusals():
    assert model_type({"architectures": ["Qwen2ForCausalLM"]}) == "qwen2"
    assert model_type({"model_type": "deepseek_v3"}) == "deepseek_v3"
    with pytest.raises(ValueError, match="model_type 'gpt2'.*GPT2LMHeadModel.*llama, mistral, qwen2, qwen3, deepseek_v3"):
        build_model({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="model_type None"):
        build_model({"architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ValueError, match="missing field.*intermediate_size"):
        build_model({k: v for k, v in LLAMA.items() if k != "intermediate_size"})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"head_dim": 15}, "head_dim 15 must be even"),
        ({"hidden_size": 66}, "hidden_size 66 is not a multiple"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
    ],
)
def test_llama_args_validation(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaArgs.from_hf_config({**LLAMA, **change})


@pytest.mark.parametrize("change, match", [({"scoring_func": "softmax"}, "scoring_func"), ({"topk_method": "greedy"}, "topk_method"),
                                           ({"n_group": 3}, "n_group")])
def test_deepseek_args_validation(change, match):
    with pytest.raises(ValueError, match=match):
        build_model({"model_type": "deepseek_v3", **DSV3, **change})


def test_linear_kind_per_prefix():
    asked = []

    def kind(prefix):
        asked.append(prefix)
        return "int8-channel" if ".mlp." in prefix else "bf16"

    model = build_model(LLAMA, linear_kind=kind, dtype=torch.float32)
    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    assert set(asked) == linears and len(asked) == 2 * 7
    assert all(QUANTIZABLE.match(p) for p in asked)
    assert model.model.layers[1].mlp.down_proj.kind == "int8-channel"
    assert model.model.layers[1].self_attn.q_proj.kind == "bf16"
    params = dict(model.named_parameters())
    assert params["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert params["model.layers.0.mlp.up_proj.weight_scale"].shape == (96, 1)
    assert not isinstance(model.lm_head, Linear)  # never quantized


def test_quantized_linears_run_inside_the_model():
    """int8-weight (W8A16) linears filled with ref-quantized weights: ingot equals transformers running the
    dequantized weights (the model calls each Linear's method, nothing bypasses it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, initializer_range=0.08)
    hf = LlamaForCausalLM(cfg).float().eval()
    model = build_model(cfg.to_dict(), dtype=torch.float32, linear_kind=lambda p: "int8-weight")
    scheme = Scheme.from_name("int8-weight")
    state = hf_state_dict(hf)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            qw = ref.quantize_weight(state.pop(f"{name}.weight"), scheme)
            module.load(StoredLinear("int8-weight", qw.qweight, qw.scale))
            module.process_weights_after_loading()
            with torch.no_grad():
                hf.get_submodule(name).weight.copy_(ref.dequantize_weight(qw))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".weight" in n and "layers" in n for n in missing)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model.score(ids)).abs().max().item() < 1e-4


def test_tied_and_untied_embeddings():
    tied = build_model({**LLAMA, "tie_word_embeddings": True})
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    untied = build_model(LLAMA)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.dtype == torch.bfloat16 and not untied.lm_head.weight.requires_grad


def _decode_on_meta(model, b: int = 3, blocks: int = 4, bs: int = 16):
    dev = torch.device("meta")
    caches = [(torch.empty(10, bs, s.num_kv_heads, s.head_dim_k, device=dev),
               None if s.shared_kv else torch.empty(10, bs, s.num_kv_heads, s.head_dim_v, device=dev))
              for s in model.kv_cache_spec()]
    model.bind_kv_cache(caches)
    meta = AttnMetadata(
        cu_query_lens=torch.empty(b + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.empty(b, dtype=torch.int32, device=dev),
        slot_mapping=torch.empty(b, dtype=torch.int64, device=dev),
        block_tables=torch.empty(b, blocks, dtype=torch.int32, device=dev),
        max_query_len=1,
        max_seq_len=blocks * bs,
    )
    ids = torch.empty(b, dtype=torch.int64, device=dev)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.empty(b, dtype=torch.int64, device=dev), meta))


def test_decode_step_has_no_host_sync(monkeypatch):
    """A meta-device model has shapes and no data: any .item() / .tolist() / data-dependent shape in a decode step
    raises. Llama-family and dense DeepSeek-V3 (MLA) steps pass. MoE: the fused path passes (its Triton launches,
    which cannot run on meta, replaced by shape-only stand-ins; CUDA-graph capture on the GPU covers them); the
    per-expert loop counts tokens per expert on the host."""
    for config in ({**LLAMA, "model_type": "qwen3", "head_dim": 32}, {**LLAMA, "model_type": "mistral", "sliding_window": 8}):
        model = build_model(config, device="meta")
        assert model.supports_cuda_graphs
        logits = _decode_on_meta(model)
        assert logits.shape == (3, 128) and logits.dtype == torch.float32
    dense = build_model({"model_type": "deepseek_v3", **DSV3, "n_routed_experts": None}, device="meta")
    dense.process_weights_after_loading()
    assert dense.supports_cuda_graphs and _decode_on_meta(dense).shape == (3, 128)
    from ingot.kernels import moe_gemm
    from ingot.layers.moe import MoE

    moe = build_model({"model_type": "deepseek_v3", **DSV3}, device="meta")
    moe.process_weights_after_loading()
    assert moe.supports_cuda_graphs
    layers = [m for m in moe.modules() if isinstance(m, MoE)]
    assert layers and all(m.grouped_kind == "bf16" for m in layers)
    launches = []

    def align(ids, e, block_m):
        launches.append("align")
        blocks = moe_gemm.max_aligned_blocks(ids.numel(), e, block_m)
        empty = lambda *shape: torch.empty(shape, dtype=torch.int32, device=ids.device)  # noqa: E731
        return moe_gemm.MoEAlignment(empty(blocks * block_m), empty(blocks), empty(1), block_m, *ids.shape, e)

    def gemm(a, a_s, w, w_s, al, kind, block_size=(128, 128), topk_weights=None, out_dtype=torch.bfloat16, **kw):
        moe_gemm._check_moe_operands(a, a_s, w, w_s, al, kind, block_size, topk_weights, out_dtype, None)
        launches.append("gemm")
        return torch.empty(al.numel, w.shape[1], dtype=out_dtype, device=a.device)

    def silu_mul(gate, up):
        launches.append("silu_mul")
        return torch.empty_like(gate)

    from ingot.kernels import silu_mul as silu_mul_module

    monkeypatch.setattr(moe_gemm, "moe_align", align)
    monkeypatch.setattr(moe_gemm, "moe_gemm", gemm)
    monkeypatch.setattr(silu_mul_module, "silu_mul", silu_mul)
    for m in layers:
        m.use_fused = True
    assert _decode_on_meta(moe).shape == (3, 128)
    assert launches == ["align", "gemm", "silu_mul", "gemm"] * len(layers)
    for m in layers:
        m.use_fused = False
    assert not moe.supports_cuda_graphs
    with pytest.raises(NotImplementedError, match="bincount"):  # MoE.routed: tokens per expert, on the host
        _decode_on_meta(moe)


def test_bind_kv_cache_checks():
    model = build_model(LLAMA, dtype=torch.float32)
    spec = model.kv_cache_spec()
    assert len(spec) == 2 and spec[0].num_kv_heads == 2 and spec[0].head_dim_k == 16 and not spec[0].shared_kv
    k = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError, match="2 caches for 2|1 caches for 2"):
        model.bind_kv_cache([(k, k)])
    with pytest.raises(ValueError, match="layer 1: v_cache"):
        model.bind_kv_cache([(k, k), (k, None)])
    ds = build_model({"model_type": "deepseek_v3", **DSV3}, dtype=torch.float32)
    assert [(s.num_kv_heads, s.head_dim_k, s.head_dim_v, s.shared_kv) for s in ds.kv_cache_spec()] == [(1, 40, 32, True)] * 2


def test_hf_config_object_dicts_build():
    """A transformers DeepseekV3Config dict (num_key_value_heads 128 default, num_nextn_predict_layers) builds."""
    cfg = DeepseekV3Config(**DSV3).to_dict()
    model = build_model(cfg, dtype=torch.float32, load_mtp=True)
    assert model.args.num_nextn_predict_layers == 1 and len(model.model.layers) == 3 and model.num_layers == 2


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel", "int4-group"])
def test_fused_projections_keep_the_logits(scheme):
    """fuse_projections() (the engine's q/k/v and gate/up merge) leaves a Llama's logits unchanged, bit for bit on
    CPU, and replaces the per-projection linears."""
    from ingot.models.loader import random_model

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    model = random_model(config, scheme, "cpu", dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model.score(ids)
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.out_features == 128 + 64 + 64 and not hasattr(attn, "q_proj")
    assert mlp.gate_up_proj.out_features == 512 and not hasattr(mlp, "gate_proj")
    assert torch.equal(model.score(ids), before)


@pytest.mark.parametrize("scheme", ["bf16", "int8-channel"])  # (block kinds refuse: 96 and 16 rows end mid-block)
def test_fused_projections_deepseek(scheme):
    """DeepSeek-V3: the dense MLPs and the shared experts fuse gate/up, the routed experts stay as they are (views
    of the MoE stacks), and the logits do not change beyond fp32 rounding."""
    from ingot.models.loader import random_model

    model = random_model({"model_type": "deepseek_v3", **DSV3, "n_shared_experts": 1}, scheme, "cpu", dtype=torch.float32)
    ids = torch.randint(0, DSV3["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    before = model.score(ids)
    model.fuse_projections()
    layers = model.model.layers[: model.num_layers]
    dense = [layer.mlp for layer in layers if not hasattr(layer.mlp, "experts")]
    moes = [layer.mlp for layer in layers if hasattr(layer.mlp, "experts")]
    assert dense and moes
    assert all(m.gate_up_proj is not None and not hasattr(m, "gate_proj") for m in dense)
    assert all(m.shared_experts.gate_up_proj is not None for m in moes)
    assert all(e.gate_up_proj is None and hasattr(e, "gate_proj") for m in moes for e in m.experts)
    after = model.score(ids)
    if scheme == "bf16":  # float GEMMs of another N may block K differently: fp32 rounding only (measured 1.5e-8)
        assert (after - before).abs().max() <= 1e-6 * before.abs().max()
    else:  # the int8 reference dot is exact, whatever the width
        assert torch.equal(after, before)
