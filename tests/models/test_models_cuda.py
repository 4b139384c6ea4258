"""Models on a CUDA device (skipped without one): parity with transformers on the GPU, and a decode step captured in a
CUDA graph and replayed with new inputs, equal to the eager step.

Run on the GPU machine: ``python -m pytest -x -q tests/models/test_models_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from _parity import PagedRunner, load_from_hf, paged_vs_hf
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from ingot.layers.attention import AttnMetadata
from ingot.models import build_model

pytestmark = pytest.mark.gpu

TOL_FP32 = 1e-3  # float32 on the GPU; cuBLAS may pick other summation orders than on the CPU (measured there: ~1e-6)
LLAMA = dict(vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08,
             rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64, "rope_theta": 500000.0})
DSV3 = dict(vocab_size=320, hidden_size=128, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.08,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})


def _pair(family: str, dtype: torch.dtype, **overrides):
    torch.manual_seed(0)
    if family == "llama":
        cfg, cls = LlamaConfig(**{**LLAMA, **overrides}), LlamaForCausalLM
    else:
        cfg, cls = DeepseekV3Config(**{**DSV3, **overrides}), DeepseekV3ForCausalLM
    cfg._attn_implementation = "eager"
    hf = cls(cfg).to("cuda", dtype).eval()
    model = build_model(cfg.to_dict(), device="cuda", dtype=dtype)
    load_from_hf(model, hf)
    return model, hf


def _prompts(lengths=(11, 9, 3)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_paged_forward_matches_transformers_on_cuda(family):
    model, hf = _pair(family, torch.float32)
    with torch.no_grad():
        diff, agree, n = paged_vs_hf(model, hf, _prompts())
        ids = torch.tensor(_prompts((13, 13)), device="cuda")
        score_diff = (hf(ids).logits.float() - model.score(ids)).abs().max().item()
    assert diff <= TOL_FP32 and score_diff <= TOL_FP32, (diff, score_diff)
    assert agree == n


# DeepSeek made dense through first_k_dense_replace = num_hidden_layers (every layer a dense MLP in both ingot and
# transformers): transformers >= 5.17 validates config fields, n_routed_experts must stay an int.
@pytest.mark.parametrize("family, overrides", [("llama", {}),
                                               ("deepseek_v3", {"first_k_dense_replace": DSV3["num_hidden_layers"]}),
                                               ("deepseek_v3", {})])
def test_decode_step_replays_in_a_cuda_graph(family, overrides):
    """Capture forward + compute_logits of a decode step (3 sequences + 1 padded row) once, replay it for the next
    steps with new inputs copied into the static buffers: each replay equals the eager step on the same inputs.
    DeepSeek-V3 dense (first_k_dense_replace = all layers) and with MoE layers on the fused grouped-GEMM path."""
    model, hf = _pair(family, torch.bfloat16, **overrides)
    assert model.supports_cuda_graphs
    has_moe = any("moe" in type(m).__name__.lower() for m in hf.modules())
    assert has_moe == (family == "deepseek_v3" and not overrides)  # the dense variant's peer is dense too
    runner = PagedRunner(model, num_blocks=32, block_size=16, max_blocks=4)
    prompts = _prompts()
    with torch.no_grad():
        last = [int(r[-1].argmax()) for r in runner.step(list(enumerate(prompts)))]

        ids, pos, meta = runner.prepare([(i, [t]) for i, t in enumerate(last)], pad_rows=1)
        static_ids, static_pos = ids.clone(), pos.clone()
        static = AttnMetadata(meta.cu_query_lens.clone(), meta.seq_lens.clone(), meta.slot_mapping.clone(),
                              meta.block_tables.clone(), max_query_len=1, max_seq_len=4 * 16)
        side = torch.cuda.Stream()  # warm-up off the capture stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.compute_logits(model(static_ids, static_pos, static))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model.compute_logits(model(static_ids, static_pos, static))

        for step in range(3):
            if step:
                ids, pos, meta = runner.prepare([(i, [t]) for i, t in enumerate(last)], pad_rows=1)
            # eager first: it writes this step's K/V, which the replay writes again (the same values, same slots)
            eager = model.compute_logits(model(ids, pos, meta))
            static_ids.copy_(ids)
            static_pos.copy_(pos)
            for name in ("cu_query_lens", "seq_lens", "slot_mapping", "block_tables"):
                getattr(static, name).copy_(getattr(meta, name))
            graph.replay()
            torch.cuda.synchronize()
            assert (static_logits - eager).abs().max().item() <= 1e-2 * eager.abs().max().item(), f"step {step}"
            assert torch.equal(static_logits[:3].argmax(-1), eager[:3].argmax(-1))
            last = eager[:3].argmax(-1).tolist()


def test_moe_model_is_graph_safe_on_the_fused_path():
    from ingot.layers.moe import MoE

    model, _ = _pair("deepseek_v3", torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and all(m.grouped_kind == "bf16" for m in layers) and model.supports_cuda_graphs
    for m in layers:
        m.use_fused = False  # the per-expert loop: tokens per expert counted on the host
    assert not model.supports_cuda_graphs
