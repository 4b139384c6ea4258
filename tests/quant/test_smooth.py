"""SmoothQuant smoothing (ingot.quant.smooth, ingot.calibrate, ``ingot convert --smooth``).

1. The fold is exact: a tiny random Llama (GQA, random norm weights) smoothed in float32 gives the same logits
   (transformers' model, independent of ingot's) - every pair kind, v-o factors shared across a kv group.
2. It does what it is for: a synthetic outlier channel's W8A8 int8 error drops.
3. Calibration refuses missing data with an error naming what it expected, before loading a model.
4. ``ingot convert --smooth`` records the smoothing in the manifest and ``ingot inspect`` shows it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ingot.calibrate import CalibrationDataError, calibration_rows, measure
from ingot.quant import ref
from ingot.quant.convert import MANIFEST_NAME, ConvertOptions, convert
from ingot.quant.schemes import Scheme
from ingot.quant.smooth import PAIR_KINDS, Pair, SmoothConfig, Smoothing, pair_factors, smooth_factors

HEADS, KV_HEADS = 6, 2


def byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (no merges) saved into ``path``: calibration tokenizes real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def make_llama(path: Path, dtype=torch.float32):
    """Tiny random Llama (GQA 6/2, mlp and attention biases off), norm weights not all ones, saved as ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        # an outlier channel in the residual stream, as real models have
        model.model.embed_tokens.weight[:, 7] *= 30
    model.to(dtype).save_pretrained(path)
    byte_tokenizer(path)
    return model


def gsm8k_file(path: Path, rows: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many?",
                         "answer": f"He has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}"}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    model = make_llama(root / "llama")
    return root / "llama", model, gsm8k_file(root / "data" / "gsm8k" / "train.jsonl")


def smoothed_state(smoothing: Smoothing, model) -> dict[str, torch.Tensor]:
    """The model's float32 state dict with the smoothing folded in (what the converter does, before rounding)."""
    state = {}
    for name, t in model.state_dict().items():
        key = name.removesuffix(".weight") if smoothing.touches(name.removesuffix(".weight")) else name
        state[name] = smoothing.apply(key, t.float())
    return state


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_leaves_fp32_logits_unchanged(llama, alpha):
    path, model, calib = llama
    maxima = measure(path, SmoothConfig(alpha, calib, samples=16, seq_len=64, pairs=PAIR_KINDS))
    smoothing = maxima.smoothing(alpha)
    kinds = {f.pair.kind for f in smoothing.factors}
    assert kinds == {"norm", "up-down", "v-o"} and len(smoothing.factors) == 2 * 4
    assert max(float((f.s - 1).abs().max()) for f in smoothing.factors) > 0.5  # the factors do move things
    vo = next(f for f in smoothing.factors if f.pair.kind == "v-o")
    assert vo.s.shape == (KV_HEADS * 16,) and vo.consumer_s.shape == (HEADS * 16,)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        smoothed = type(model)(model.config).float()
        smoothed.load_state_dict(smoothed_state(smoothing, model))
        after = smoothed(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_smoothing_reduces_outlier_int8_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, 5] *= 60  # one outlier channel, every token (SmolLM2's down_proj inputs: max/mean > 1000)
    x[:, 77] *= 25
    w = torch.randn(128, 256, generator=g) * 0.02
    y = x @ w.T

    def w8a8_error(x, w):
        x_q, x_s = ref.quantize_act_token(x)
        qw = ref.quantize_weight(w, Scheme.from_name("int8-channel"))
        out = ref.int8_gemm_channel_ref(x_q, x_s, qw.qweight, qw.scale, None, torch.float32)
        return float((out - y).norm() / y.norm())

    s = smooth_factors(x.abs().amax(0), w.abs().amax(0), 0.5)
    plain, smoothed = w8a8_error(x, w), w8a8_error(x / s, w * s)
    assert smoothed < plain / 3, (plain, smoothed)


def test_factors_edge_cases():
    s = smooth_factors(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]  # a dead channel (activation or weight 0) is left alone
    pair = Pair("v-o", ("in", "o"), ("v",), ("o",), groups=3, head_dim=2)
    f = pair_factors(pair, torch.arange(1.0, 13.0), torch.ones(12), 1.0)  # 2 kv heads x 3 q heads x 2 channels
    assert f.s.tolist() == [5.0, 6.0, 11.0, 12.0]  # max over each group's q heads
    assert f.consumer_s.tolist() == [5.0, 6.0] * 3 + [11.0, 12.0] * 3


