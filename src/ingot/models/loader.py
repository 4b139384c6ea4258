"""Checkpoint directory -> ingot's runtime model (``load_model``), and random models of real shapes (``random_model``).

One loader for every format ingot reads and writes (hf-fp8, sglang blockwise_int8 / w8a8_int8, compressed-tensors
int / pack / float-quantized, GPTQ, plain bf16 / fp16, and mixed checkpoints whose ignored linears stay unquantized):

1. ``ingot.formats.detect`` reads config.json's quantization_config; ``find_linears`` lists every linear with its
   stored kind from the shard headers alone.
2. ``ingot.models.build_model`` allocates the model (torch.empty) with each linear of its stored kind.
3. ``plan_load`` matches checkpoint and model by name *before any data is read*: a tensor the model has no place
   for, or a parameter nothing in the checkpoint fills, is an error naming it (and its file) - a 690 GB load does
   not fail at the end. Tied weights (``lm_head.weight`` = ``model.embed_tokens.weight``) are one tensor: either name
   fills it. DeepSeek's MTP layers (``model.layers.{num_hidden_layers + i}``) are skipped unless ``load_mtp``.
4. ``load_weights`` fills the model shard by shard: each linear is decoded by its format into a logical
   ``StoredLinear`` (a scale in another shard is read through the index) and handed to its ``Linear.load``; other
   tensors are copied by name. Quantized weights stay quantized on the way (never a BF16 copy; int4 is unpacked to
   int8 and repacked, one linear at a time), shard handles are closed after each shard: peak host memory is about
   one shard's pages plus one tensor, beside the model on its device.
5. Every ``Linear.process_weights_after_loading()``, then the model's (MLA's absorbed kv_b_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ingot import formats
from ingot.formats.base import QUANTIZABLE, Format, StoredLinear, layer_index
from ingot.formats.safetensors_io import Checkpoint, CheckpointError
from ingot.layers.linear import Linear
from ingot.quant import ref
from ingot.quant.schemes import Scheme

# How many names an error lists before "... and N more".
SHOWN = 5


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


@dataclass
class LoadPlan:
    """What goes where, decided from config.json and the shard headers.

    linears: {module prefix: stored kind} of the linears to load; tensors: other checkpoint tensors to copy by name;
    skipped: checkpoint tensors not loaded (MTP layers without load_mtp); by_shard: {shard file: (linear prefixes,
    tensor names)} in the checkpoint's shard order, each linear under the shard of its first stored tensor.
    """

    format: Format
    kind: str  # the checkpoint's quantized kind ("bf16" when unquantized)
    linears: dict[str, str]
    tensors: list[str]
    skipped: list[str]
    by_shard: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def linear_kind(self, prefix: str) -> str:
        """``build_model``'s linear_kind: the stored kind of ``prefix`` (bf16 where the checkpoint has none)."""
        return self.linears.get(prefix, "bf16")


def _is_mtp(config: dict):
    n_layers = config.get("num_hidden_layers")
    n_mtp = int(config.get("num_nextn_predict_layers") or 0)

    def is_mtp(name: str) -> bool:
        layer = layer_index(name)
        return n_mtp > 0 and n_layers is not None and layer is not None and layer >= n_layers

    return is_mtp


def plan_load(ckpt: Checkpoint, *, load_mtp: bool = False) -> LoadPlan:
    """Which checkpoint tensors are linears (and of which kind), which are copied, which are skipped."""
    fmt, kind = formats.detect(ckpt.config)
    linears, consumed = formats.find_linears(ckpt, fmt, kind)
    skip = (lambda name: False) if load_mtp else _is_mtp(ckpt.config)
    plan = LoadPlan(fmt, kind, {}, [], [])
    by_shard: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in ckpt.shards}
    for prefix, stored_kind in linears.items():
        parts = [prefix + s for s in (fmt.companions if stored_kind != "bf16" else (".weight",)) if prefix + s in ckpt]
        if skip(prefix):
            plan.skipped.extend(parts)
            continue
        plan.linears[prefix] = stored_kind
        by_shard[ckpt.tensors[parts[0]].shard][0].append(prefix)
    for name, info in ckpt.tensors.items():
        if name in consumed:
            continue
        if skip(name):
            plan.skipped.append(name)
            continue
        plan.tensors.append(name)
        by_shard[info.shard][1].append(name)
    plan.by_shard = by_shard
    return plan


