"""`ingot bench convert` on a tiny synthetic DeepSeek-V3 (CPU): it builds, reuses, runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ingot.bench.convert import BenchConvertOptions, SyntheticDeepseekV3, build_source, plan_source, run_bench_convert
from ingot.formats.safetensors_io import Checkpoint

# Every dimension of DeepSeek-V3 shrunk; kv_a_proj_with_mqa (96 x 256) and kv_b_proj (256 x 64) stay ragged.
TINY = SyntheticDeepseekV3(
    hidden_size=256, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
    num_attention_heads=4, moe_intermediate_size=128, intermediate_size=512, n_routed_experts=8, vocab_size=1000,
)


def test_real_shapes_and_names():
    tensors, layers, summary = plan_source(BenchConvertOptions(workdir="/unused", size_bytes=4 * 10**9))
    shapes = {name: (dtype, shape) for name, dtype, shape in tensors}
    pre = "model.layers.0"
    assert shapes[f"{pre}.self_attn.q_a_proj.weight"] == (torch.float8_e4m3fn, (1536, 7168))
    assert shapes[f"{pre}.self_attn.q_a_proj.weight_scale_inv"] == (torch.float32, (12, 56))
    assert shapes[f"{pre}.self_attn.q_b_proj.weight"][1] == (24576, 1536)
    assert shapes[f"{pre}.self_attn.kv_a_proj_with_mqa.weight"][1] == (576, 7168)
    assert shapes[f"{pre}.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1] == (5, 56)
    assert shapes[f"{pre}.self_attn.kv_b_proj.weight"][1] == (32768, 512)
    assert shapes[f"{pre}.self_attn.o_proj.weight"][1] == (7168, 16384)
    assert shapes[f"{pre}.mlp.gate.weight"] == (torch.bfloat16, (256, 7168))
    assert shapes[f"{pre}.mlp.gate.e_score_correction_bias"] == (torch.float32, (256,))
    assert shapes[f"{pre}.mlp.shared_experts.down_proj.weight"][1] == (7168, 2048)
    assert shapes[f"{pre}.mlp.experts.0.gate_proj.weight"][1] == (2048, 7168)
    assert shapes[f"{pre}.mlp.experts.0.down_proj.weight"][1] == (7168, 2048)
    assert shapes[f"{pre}.input_layernorm.weight"] == (torch.bfloat16, (7168,))
    # 4 GB: one MoE layer, its experts trimmed to the size, whole experts only
    assert layers == 1 and 0 < summary["routed_experts_per_layer"][0] < 256
    assert 4 * 10**9 <= summary["bytes"] < 4 * 10**9 + 3 * 2048 * 7168 + 10**6
    # past one layer's 11.5 GB, a second layer starts
    _, layers, summary = plan_source(BenchConvertOptions(workdir="/unused", size_bytes=12 * 10**9))
    assert layers == 2 and summary["routed_experts_per_layer"][0] == 256


def test_bench_smoke(tmp_path):
    """One run (~3 s: a fresh interpreter imports torch)."""
    options = BenchConvertOptions(
        workdir=tmp_path / "work", size_bytes=300_000, shard_bytes=100_000, workers=(1,), schemes=("int8-channel",),
        out=tmp_path / "res.json", command="pytest", model=TINY,
    )
    results = run_bench_convert(options)
    run = results["runs"][0]
    assert run["returncode"] == 0, run.get("error")
    assert run["bytes_in"] == results["config"]["source"]["bytes"] and run["mb_per_s"] > 0
    assert json.loads((tmp_path / "res.json").read_text())["runs"] == results["runs"]
    assert "all_pass" in results["targets"]


@pytest.mark.slow
def test_bench_on_a_tiny_model(tmp_path):
    """Every scheme and worker count (~11 s)."""
    options = BenchConvertOptions(
        workdir=tmp_path / "work", size_bytes=600_000, shard_bytes=200_000, workers=(1, 2),
        schemes=("int8-block", "int8-channel"), out=tmp_path / "res.json", command="pytest", model=TINY,
    )
    results = run_bench_convert(options)
    on_disk = json.loads((tmp_path / "res.json").read_text())
    assert on_disk["runs"] == results["runs"] and len(results["runs"]) == 4
    assert results["device"]["cpu"]["cores"] >= 1 and results["software"]["torch"] == torch.__version__
    assert set(results["git"]) == {"sha", "dirty"}
    for run in results["runs"]:
        assert run["returncode"] == 0, run.get("error")
        assert run["bytes_in"] == results["config"]["source"]["bytes"]
        assert run["peak_rss_bytes"] > 0 and run["mb_per_s"] > 0
        assert set(run["targets"]) == {"mb_per_s_per_worker", "peak_rss_shards"}
        assert -30 < run["snr_db_mean"] < 100
    assert not any(p.name.startswith("out-") for p in (tmp_path / "work").iterdir())  # outputs deleted

    # The source is a real hf-fp8 checkpoint, reused when complete.
    src, info = build_source(options)
    assert info["reused"] and info["shards"] >= 3
    ckpt = Checkpoint(src)
    assert ckpt.config["num_hidden_layers"] == 1 and ckpt.config["quantization_config"]["quant_method"] == "fp8"
    w = ckpt.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (96, 256)
    assert not ((w.view(torch.uint8) & 0x7F) == 0x7F).any()  # no NaN codes
    assert (ckpt.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv") > 0).all()


def test_imports_stay_light():
    """The GPU host has no gguf and no guaranteed transformers: the CLI and the bench must not import them."""
    code = (
        "import sys, ingot.cli, ingot.bench.convert, ingot.quant.convert; "
        "bad = [m for m in ('gguf', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="scheme 'int4-group'"):
        BenchConvertOptions(workdir=tmp_path, schemes=("int4-group",))
    with pytest.raises(ValueError, match="device 'tpu'"):
        BenchConvertOptions(workdir=tmp_path, devices=("tpu",))
    with pytest.raises(ValueError, match="must be positive"):
        BenchConvertOptions(workdir=tmp_path, size_bytes=0)
