"""Model definitions: ``build_model(config)`` makes the runtime model of a config.json, parameters allocated empty.

Families: Llama (llama, mistral, qwen2, qwen3 - ``ingot.models.llama``) and DeepSeek-V3 (deepseek_v3 -
``ingot.models.deepseek_v3``). Checkpoint tensor names are the models' ``named_parameters()`` names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ingot.models.deepseek_v3 import DeepseekV3Args, DeepseekV3ForCausalLM
from ingot.models.llama import LLAMA_MODEL_TYPES, CausalLM, LinearFactory, LlamaArgs, LlamaForCausalLM

MODEL_TYPES = (*LLAMA_MODEL_TYPES, "deepseek_v3")
# config.json's "architectures" entry of each model type, for configs that lack "model_type".
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}

__all__ = ["build_model", "model_type", "CausalLM", "LlamaArgs", "DeepseekV3Args", "LinearFactory", "MODEL_TYPES"]


def model_type(config: dict) -> str:
    """The config's model type (``model_type``, else its first known ``architectures`` entry); refuses others."""
    mt = config.get("model_type")
    if mt is None:
        mt = next((ARCHITECTURES[a] for a in config.get("architectures") or () if a in ARCHITECTURES), None)
    if mt not in MODEL_TYPES:
        raise ValueError(
            f"config.json model_type {config.get('model_type')!r} (architectures {config.get('architectures')}) is not "
            f"supported; ingot runs: {', '.join(MODEL_TYPES)}"
        )
    return mt


def build_model(
    config: dict,
    *,
    linear_kind: Callable[[str], str] = lambda prefix: "bf16",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    load_mtp: bool = False,
    fp8_fallback: str = "int8-block",
) -> CausalLM:
    """The model of ``config`` (a config.json dict) with every parameter allocated (torch.empty) on ``device``.

    linear_kind(prefix) gives the kind ("bf16", "int8-block", ...) of the linear named ``prefix``
    (e.g. ``model.layers.0.self_attn.q_proj``). load_mtp: also build DeepSeek-V3's multi-token-prediction layers.
    A loader fills the parameters by name, then calls ``model.process_weights_after_loading()``.
    """
    mt = model_type(config)
    config = {**config, "model_type": mt}
    make = LinearFactory(linear_kind, torch.device(device), dtype, fp8_fallback)
    if mt == "deepseek_v3":
        return DeepseekV3ForCausalLM(config, make, load_mtp=load_mtp)
    return LlamaForCausalLM(config, make)
