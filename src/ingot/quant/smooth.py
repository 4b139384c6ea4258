"""SmoothQuant smoothing (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

A linear's input channel j is divided by s_j and its weight column j multiplied by s_j: ``(X / s) @ (W * s).T``
is ``X @ W.T`` exactly (in exact arithmetic). The division is folded offline into the op that produces X, so the
converted checkpoint is an ordinary one of the same graph - loaders need nothing new:

- ``norm``: an RMSNorm output feeding linears (``input_layernorm`` -> q/k/v, or DeepSeek's q_a / kv_a / q_proj;
  ``post_attention_layernorm`` -> gate/up, MoE experts, shared experts and the router's columns; DeepSeek's
  ``q_a_layernorm`` -> q_b): the norm weight is divided by s.
- ``up-down``: SwiGLU ``down(silu(gate x) * up x)`` is linear in up's output: up_proj rows (and bias) / s.
- ``v-o``: attention output is a convex mix of v rows per head: v_proj rows (and bias) / s, o_proj columns * s.
  With GQA one kv head serves ``H / Hkv`` query heads, so s is shared across them (max over the group).

Factors (SmoothQuant eq. 4): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, the activation maximum over a
calibration set, the weight maximum over the rows of every consumer. alpha = 0 leaves activations alone; 1 moves
everything into the weights. A channel whose activation or weight maximum is 0 keeps s = 1.

This module holds the names, the math and the fold; the calibration forward that measures ``max|X_j|`` needs the
runtime model and lives downstream (``ingot.calibrate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PAIR_KINDS = ("norm", "up-down", "v-o")
# v-o is off by default: on SmolLM2-135M int8-channel (8 WikiText-2 windows) it changed KL 0.01306 -> 0.01319,
# within noise, while touching two more tensors per layer (benchmarks/results/smoothquant-smollm2-cpu-*.json).
DEFAULT_PAIRS = ("norm", "up-down")
DEFAULT_ALPHA = 0.5
MIN_SCALE = 1e-5  # SmoothQuant's clamp: a dead channel must not divide its producer by ~0


@dataclass(frozen=True)
class SmoothConfig:
    """What ``ingot convert --smooth`` was asked for; part of the conversion's job record (same config: same bytes).

    calib_path: GSM8K train.jsonl (``$INGOT_DATA_DIR/gsm8k/train.jsonl``): calibration text, never an eval test set.
    samples: rows drawn (seeded) from it, joined and cut into ``seq_len``-token sequences (the tail dropped).
    """

    alpha: float = DEFAULT_ALPHA
    calib_path: Path | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    pairs: tuple[str, ...] = DEFAULT_PAIRS

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothing alpha {self.alpha}: must be in [0, 1]")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"calibration samples {self.samples} / seq_len {self.seq_len}: must be >= 1 / >= 2")
        bad = [p for p in self.pairs if p not in PAIR_KINDS]
        if bad or not self.pairs:
            raise ValueError(f"smoothing pairs {list(self.pairs)}: expected one or more of {', '.join(PAIR_KINDS)}")

    def job(self) -> dict:
        return {"alpha": self.alpha, "calib_path": str(self.calib_path), "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed, "pairs": list(self.pairs)}


@dataclass(frozen=True)
class Pair:
    """One smoothing site. ``stat`` names what is measured: ``("out", module)`` its output (a norm), or
    ``("in", module)`` its input (a linear). ``producers``: tensors whose output channels are divided by s
    (norm weights, linear prefixes whose rows are divided, biases). ``consumers``: linear prefixes whose columns are
    multiplied by s; ``extra_consumers``: plain tensors multiplied the same way (the MoE router ``mlp.gate.weight``).
    ``groups``: v-o under GQA, the number of query heads per kv head (consumer channels = groups x producer's)."""

    kind: str
    stat: tuple[str, str]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    extra_consumers: tuple[str, ...] = ()
    groups: int = 1
    head_dim: int = 0


def find_pairs(config: dict, linears: set[str], tensors: set[str], kinds: tuple[str, ...] = PAIR_KINDS) -> list[Pair]:
    """Every smoothing site of a Llama-family or DeepSeek-V3 checkpoint, from its config and names alone.

    linears: module prefixes of its linears; tensors: names of its other tensors (norm weights, biases, router).
    DeepSeek's ``kv_a_layernorm`` -> ``kv_b_proj`` is left out: the runtime absorbs kv_b_proj into attention, so it
    never sees the normed latent as an input to measure. MTP layers (beyond num_hidden_layers) are left out.
    """
    n_layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads or 1)
    head_dim = int(config.get("head_dim") or (config["hidden_size"] // heads if heads else 0))
    pairs: list[Pair] = []
    for i in range(n_layers):
        L = f"model.layers.{i}"
        att = f"{L}.self_attn"
        if "norm" in kinds:
            qkv = [f"{att}.{n}" for n in ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
                   if f"{att}.{n}" in linears]
            if qkv and f"{L}.input_layernorm.weight" in tensors:
                pairs.append(Pair("norm", ("out", f"{L}.input_layernorm"), (f"{L}.input_layernorm.weight",), tuple(qkv)))
            if f"{att}.q_b_proj" in linears and f"{att}.q_a_layernorm.weight" in tensors:
                pairs.append(Pair("norm", ("out", f"{att}.q_a_layernorm"), (f"{att}.q_a_layernorm.weight",),
                                  (f"{att}.q_b_proj",)))
            mlp_in = sorted(p for p in linears if p.startswith(f"{L}.mlp.") and re.search(r"\.(gate|up)_proj$", p))
            router = [t for t in (f"{L}.mlp.gate.weight",) if t in tensors]
            if mlp_in and f"{L}.post_attention_layernorm.weight" in tensors:
                pairs.append(Pair("norm", ("out", f"{L}.post_attention_layernorm"),
                                  (f"{L}.post_attention_layernorm.weight",), tuple(mlp_in), tuple(router)))
        if "up-down" in kinds:
            for down in sorted(p for p in linears if p.startswith(f"{L}.mlp") and p.endswith(".down_proj")):
                up = down.removesuffix("down_proj") + "up_proj"
                if up in linears:
                    producers = (up, *[t for t in (f"{up}.bias",) if t in tensors])
                    pairs.append(Pair("up-down", ("in", down), producers, (down,)))
        if "v-o" in kinds and f"{att}.v_proj" in linears and f"{att}.o_proj" in linears and heads and head_dim:
            v = f"{att}.v_proj"
            producers = (v, *[t for t in (f"{v}.bias",) if t in tensors])
            pairs.append(Pair("v-o", ("in", f"{att}.o_proj"), producers, (f"{att}.o_proj",),
                              groups=heads // kv_heads, head_dim=head_dim))
    return pairs


def smooth_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_max^alpha / weight_max^(1 - alpha), float32 [K]; 1 where either maximum is 0 (or not finite)."""
    a, w = act_max.float(), weight_max.float()
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class PairFactors:
    """A pair with its factors: ``s`` [producer channels]; consumers see ``consumer_s`` (s repeated per q head)."""

    pair: Pair
    s: torch.Tensor
    act_max: float  # largest |x| at the site before smoothing
    act_max_after: float  # ... and after (max_j act_max_j / s_j)

    @property
    def consumer_s(self) -> torch.Tensor:
        p = self.pair
        if p.kind != "v-o" or p.groups == 1:
            return self.s
        # producer channel (g, j) of kv head g serves consumer channels (h, j) for h in g*groups .. (g+1)*groups - 1
        return self.s.view(-1, 1, p.head_dim).expand(-1, p.groups, -1).reshape(-1)


def pair_factors(pair: Pair, act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> PairFactors:
    """Factors of one pair from its consumer-side maxima (act_max, weight_max: float32 [consumer channels]).

    v-o with GQA: both maxima are reduced over the query heads of each kv group first, so one s per v channel.
    """
    if pair.kind == "v-o" and pair.groups > 1:
        act_max = act_max.view(-1, pair.groups, pair.head_dim).amax(1).reshape(-1)
        weight_max = weight_max.view(-1, pair.groups, pair.head_dim).amax(1).reshape(-1)
    s = smooth_factors(act_max, weight_max, alpha)
    return PairFactors(pair, s, float(act_max.max()), float((act_max / s).max()))


@dataclass
class Smoothing:
    """Factors of every pair, and the fold: ``apply(name, w)`` for each tensor or linear weight the converter writes.

    record: what the manifest keeps (alpha, calibration, pairs and their before/after activation maxima).
    """

    factors: list[PairFactors]
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._mul: dict[str, torch.Tensor] = {}
        self._div: dict[str, torch.Tensor] = {}
        for f in self.factors:
            for name in f.pair.producers:
                self._fold(self._div, name, f.s)
            for name in (*f.pair.consumers, *f.pair.extra_consumers):
                self._fold(self._mul, name, f.consumer_s)

    @staticmethod
    def _fold(table: dict[str, torch.Tensor], name: str, s: torch.Tensor) -> None:
        table[name] = table[name] * s if name in table else s.float()

    def only(self, keep) -> "Smoothing":
        """The pairs for which ``keep(pair)`` is true (e.g. those with a quantized consumer)."""
        return Smoothing([f for f in self.factors if keep(f.pair)], self.record)

    def touches(self, name: str) -> bool:
        return name in self._mul or name in self._div

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The tensor ``name`` (a linear's prefix for its weight [N, K], or a 1-D norm weight / bias, or the router's
        [E, K]) with its columns multiplied and its rows divided by their factors; float32. Unchanged if untouched."""
        if not self.touches(name):
            return w
        w = w.float()
        if name in self._mul:
            w = w * self._mul[name].to(w.device)
        if name in self._div:
            s = self._div[name].to(w.device)
            w = w / (s if w.dim() == 1 else s.view(-1, *([1] * (w.dim() - 1))))
        return w

    def summary(self) -> dict:
        """Manifest entry: the record plus one line per pair."""
        return {
            **self.record,
            "pairs": [
                {"kind": f.pair.kind, "producers": list(f.pair.producers),
                 "consumers": list(f.pair.consumers) + list(f.pair.extra_consumers),
                 "act_max": round(f.act_max, 4), "act_max_after": round(f.act_max_after, 4),
                 "s_min": round(float(f.s.min()), 6), "s_max": round(float(f.s.max()), 6)}
                for f in self.factors
            ],
        }

    # ---- kept between a killed conversion and its resumption (DST/.ingot/smoothing.safetensors)
    def save(self, path: Path) -> None:
        import json

        tensors = {f"{i}": f.s.contiguous() for i, f in enumerate(self.factors)}
        meta = {"record": json.dumps(self.record),
                "pairs": json.dumps([[f.pair.kind, list(f.pair.stat), list(f.pair.producers), list(f.pair.consumers),
                                      list(f.pair.extra_consumers), f.pair.groups, f.pair.head_dim,
                                      f.act_max, f.act_max_after] for f in self.factors])}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Smoothing":
        import json

        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        factors = []
        for i, (kind, stat, prod, cons, extra, groups, hd, amax, amax_after) in enumerate(json.loads(meta["pairs"])):
            pair = Pair(kind, tuple(stat), tuple(prod), tuple(cons), tuple(extra), groups, hd)
            factors.append(PairFactors(pair, tensors[str(i)], amax, amax_after))
        return cls(factors, json.loads(meta["record"]))
