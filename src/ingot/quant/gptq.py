"""GPTQ (Frantar et al. 2022): round a linear's weight column by column, each rounding error pushed onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs, so that ``||X W^T - X Q^T||``
(not ``||W - Q||``) is what gets small.

For one linear, W [N, K] and H = 2 X^T X / n (K x K, from n calibration tokens x [K]):

1. Dead input channels (H_jj = 0: never non-zero in calibration) get H_jj = 1. Their columns keep their weights
   and are rounded to nearest: with no correlation to any other channel, no error flows into or out of them.
   (The reference implementation zeroes them; a channel silent in calibration may not be silent at run time.)
2. Dampening: ``damp * mean(diag H)`` is added to the diagonal (default 1%). If the Cholesky factorisation still
   fails, the damp is multiplied by 10, up to 3 times; the damp used is recorded.
3. ``U = chol(H^-1)`` upper (the reference's ``cholesky -> cholesky_inverse -> cholesky(upper)``, in float64).
4. Columns in lazy blocks of ``block`` (128): column j is rounded to ``q_j``, ``e = (w_j - q_j) / U_jj``, the rest of
   the block gets ``- e U_j,j+1:``; the columns after the block get the block's errors in one matmul at its end.

The grid is the scheme's, through ``ingot.quant.ref`` (one reference per numeric scheme): scales are
``ref.quantize_weight``'s (amax / QMAX per channel, 128x128 block or group, rounded up to the target format's scale
dtype), a value is ``ref``'s half-to-even round and clamp of ``w / s`` (int8 +-127, int4 [-8, 7], e4m3 +-448), and a
zero scale (an all-zero tile) gives 0. GPTQ decides only which grid point each weight takes, so the result is an
ordinary ``QuantizedWeight`` of the scheme: every format writes it and every loader reads it unchanged.

Scales (``scales``): "static" (default) computes every scale from the original W before any column is rounded, as
llm-compressor does per channel and group; updated weights beyond a scale's range clamp. "dynamic" computes a
group's (int4-group) or 128-column block's (int8-block, fp8-block) scales from the error-updated weights when GPTQ
reaches the group's first column, as the GPTQ paper and AutoGPTQ without static_groups do. Per-channel scales span
all of K, so they are always static. ``act_order`` (columns in descending H_jj) needs static scales: each column
keeps its own group's scale and the stored layout stays the plain one (no g_idx).

With H = I (uncorrelated inputs) nothing is pushed anywhere and GPTQ returns exactly ``ref.quantize_weight``'s RTN.
The Hessians come from a calibration forward (``ingot.calibrate.calibrate_gptq``), downstream of this package.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ingot.formats.base import cdiv
from ingot.quant import ref
from ingot.quant.schemes import Scheme

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
DAMP_RETRIES = 3  # x10 each: 1% -> 10% -> 100% -> 1000% of the mean diagonal before giving up
ScaleMode = Literal["static", "dynamic"]


class GptqError(ValueError):
    """GPTQ cannot quantize this linear (or this scheme) as asked."""


@dataclass(frozen=True)
class GptqConfig:
    """What ``ingot convert --gptq`` was asked for; part of the conversion's job record (same config: same bytes).

    damp: fraction of mean(diag H) added to the diagonal. block: columns per lazy update. act_order: columns in
    descending H_jj (static scales only). scales: "static" | "dynamic" (module docstring). sequential: each decoder
    layer's Hessians from the outputs of the layers before it *already quantized* (weights and, for W8A8 schemes,
    activations, as they will run), as llm-compressor's sequential pipeline; False: every Hessian from the original
    model in one pass. Calibration text as ``SmoothConfig``'s: GSM8K train rows (``calib_path``), ``samples`` drawn
    with ``seed``, cut into ``seq_len``-token sequences.
    """

    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    act_order: bool = False
    scales: ScaleMode = "static"
    sequential: bool = True
    calib_path: Path | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"GPTQ damp {self.damp}: must be in (0, 1] (a fraction of the Hessian's mean diagonal)")
        if self.block < 1:
            raise ValueError(f"GPTQ block {self.block}: must be >= 1")
        if self.scales not in ("static", "dynamic"):
            raise ValueError(f"GPTQ scales {self.scales!r}: expected 'static' or 'dynamic'")
        if self.act_order and self.scales != "static":
            raise ValueError("GPTQ act_order needs static scales (dynamic group scales would follow the permuted "
                             "order and need a g_idx in the stored layout)")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"calibration samples {self.samples} / seq_len {self.seq_len}: must be >= 1 / >= 2")

    def job(self) -> dict:
        return {"damp": self.damp, "block": self.block, "act_order": self.act_order, "scales": self.scales,
                "sequential": self.sequential, "calib_path": str(self.calib_path), "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed}


def check_scheme(scheme: Scheme) -> None:
    """Raise GptqError unless ``scheme`` has a weight grid GPTQ can round onto (every quantized preset has)."""
    if not scheme.is_quantized:
        raise GptqError(f"GPTQ needs a quantized scheme; {scheme.name} keeps weights in source precision")
    if scheme.weight not in ("int8", "int4", "fp8_e4m3"):
        raise GptqError(f"GPTQ is not offered for {scheme.name} ({scheme.weight} weights)")


# ------------------------------------------------------------------------------------------------- Hessian


class HessianAccumulator:
    """Running ``sum x x^T`` over calibration tokens (float64 [K, K], each batch's product taken in float32) and
    their count; ``hessian()`` is H = 2 X^T X / n. On the device of the first batch."""

    def __init__(self, k: int):
        self.k = k
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., K]: every row is one token's input."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if x2.shape[1] != self.k:
            raise ValueError(f"Hessian of K = {self.k}: got inputs with {x2.shape[1]} features")
        xtx = (x2.T @ x2).double()
        self.sum = xtx if self.sum is None else self.sum.add_(xtx)
        self.n += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None or self.n == 0:
            raise ValueError("Hessian: no inputs were seen")
        return self.sum * (2.0 / self.n)


# ---------------------------------------------------------------------------------------------- quantize


@dataclass
class GptqResult:
    """One linear: ``qw`` (the scheme's QuantizedWeight) and what it cost: loss = tr((W - Q) H (W - Q)^T) for GPTQ and
    for round-to-nearest on the same scales, dead channels, the damp used, seconds."""

    qw: ref.QuantizedWeight
    info: dict = field(default_factory=dict)


def _group_width(scheme: Scheme, k: int) -> int:
    """Columns that share a scale column: K for per-channel, the block's bk, or the group size."""
    return {"channel": k, "block": scheme.block_size[1], "group": scheme.group_size}[scheme.granularity]


def _row_scales(scale: torch.Tensor, scheme: Scheme, n: int) -> torch.Tensor:
    """The scale grid [rows of tiles, G] -> float32 [N, G]: each row's scale per column group (blocks: bn rows share)."""
    s = scale.float()
    if scheme.granularity == "block" and s.shape[0] != n:
        s = s.repeat_interleave(scheme.block_size[0], dim=0)[:n]
    return s


def _round(w: torch.Tensor, s: torch.Tensor, weight: str) -> torch.Tensor:
    """w [N], its scales s [N] (float32) -> grid values [N] (int8 or e4m3): ``ref``'s round-and-clamp of w / s, 0 where
    s = 0 (an all-zero tile; GPTQ's updates may have made its weights non-zero, its stored value stays 0)."""
    live = s > 0
    x = torch.where(live, w / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(w))
    return ref._cast(x, weight)


def _cholesky_inverse_upper(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """chol(H + d I)^-1 as the upper factor U (U^T U = (H + d I)^-1), float64; d = damp * mean(diag H), retried x10."""
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10**attempt
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return up, d
    raise GptqError(f"{name or 'linear'}: the calibration Hessian is not positive definite even with damp {d:g} "
                    "(check the calibration inputs for NaN/Inf)")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype = torch.float32,
    *,
    damp: float = DEFAULT_DAMP,
    block: int = DEFAULT_BLOCK,
    act_order: bool = False,
    scales: ScaleMode = "static",
    name: str = "",
) -> GptqResult:
    """Quantize the float weight ``w`` [N, K] onto ``scheme``'s grid with GPTQ, given its input Hessian ``h`` [K, K].

    scale_dtype: the dtype the target format stores scales in (``ref.quantize_weight``'s). Deterministic: the same
    inputs on the same device give the same bytes. Raises GptqError for a scheme without a grid, a Hessian of the
    wrong shape, or one that no damp makes positive definite; ref.NonFiniteError for NaN/Inf weights.
    """
    t0 = time.perf_counter()
    check_scheme(scheme)
    if w.dim() != 2:
        raise GptqError(f"{name or 'weight'}: expected a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if tuple(h.shape) != (k, k):
        raise GptqError(f"{name or 'weight'}: Hessian of shape {tuple(h.shape)} for K = {k}; expected ({k}, {k})")
    if act_order and scales != "static":
        raise GptqError("act_order needs static scales")
    g = _group_width(scheme, k)
    if scales == "dynamic" and scheme.granularity != "channel" and block % g and g % block:
        raise GptqError(f"dynamic scales: the lazy block {block} and the scale group {g} must divide one another")
    w0 = w.float()
    rtn = ref.quantize_weight(w0, scheme, scale_dtype=scale_dtype, name=name)  # the scales (static), and the baseline

    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    hp = h[perm][:, perm] if perm is not None else h
    u, damp_used = _cholesky_inverse_upper(hp, damp, name)
    u = u.to(device=w0.device, dtype=torch.float32)

    # Transposed ([K, N]: one row per column of W) so that a column and the rows still to update are contiguous:
    # the rank-1 update of the block's remaining columns ran 25x faster so than on column views of [N, K].
    WT = (w0[:, perm] if perm is not None else w0).T.contiguous()
    cols = perm.tolist() if perm is not None else list(range(k))  # original column of each processed position
    dynamic = scales == "dynamic" and scheme.granularity != "channel"
    if dynamic:
        grid = torch.zeros_like(rtn.scale)  # filled group by group
        s_rows = torch.zeros(n, cdiv(k, g), dtype=torch.float32, device=w0.device)
    else:
        grid = rtn.scale
        s_rows = _row_scales(grid, scheme, n)
    s_cols = s_rows.T.contiguous()  # [G, N]
    qT = torch.empty((k, n), dtype=rtn.qweight.dtype, device=w0.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = WT[i1:i2].clone()  # (b, N)
        E1 = torch.zeros_like(W1)
        U1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = cols[i1 + i]
            if dynamic and j % g == 0:  # a new group: its scales from the current (updated) weights
                current = torch.cat([W1[i:], WT[i2:]], dim=0)[: min(g, k - j)].T
                sg = ref.quantize_weight(current, scheme, scale_dtype=scale_dtype, name=name).scale  # one column
                grid[:, j // g] = sg[:, 0]
                s_cols[j // g] = _row_scales(sg, scheme, n)[:, 0]
            s = s_cols[j // g]
            wj = W1[i]
            qj = _round(wj, s, scheme.weight)
            qT[j] = qj
            err = (wj - qj.float() * s) / U1[i, i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            E1[i] = err
        if i2 < k:
            WT[i2:].sub_(u[i1:i2, i2:].T @ E1)
    q = qT.T.contiguous()
    qw = ref.QuantizedWeight(scheme, q, grid)

    hf = h.to(device=w0.device, dtype=torch.float32)
    hf[dead, dead] = 0.0  # the loss over the real inputs: a dead channel's error costs nothing

    def loss(x: ref.QuantizedWeight) -> float:
        e = w0 - ref.dequantize_weight(x)
        return float(((e @ hf) * e).sum())

    info = {"loss_gptq": loss(qw), "loss_rtn": loss(rtn), "dead": int(dead.sum()), "damp": damp_used,
            "seconds": round(time.perf_counter() - t0, 4)}
    return GptqResult(qw, info)


# ------------------------------------------------------------------------------------ the results of a run


class GptqWeights:
    """GPTQ's quantized linears of one conversion, by module prefix, and its record (what the manifest keeps).

    Kept in DST/.ingot/gptq.safetensors between calibration and the shards that write them (and a resumed
    conversion): ``{prefix}.q`` (int8 / e4m3 [N, K]) and ``{prefix}.s`` (the scale grid in the format's dtype).
    ``open(path)`` reads them lazily, one linear at a time, so worker processes get only the path.
    """

    def __init__(self, scheme: Scheme, weights: dict[str, ref.QuantizedWeight] | None = None, record: dict | None = None,
                 path: Path | None = None):
        self.scheme = scheme
        self.weights = weights if weights is not None else {}
        self.record = record or {}
        self.path = path
        self._names: set[str] | None = None

    def names(self) -> set[str]:
        if self.path is None:
            return set(self.weights)
        if self._names is None:
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                self._names = {k[:-2] for k in f.keys() if k.endswith(".q")}
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> ref.QuantizedWeight:
        if self.path is None:
            return self.weights[name]
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return ref.QuantizedWeight(self.scheme, f.get_tensor(f"{name}.q"), f.get_tensor(f"{name}.s"))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, qw in self.weights.items():
            tensors[f"{name}.q"] = qw.qweight.contiguous().cpu()
            tensors[f"{name}.s"] = qw.scale.contiguous().cpu()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"scheme": self.scheme.name, "record": json.dumps(self.record)})
        tmp.replace(path)

    @classmethod
    def open(cls, path: Path) -> "GptqWeights":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        return cls(Scheme.from_name(meta["scheme"]), None, json.loads(meta["record"]), path)

    def __getstate__(self) -> dict:  # to worker processes: the path, never the tensors
        if self.path is None:
            raise TypeError("GptqWeights: save() and open() it before handing it to another process")
        return {"scheme": self.scheme, "record": self.record, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["scheme"], None, state["record"], state["path"])

    def summary(self) -> dict:
        """Manifest entry: the record (config, calibration, per-linear losses) plus totals."""
        lin = self.record.get("linears", {})
        ratios = [v["loss_gptq"] / v["loss_rtn"] for v in lin.values() if v.get("loss_rtn")]
        return {
            **self.record,
            "quantized": len(lin),
            "loss_ratio_mean": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "loss_ratio_max": round(max(ratios), 4) if ratios else None,
        }
