"""Calibration for SmoothQuant smoothing: run the source model on calibration text and measure, per channel, the
largest |activation| at each smoothing site (``ingot.quant.smooth``), then turn those into factors.

Downstream of ``models`` (it runs ingot's own runtime model, ``load_model``, with forward hooks); ``ingot convert
--smooth`` hands ``calibrate`` to the converter, which calls it once per conversion (a resumed conversion reuses the
factors it saved).

Calibration text: GSM8K train rows (``$INGOT_DATA_DIR/gsm8k/train.jsonl``; the data README names it as calibration
text), ``samples`` rows drawn with ``random.Random(seed)``, each "question\\nanswer", joined by blank lines,
tokenized once and cut into ``seq_len``-token sequences (the tail dropped). Never an evaluation test set.
The forward runs in float32 on CPU (bf16 matmuls there are slower and add rounding), in the model's dtype on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ingot.quant.smooth import Pair, Smoothing, SmoothConfig, find_pairs, pair_factors


class CalibrationDataError(FileNotFoundError):
    """The calibration text is missing or does not hold what it should."""


def calibration_rows(cfg: SmoothConfig) -> tuple[list[str], str]:
    """The texts of the drawn rows and the sha256 of the file. Raises CalibrationDataError naming the path.
    cfg: a SmoothConfig or a GptqConfig (their calib_path, samples and seed)."""
    path = cfg.calib_path
    if path is None:
        raise CalibrationDataError(
            "calibration (--smooth, --gptq) needs calibration text: pass --data-dir DIR or set INGOT_DATA_DIR "
            "(expected DIR/gsm8k/train.jsonl)")
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration text not found: expected {path} (GSM8K train.jsonl)")
    data = path.read_bytes()
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path} line {n}: not JSON ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise CalibrationDataError(f"{path} line {n}: expected an object with string 'question' and 'answer'")
        rows.append(f"{row['question']}\n{row['answer']}")
    if not rows:
        raise CalibrationDataError(f"{path}: no rows")
    picked = random.Random(cfg.seed).sample(range(len(rows)), min(cfg.samples, len(rows)))
    return [rows[i] for i in picked], hashlib.sha256(data).hexdigest()


def calibration_batches(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """int64 [n, seq_len]: the texts joined by blank lines, tokenized once, cut into full sequences (at least one:
    a shorter text gives a single shorter sequence)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=True)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        return torch.tensor([ids], dtype=torch.int64)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def activation_maxima(model: torch.nn.Module, stats: set[tuple[str, str]], batches: torch.Tensor,
                      device: str) -> dict[tuple[str, str], torch.Tensor]:
    """Per-channel max |x| (float32 [channels], on CPU) at each ``(where, module)`` of ``stats``: ``("out", m)`` the
    output of module m, ``("in", m)`` its first input, over every token of ``batches`` (one sequence per forward).
    A site the forward never reached (an MoE expert that got no token) is absent from the result."""
    modules = dict(model.named_modules())
    found: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def update(key, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        found[key] = torch.maximum(found[key], m) if key in found else m

    for where, name in sorted(stats):
        if name not in modules:
            raise ValueError(f"calibration: the model has no module {name} (expected from the checkpoint's names)")
        key = (where, name)
        if where == "out":
            handles.append(modules[name].register_forward_hook(lambda m, a, out, key=key: update(key, out)))
        else:
            handles.append(modules[name].register_forward_pre_hook(lambda m, a, key=key: update(key, a[0])))
    try:
        with torch.inference_mode():
            for row in batches:
                model.score(row[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in found.items()}


def _weight_max(module: torch.nn.Module) -> torch.Tensor:
    """max over rows of |W|, float32 [in_features], from the weight the layer multiplies by (any stored kind)."""
    from ingot.layers.linear import Linear, dequantized_weight

    w = dequantized_weight(module) if isinstance(module, Linear) else module.weight.float()
    return w.abs().amax(0).cpu()


@dataclass
class Maxima:
    """What calibration measured: per pair, max |x| per consumer channel and max |W| per consumer column (float32,
    CPU). Independent of alpha: ``smoothing(alpha)`` gives the factors for any alpha without a new forward."""

    pairs: list[Pair]
    act: list[torch.Tensor]
    weight: list[torch.Tensor]
    skipped: list[str]
    record: dict

    def smoothing(self, alpha: float) -> Smoothing:
        factors = [pair_factors(p, a, w, alpha) for p, a, w in zip(self.pairs, self.act, self.weight)]
        return Smoothing(factors, {"method": "smoothquant", "alpha": alpha, **self.record, "skipped": self.skipped})


def measure(src: Path | str, cfg: SmoothConfig, device: str = "cpu", log=None) -> Maxima:
    """Activation and weight maxima at every smoothing site of the checkpoint ``src`` (any format ``load_model``
    reads; FP8 dequantized to the float dtype). Raises CalibrationDataError before loading anything when the
    calibration text is missing."""
    from transformers import AutoTokenizer

    from ingot import formats
    from ingot.formats.safetensors_io import Checkpoint
    from ingot.models.loader import load_model

    t0 = time.perf_counter()
    texts, sha = calibration_rows(cfg)  # first: a missing file fails before minutes of loading
    src = Path(src)
    ckpt = Checkpoint(src)
    fmt, kind = formats.detect(ckpt.config)
    linears, consumed = formats.find_linears(ckpt, fmt, kind)
    tensors = {n for n in ckpt.tensors if n not in consumed}
    pairs = find_pairs(ckpt.config, set(linears), tensors, cfg.pairs)
    if not pairs:
        raise ValueError(f"{src}: no smoothing sites found (model_type {ckpt.config.get('model_type')!r})")
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    batches = calibration_batches(tokenizer, texts, cfg.seq_len)
    dtype = torch.float32 if not str(device).startswith("cuda") else None
    model = load_model(src, device=device, dtype=dtype, fp8_fallback="bf16")
    if log:
        log(f"calibrate: {len(texts)} rows, {batches.numel()} tokens in {batches.shape[0]} sequences on {device}")
    t1 = time.perf_counter()
    acts = activation_maxima(model, {p.stat for p in pairs}, batches, device)
    t2 = time.perf_counter()
    modules = dict(model.named_modules())
    found, act, weight, skipped = [], [], [], []
    for p in pairs:
        if p.stat not in acts:
            skipped.append(f"{p.stat[1]} (no activations seen)")
            continue
        found.append(p)
        act.append(acts[p.stat])
        weight.append(torch.stack([_weight_max(modules[c]) for c in p.consumers]).amax(0))
    del model
    record = {
        "pair_kinds": list(cfg.pairs),
        "calibration": {
            "file": str(cfg.calib_path), "sha256": sha, "rows": len(texts), "seed": cfg.seed,
            "sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1]), "tokens": int(batches.numel()),
            "device": str(device), "dtype": str(dtype or formats.model_dtype(ckpt.config)).removeprefix("torch."),
            "seconds_load": round(t1 - t0, 2), "seconds_forward": round(t2 - t1, 2),
        },
    }
    return Maxima(found, act, weight, skipped, record)


def calibrate(src: Path | str, cfg: SmoothConfig, device: str = "cpu", log=None) -> Smoothing:
    """Smoothing factors of the checkpoint ``src`` at ``cfg.alpha`` (``measure``, then the factors)."""
    return measure(src, cfg, device, log).smoothing(cfg.alpha)


# ------------------------------------------------------------------------------------------------------ GPTQ


class HessianHooks:
    """Forward pre-hooks that accumulate each hooked linear's input Hessian. Linears called on the same input tensor
    (q/k/v on input_layernorm's output, gate/up, DeepSeek's q_a / kv_a, each expert's gate/up) share one
    accumulator, found by identity of the input on the first forward and added to once per forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        from ingot.quant.gptq import HessianAccumulator

        self._make = HessianAccumulator
        self.acc: list = []
        self.group: dict[str, int] = {}
        self._last: tuple[torch.Tensor, int] | None = None  # the latest input seen and its group
        self.handles = [m.register_forward_pre_hook(lambda m, a, name=name: self._see(name, a[0]))
                        for name, m in modules.items()]

    def _see(self, name: str, x: torch.Tensor) -> None:
        same = self._last is not None and self._last[0] is x
        g = self.group.get(name)
        if g is None:
            if same:
                g = self.group[name] = self._last[1]
            else:
                g = self.group[name] = len(self.acc)
                self.acc.append(self._make(x.shape[-1]))
                self.acc[g].add(x)
        elif same and self._last[1] == g:
            pass  # this input was added for an earlier linear of the group
        elif same:
            raise AssertionError(f"calibration: {name} shares its input with another Hessian group than on the first pass")
        else:
            self.acc[g].add(x)
        self._last = (x, g)

    def hessian(self, name: str) -> torch.Tensor | None:
        g = self.group.get(name)
        return None if g is None else self.acc[g].hessian()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


def _fold_smoothing(model: torch.nn.Module, smoothing: Smoothing, ckpt) -> None:
    """Apply the converter's smoothing to the loaded float model in place: each linear's weight (float32 math, as
    the converter's), each plain tensor (norm weights, biases, the router) rounded through its checkpoint dtype as
    the converter writes it."""
    from ingot.layers.linear import Linear

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    names = {n for f in smoothing.factors for n in (*f.pair.producers, *f.pair.consumers, *f.pair.extra_consumers)}
    with torch.no_grad():
        for name in sorted(names):
            module = modules.get(name)
            if isinstance(module, Linear):
                module.weight.copy_(smoothing.apply(name, module.weight.float()))
            elif name in params:
                t = smoothing.apply(name, params[name].float())
                params[name].copy_(t.to(ckpt.tensors[name].dtype) if name in ckpt.tensors else t)
            else:
                raise ValueError(f"smoothing: the model has no linear or tensor {name}")


def _act_fake_quant(scheme):
    """A forward pre-hook quantizing a linear's input as ``scheme`` does at run time (``ref``'s math), or None (A16)."""
    from ingot.quant import ref

    if scheme.activation == "token":
        return lambda m, a: (ref.dequantize_act(*ref.quantize_act_token(a[0])).to(a[0].dtype), *a[1:])
    if scheme.activation == "group":
        g = scheme.act_group_size
        return lambda m, a: (ref.dequantize_act(*ref.quantize_act_group(a[0], scheme.weight, g, scheme.scale_fmt), g)
                             .to(a[0].dtype), *a[1:])
    return None


@contextmanager
def _one_thread(device: torch.device):
    """GPTQ's column loop is hundreds of small ops per linear: on CPU, OpenMP's fork/join per op costs more than a
    second thread gains (a 1536 x 576 linear on the 2-vCPU VM: 0.15-0.27 s on 1 thread, 1.1-4.8 s on 2 under load)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _run_layer(layer: torch.nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
    """One decoder layer's output stream for input ``x`` (no cache, causal within each row). Layers that return
    (hidden, residual left un-added) are summed here, so either form of the layer API gives the full stream."""
    out = layer(x, rope, None)
    if isinstance(out, tuple):
        hidden, residual = out
        return hidden if residual is None else hidden + residual
    return out


def calibrate_gptq(src: Path | str, cfg, scheme, targets: dict[str, torch.dtype], smoothing: Smoothing | None = None,
                   device: str = "cpu", log=None):
    """GPTQ-quantize the linears ``targets`` ({module prefix: the format's scale dtype}) of the checkpoint ``src``.

    cfg: ``ingot.quant.gptq.GptqConfig``; scheme: the target Scheme; smoothing: folded into the model first (the
    Hessians are then those of the smoothed inputs, and the weights GPTQ rounds the smoothed ones, as the converter
    makes them). Runs decoder layer by layer over the calibration sequences: each layer's Hessians are collected
    with forward pre-hooks (linears sharing an input share one), its linears quantized, and, with
    ``cfg.sequential``, the layer run again with its quantized weights (and activation quantization of W8A8 schemes)
    to make the next layer's inputs. A target the forward never calls as a module (an MoE expert that got no token,
    DeepSeek's kv_b_proj, which attention absorbs) is left to the converter's round-to-nearest and listed in the
    record. Returns ``GptqWeights`` (in memory). Raises CalibrationDataError before loading anything when the
    calibration text is missing; GptqError for a scheme without a grid or a target stored quantized.
    """
    from transformers import AutoTokenizer

    from ingot import formats
    from ingot.formats.safetensors_io import Checkpoint
    from ingot.layers.linear import Linear
    from ingot.layers.moe import MoE
    from ingot.models.loader import load_model
    from ingot.quant import ref
    from ingot.quant.gptq import GptqError, GptqWeights, check_scheme, gptq_quantize

    t0 = time.perf_counter()
    check_scheme(scheme)
    texts, sha = calibration_rows(cfg)  # first: a missing file fails before minutes of loading
    src = Path(src)
    ckpt = Checkpoint(src)
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    batches = calibration_batches(tokenizer, texts, cfg.seq_len)
    dtype = torch.float32 if not str(device).startswith("cuda") else None
    model = load_model(src, device=device, dtype=dtype, fp8_fallback="bf16")
    modules = dict(model.named_modules())
    for name in targets:
        m = modules.get(name)
        if not isinstance(m, Linear):
            raise ValueError(f"calibration: the model has no linear {name} (expected from the checkpoint's names)")
        if m.kind != "bf16":
            raise GptqError(f"{src}: {name} is stored as {m.method.source_kind}; GPTQ needs float (or FP8) source weights")
    for m in modules.values():
        if isinstance(m, MoE):
            m.use_fused = False  # the per-expert loop calls each expert's Linears, so their hooks see their tokens
    if smoothing is not None:
        _fold_smoothing(model, smoothing, ckpt)
    if log:
        log(f"gptq: {len(texts)} rows, {batches.numel()} tokens in {batches.shape[0]} sequences on {device}, "
            f"{len(targets)} linears, {'sequential' if cfg.sequential else 'one pass'}")
    t1 = time.perf_counter()
    weights: dict[str, ref.QuantizedWeight] = {}
    info: dict[str, dict] = {}
    unseen: list[str] = []
    act_hook = _act_fake_quant(scheme)
    seconds_gptq = 0.0
    with torch.inference_mode():
        ids = batches.to(device)
        positions = torch.arange(ids.shape[1], device=device)[None]
        rope = model.model.rotary_emb(positions)
        hs = [model.model.embed_tokens(row[None]) for row in ids]  # (1, T, hidden) per sequence
        for li, layer in enumerate(model.model.layers[: model.num_layers]):
            prefix = f"model.layers.{li}."
            names = [n for n in targets if n.startswith(prefix)]
            if not names:
                hs = [_run_layer(layer, x, rope) for x in hs]
                continue
            hooks = HessianHooks({n: modules[n] for n in names})
            try:
                outs = [_run_layer(layer, x, rope) for x in hs]
            finally:
                hooks.remove()
            done = []
            for name in names:
                h = hooks.hessian(name)
                if h is None:
                    unseen.append(name)
                    continue
                ts = time.perf_counter()
                w = modules[name].weight.float()
                with _one_thread(w.device):
                    r = gptq_quantize(w, h, scheme, targets[name], damp=cfg.damp, block=cfg.block,
                                      act_order=cfg.act_order, scales=cfg.scales, name=f"{name}.weight")
                seconds_gptq += time.perf_counter() - ts
                weights[name] = ref.QuantizedWeight(scheme, r.qw.qweight.cpu(), r.qw.scale.cpu())
                info[name] = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in r.info.items()}
                done.append((name, r.qw))
            del hooks
            if cfg.sequential:
                handles = []
                for name, qw in done:
                    modules[name].weight.copy_(ref.dequantize_weight(qw))
                    if act_hook is not None:
                        handles.append(modules[name].register_forward_pre_hook(act_hook))
                for name in (n for n in names if n in unseen):  # what the converter will do with them
                    w = modules[name].weight.float()
                    modules[name].weight.copy_(ref.dequantize_weight(ref.quantize_weight(w, scheme, targets[name])))
                    if act_hook is not None:
                        handles.append(modules[name].register_forward_pre_hook(act_hook))
                try:
                    hs = [_run_layer(layer, x, rope) for x in hs]
                finally:
                    for h in handles:
                        h.remove()
            else:
                hs = outs
            del outs
            if log:
                ratio = [info[n]["loss_gptq"] / info[n]["loss_rtn"] for n, _ in done if info[n]["loss_rtn"]]
                log(f"gptq: layer {li}: {len(done)} linears, loss / RTN mean "
                    f"{sum(ratio) / max(1, len(ratio)):.3f}, {time.perf_counter() - t1:.0f}s")
    t2 = time.perf_counter()
    del model
    record = {
        "method": "gptq",
        **{k: v for k, v in cfg.job().items() if k not in ("calib_path", "samples", "seq_len", "seed")},
        "scheme": scheme.name,
        "calibration": {
            "file": str(cfg.calib_path), "sha256": sha, "rows": len(texts), "seed": cfg.seed,
            "sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1]), "tokens": int(batches.numel()),
            "device": str(device), "dtype": str(dtype or formats.model_dtype(ckpt.config)).removeprefix("torch."),
            "smoothed": smoothing is not None,
            "seconds_load": round(t1 - t0, 2), "seconds_forward": round(t2 - t1 - seconds_gptq, 2),
            "seconds_gptq": round(seconds_gptq, 2),
        },
        "rtn_fallback": sorted(unseen),
        "linears": info,
    }
    return GptqWeights(scheme, weights, record)