def _linear_parts(module: Linear) -> list[str]:
    """A Linear's parameters that its method fills from a StoredLinear (all but the bias, a tensor of its own)."""
    return [name for name, _ in module.named_parameters(recurse=False) if name != "bias"]


def load_weights(model: nn.Module, ckpt: Checkpoint | Path | str, *, load_mtp: bool = False,
                 plan: LoadPlan | None = None) -> None:
    """Fill every parameter and persistent buffer of ``model`` from the checkpoint ``ckpt``, matched by name.

    ``model`` is any module whose state-dict names are the checkpoint's tensor names and whose quantizable linears
    are ingot ``Linear``s built for their stored kinds (``build_model`` makes such a model). Raises CheckpointError
    naming the tensors (and files) that the model has no place for, the parameters nothing fills, and any tensor
    whose shape or dtype does not fit - the first two before any data is read.
    """
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    plan = plan or plan_load(ckpt, load_mtp=load_mtp)
    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers; tied ones under every name
    modules = dict(model.named_modules())
    by_shard = {shard: (list(prefixes), list(names)) for shard, (prefixes, names) in plan.by_shard.items()}
    linears: dict[str, Linear] = {}
    copies = list(plan.tensors)
    unexpected: list[str] = []
    for prefix, kind in plan.linears.items():
        module = modules.get(prefix)
        if isinstance(module, Linear):
            if module.method.source_kind != kind:
                raise CheckpointError(
                    f"{ckpt.dir}: linear {prefix} is stored as {kind}, but the model built it for "
                    f"{module.method.source_kind}"
                )
            linears[prefix] = module
        elif kind == "bf16" and f"{prefix}.weight" in state:  # a plain nn.Linear in the model: a tensor like others
            shard = ckpt.tensors[f"{prefix}.weight"].shard
            by_shard[shard][0].remove(prefix)
            by_shard[shard][1].append(f"{prefix}.weight")
            copies.append(f"{prefix}.weight")
        else:
            unexpected.append(f"{prefix} ({kind} linear)")
    unexpected += [name for name in copies if name not in state]
    if unexpected:
        where = {n: ckpt.tensors[n].shard for n in unexpected if n in ckpt.tensors}
        files = sorted(set(where.values()))
        raise CheckpointError(
            f"{ckpt.dir}: {len(unexpected)} checkpoint tensors have no place in the "
            f"{type(model).__name__}: {_names(unexpected)}" + (f" (in {', '.join(files)})" if files else "")
        )

    # Coverage by tensor identity: a tied parameter is filled through any of its names.
    filled = {id(state[n]) for n in copies}
    for prefix, module in linears.items():
        filled.update(id(getattr(module, p)) for p in _linear_parts(module))
    missing = [name for name, t in state.items() if id(t) not in filled]
    if missing:
        raise CheckpointError(
            f"{ckpt.dir}: {len(missing)} model parameters are not in the checkpoint "
            f"(format {plan.format.name}, {plan.kind}): {_names(missing)}"
        )

    done: set[str] = set()
    with torch.no_grad():
        for shard in ckpt.shards:
            prefixes, names = by_shard[shard]
            for prefix in prefixes:
                _load_linear(ckpt, plan, prefix, linears[prefix], shard)
                done.add(prefix)
            for name in names:
                _copy_tensor(ckpt, name, state[name], shard)
            ckpt.close()  # drop this shard's memory map before the next
    assert done == set(linears), f"linears never loaded: {_names(sorted(set(linears) - done))}"
    for module in linears.values():
        module.process_weights_after_loading()
    finish = getattr(model, "process_weights_after_loading", None)
    if callable(finish):
        finish()


def _load_linear(ckpt: Checkpoint, plan: LoadPlan, prefix: str, module: Linear, shard: str) -> None:
    kind = plan.linears[prefix]
    try:
        if kind == "bf16":
            stored = StoredLinear("bf16", ckpt.get(f"{prefix}.weight"), None)
        else:
            stored = plan.format.decode(prefix, ckpt, kind, ckpt.config)
        module.load(stored)
    except (ValueError, CheckpointError) as e:  # the layer's checks do not know names or files
        raise CheckpointError(f"{ckpt.dir / shard}: linear {prefix} ({kind}): {e}") from None