def test_calibration_refuses_missing_data(llama, tmp_path):
    with pytest.raises(CalibrationDataError, match="INGOT_DATA_DIR"):
        calibration_rows(SmoothConfig(calib_path=None))
    missing = tmp_path / "nowhere" / "gsm8k" / "train.jsonl"
    with pytest.raises(CalibrationDataError, match=str(missing)):
        measure(llama[0], SmoothConfig(calib_path=missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(CalibrationDataError, match="line 1"):
        calibration_rows(SmoothConfig(calib_path=bad))
    # the CLI: one line naming the expected file, exit 1, nothing written
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ingot.cli", "convert", str(llama[0]), str(dst), "--scheme",
                        "int8-channel", "--smooth", "--data-dir", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and str(missing) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not dst.exists()


def test_convert_smooth_records_and_resumes(llama, tmp_path):
    path, _, calib = llama
    calls = []

    def calibrate(src, cfg, device):
        calls.append(cfg)
        return measure(src, cfg, device).smoothing(cfg.alpha)

    cfg = SmoothConfig(0.5, calib, samples=16, seq_len=64, pairs=PAIR_KINDS)
    dst = tmp_path / "int8"
    # down_proj kept in BF16: its up-down pairs are dropped (nothing to gain), the others stay
    options = ConvertOptions(Scheme.from_name("int8-channel"), ignore=(r"mlp\.down_proj$",), smooth=cfg)
    manifest = convert(path, dst, options, progress=False, calibrate=calibrate)
    sm = manifest["smoothing"]
    assert sm["alpha"] == 0.5 and sm["pairs_dropped_unquantized"] == 2
    assert {p["kind"] for p in sm["pairs"]} == {"norm", "v-o"}
    assert sm["calibration"]["sha256"] and sm["calibration"]["tokens"] > 0
    assert manifest["job"]["smooth"]["alpha"] == 0.5
    # same job again: complete, no new calibration; the norm weights in the output are the folded ones
    convert(path, dst, options, progress=False, calibrate=calibrate)
    assert len(calls) == 1
    from safetensors.torch import load_file

    out = load_file(str(dst / "model.safetensors"))
    src = load_file(str(path / "model.safetensors"))
    assert not torch.equal(out["model.layers.0.input_layernorm.weight"].float(),
                           src["model.layers.0.input_layernorm.weight"].float())
    assert torch.equal(out["model.norm.weight"].float(), src["model.norm.weight"].float())  # final norm: untouched

    from ingot.quant.inspect import format_table, inspect_checkpoint

    info = inspect_checkpoint(dst)
    assert info["smoothing"]["alpha"] == 0.5 and info["smoothing"]["pairs"] == {"norm": 4, "v-o": 2}
    assert "alpha 0.5, 6 pairs" in format_table([info])
    with pytest.raises(ValueError, match="calibrate"):
        convert(path, tmp_path / "x", options, progress=False)
    assert json.loads((dst / MANIFEST_NAME).read_text())["smoothing"] == sm


def test_deepseek_pairs_fold_exactly(deepseek_bf16_dir, tmp_path):
    """DeepSeek-V3 (MLA with q_lora, dense layer 0, MoE layers): input_layernorm -> q_a / kv_a, q_a_layernorm -> q_b,
    post_attention_layernorm -> experts, shared experts and the router's columns; up -> down in every MLP. Folded in
    float32 into transformers' model, the logits stay."""
    import shutil

    from transformers import DeepseekV3ForCausalLM

    src = tmp_path / "ds"
    shutil.copytree(deepseek_bf16_dir, src)
    byte_tokenizer(src)
    calib = gsm8k_file(tmp_path / "gsm8k" / "train.jsonl")
    smoothing = measure(src, SmoothConfig(0.5, calib, samples=16, seq_len=64, pairs=PAIR_KINDS)).smoothing(0.5)
    sites = {f.pair.stat[1] for f in smoothing.factors}
    assert "model.layers.1.self_attn.q_a_layernorm" in sites and "model.layers.1.post_attention_layernorm" in sites
    norm1 = next(f for f in smoothing.factors if f.pair.stat[1] == "model.layers.1.post_attention_layernorm")
    assert norm1.pair.extra_consumers == ("model.layers.1.mlp.gate.weight",)
    assert "model.layers.1.mlp.shared_experts.gate_proj" in norm1.pair.consumers
    assert not any(f.pair.stat[1].startswith("model.layers.3.") for f in smoothing.factors)  # MTP layer left alone
    assert any(f.pair.kind == "up-down" for f in smoothing.factors)
    # transformers fuses the experts in memory: fold by checkpoint name, into a float32 copy of the checkpoint
    from safetensors.torch import load_file, save_file

    folded = tmp_path / "ds-smoothed"
    shutil.copytree(src, folded)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        key = name.removesuffix(".weight") if smoothing.touches(name.removesuffix(".weight")) else name
        out[name] = smoothing.apply(key, t.float()).contiguous()
    save_file(out, str(folded / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
        after = DeepseekV3ForCausalLM.from_pretrained(folded, dtype=torch.float32).eval()(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