def _copy_tensor(ckpt: Checkpoint, name: str, target: torch.Tensor, shard: str) -> None:
    t = ckpt.get(name)
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{ckpt.dir / shard}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)}"
        )
    if t.is_floating_point() != target.is_floating_point() or (not t.is_floating_point() and t.dtype != target.dtype):
        raise CheckpointError(f"{ckpt.dir / shard}: tensor {name} is {t.dtype}, the model expects {target.dtype}")
    target.copy_(t)  # float -> the model's dtype (float32 stays float32 where the model keeps it so)


def load_model(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    load_mtp: bool = False,
    fp8_fallback: str = "int8-block",
):
    """Load the checkpoint directory ``path`` (or its index file) into ingot's runtime model on ``device``.

    dtype: the model dtype of unquantized tensors and activations; None takes config.json's. Each linear keeps its
    stored kind (fp8-block on a device without FP8: ``fp8_fallback``, see ingot.layers.linear). load_mtp: also load
    DeepSeek's multi-token-prediction layers. Returns the ``CausalLM``, every parameter filled.
    Raises CheckpointError naming the file / tensor / config field on bad input.
    """
    from ingot.models import build_model  # the models package may import this module

    ckpt = Checkpoint(path)
    plan = plan_load(ckpt, load_mtp=load_mtp)
    model = build_model(
        ckpt.config,
        linear_kind=plan.linear_kind,
        device=device,
        dtype=dtype or formats.model_dtype(ckpt.config),
        load_mtp=load_mtp,
        fp8_fallback=fp8_fallback,
    )
    load_weights(model, ckpt, plan=plan)
    return model


# ------------------------------------------------------------------------------------------------ random models


def random_model(config: dict, scheme: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, *, fp8_fallback: str = "int8-block"):
    """A model of ``config``'s real shapes with random weights, its quantizable linears in ``scheme`` (a preset
    name: "int8-block", "fp8-block-ue8m0", ...), built directly on ``device`` for speed benchmarks: no checkpoint."""
    from ingot.models import build_model

    quant = Scheme.from_name(scheme)
    model = build_model(
        config,
        linear_kind=lambda prefix: quant.kind if QUANTIZABLE.match(prefix) else "bf16",
        device=device,
        dtype=dtype,
        fp8_fallback=fp8_fallback,
    )
    randomize(model, quant, seed)
    return model


def randomize(model: nn.Module, scheme: Scheme, seed: int = 0) -> None:
    """Fill ``model`` with random weights, one tensor at a time on its own device.

    Linears: N(0, 0.02) weights made in float32, rounded to bf16 (as a BF16 checkpoint holds them), quantized with
    ``ref.quantize_weight`` to ``scheme`` when the linear stores a quantized kind, loaded through ``Linear.load``;
    biases 0. Norm weights (RMSNorm / LayerNorm): 1. Other floating parameters (embeddings, lm_head, the MoE router):
    N(0, 0.02), except names ending in ``bias`` (the router's e_score_correction_bias): 0.
    """
    from ingot.layers.norm import RMSNorm

    gens: dict[torch.device, torch.Generator] = {}

    def randn(shape, device) -> torch.Tensor:
        g = gens.get(device)
        if g is None:
            g = gens[device] = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                weight_device = next(module.parameters()).device
                w = randn((module.out_features, module.in_features), weight_device).to(torch.bfloat16)
                kind = module.method.source_kind
                if kind == "bf16":
                    stored = StoredLinear("bf16", w, None)
                else:
                    if kind != scheme.kind:
                        raise ValueError(f"linear {name} stores {kind}; randomize was asked for {scheme.name}")
                    qw = ref.quantize_weight(w, scheme, name=f"{name}.weight")
                    stored = StoredLinear(kind, qw.qweight, qw.scale, block_size=scheme.block_size,
                                          group_size=scheme.group_size)
                module.load(stored)
                if module.bias is not None:
                    module.bias.zero_()
                module.process_weights_after_loading()
                continue
            for pname, p in module.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if isinstance(module, (RMSNorm, nn.LayerNorm)) and pname == "weight":
                    p.fill_(1.0)
                elif pname.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(randn(p.shape, p.device))
    finish = getattr(model, "process_weights_after_loading", None)
    if callable(finish):
        finish()
