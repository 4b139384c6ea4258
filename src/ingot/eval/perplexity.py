"""Perplexity over fixed context windows, the way llama.cpp's ``llama-perplexity`` computes it.

The method (llama.cpp tools/perplexity/perplexity.cpp, ``perplexity()``): tokenize the whole text once, cut it
into ``n_chunk = n_tokens // n_ctx`` windows of ``n_ctx`` tokens (non-overlapping: the stride is ``n_ctx``; the
tail that does not fill a window is dropped), put BOS in each window's first position when the vocabulary adds
one, evaluate each window from an empty cache, and score only its second half: with ``first = n_ctx // 2`` the
logits at positions ``first .. n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1``, i.e. ``n_ctx - 1 - first``
tokens per window (255 at n_ctx 512), each with at least ``first`` tokens of context. Tokens in the first half
of a window only serve as context, so no score is made with a short context.

ingot's choices: n_ctx 512 (llama.cpp's default for WikiText-2 comparisons), stride n_ctx (llama.cpp's; a
smaller stride, e.g. ``n_ctx - first - 1``, scores every token once at the cost of more windows), NLL summed in
float64. On SmolLM2's tokenizer WikiText-2 test (its bytes, CRLF line ends kept: ``DataDir.wikitext_test``) is
304,839 tokens: 595 windows, 151,725 scored tokens.
The same windows feed the KL comparison (``ingot.eval.kl``), so both models see identical inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# score(input_ids int64 [B, T]) -> float32 logits [B, T, vocab]: causal attention over each row, no cache
# (CausalLM.score). Tensors stay on the scorer's device.
Score = Callable[[torch.Tensor], torch.Tensor]

# Rows of [rows, vocab] float64 temporaries processed at once: 2^24 elements = 128 MiB each (341 rows at
# SmolLM2's 49,152-token vocabulary, 130 at Llama-3's 128,256), a few of them alive at a time.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class WindowConfig:
    n_ctx: int = 512
    stride: int | None = None  # None: n_ctx (non-overlapping, llama.cpp)

    def __post_init__(self) -> None:
        if self.n_ctx < 4:
            raise ValueError(f"n_ctx {self.n_ctx}: a window needs at least 4 tokens (half context, half scored)")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride {self.stride}: must be positive")

    @property
    def step(self) -> int:
        return self.stride or self.n_ctx

    @property
    def first(self) -> int:
        """Logit position of the first scored prediction: the first half of each window is context only."""
        return self.n_ctx // 2

    @property
    def scored_per_window(self) -> int:
        return self.n_ctx - 1 - self.first


def make_windows(tokens: torch.Tensor | list[int], cfg: WindowConfig, bos_id: int | None = None) -> torch.Tensor:
    """int64 [W, n_ctx] windows starting every ``cfg.step`` tokens; W = (n - n_ctx) // step + 1.

    ``bos_id``: written over each window's first token (llama.cpp does so when the vocabulary adds BOS); that
    position is context, never a scored target.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    n = tokens.numel()
    if n < cfg.n_ctx:
        raise ValueError(f"text has {n} tokens, fewer than one window of n_ctx {cfg.n_ctx}")
    windows = tokens.unfold(0, cfg.n_ctx, cfg.step).clone()  # (W, n_ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def scored_logits(
    score: Score, windows: torch.Tensor, first: int, batch_tokens: int = 4096
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """Run ``score`` over the windows in batches of about ``batch_tokens`` tokens.

    Yields (index of the batch's first window, logits float32 [b, n_ctx - 1 - first, vocab] at the scored
    positions, targets int64 [b, n_ctx - 1 - first], seconds spent in ``score``) per batch.
    """
    n_windows, n_ctx = windows.shape
    per_batch = max(1, batch_tokens // n_ctx)
    for start in range(0, n_windows, per_batch):
        batch = windows[start : start + per_batch]
        t0 = time.perf_counter()
        logits = score(batch)
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"score returned logits of shape {tuple(logits.shape)} for input {tuple(batch.shape)}; "
                             "expected [B, T, vocab]")
        logits = logits[:, first:-1]
        _sync(logits.device)
        seconds = time.perf_counter() - t0
        yield start, logits, batch[:, first + 1 :].to(logits.device), seconds


def row_chunks(n_rows: int, vocab: int) -> Iterator[slice]:
    """Slices of at most CHUNK_ELEMENTS // vocab rows (at least one)."""
    step = max(1, CHUNK_ELEMENTS // vocab)
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


class NllStats:
    """Running sums of per-token negative log-likelihoods (float64), per window and overall."""

    def __init__(self, n_windows: int):
        self.window_nll = [0.0] * n_windows
        self.window_tokens = [0] * n_windows
        self.sum = 0.0
        self.sum_sq = 0.0
        self.count = 0

    def add(self, window: int, nll: torch.Tensor) -> None:
        """nll: float64 [n] of one window's scored tokens."""
        s = float(nll.sum())
        self.window_nll[window] += s
        self.window_tokens[window] += nll.numel()
        self.sum += s
        self.sum_sq += float((nll * nll).sum())
        self.count += nll.numel()

    def result(self) -> dict:
        """ppl = exp(mean NLL); its standard error by the delta method, as llama.cpp prints (PPL = x +/- y)."""
        if self.count == 0:
            raise ValueError("no scored tokens")
        mean = self.sum / self.count
        var = max(self.sum_sq / self.count - mean * mean, 0.0)
        stderr = math.sqrt(var / (self.count - 1)) if self.count > 1 else float("nan")
        ppl = math.exp(mean)
        return {"ppl": ppl, "ppl_stderr": ppl * stderr, "nll_mean": mean, "tokens": self.count}


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] in float64: logits [n, vocab], targets int64 [n] -> [n]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def perplexity(score: Score, windows: torch.Tensor, cfg: WindowConfig, batch_tokens: int = 4096,
               window_ids: list[int] | None = None) -> tuple[dict, list[dict]]:
    """Perplexity of ``score`` on ``windows`` int64 [W, n_ctx] (from ``make_windows``).

    Returns (metrics, per-window items). metrics: ppl, ppl_stderr, nll_mean, tokens (scored), windows,
    nonfinite_windows, model_seconds, model_tokens_per_s (window tokens through ``score`` per second).
    ``window_ids``: each window's index in the full list (for the items), default 0..W-1.
    """
    stats = NllStats(windows.shape[0])
    model_seconds = 0.0
    for start, logits, targets, seconds in scored_logits(score, windows, cfg.first, batch_tokens):
        model_seconds += seconds
        for b in range(logits.shape[0]):
            for rows in row_chunks(logits.shape[1], logits.shape[2]):
                stats.add(start + b, token_nll(logits[b, rows], targets[b, rows]).cpu())
    return window_metrics(stats, windows, model_seconds, window_ids), window_items(stats, cfg, window_ids)


def window_metrics(stats: NllStats, windows: torch.Tensor, model_seconds: float,
                   window_ids: list[int] | None = None) -> dict:
    """NllStats.result() plus windows, timing and ``nonfinite_windows``: the ids of windows whose log-probabilities
    were NaN or inf (a numerics bug in the model: ppl is then NaN, written as null, and these name where to look)."""
    m = stats.result()
    ids = window_ids if window_ids is not None else list(range(len(stats.window_nll)))
    m["nonfinite_windows"] = [w for w, nll in zip(ids, stats.window_nll) if not math.isfinite(nll)]
    m["windows"] = windows.shape[0]
    m["model_seconds"] = model_seconds
    m["model_tokens_per_s"] = windows.numel() / model_seconds if model_seconds > 0 else None
    return m


def window_items(stats: NllStats, cfg: WindowConfig, window_ids: list[int] | None) -> list[dict]:
    ids = window_ids if window_ids is not None else list(range(len(stats.window_nll)))
    return [
        {"window": w, "start": w * cfg.step, "nll_sum": nll, "tokens": n}
        for w, nll, n in zip(ids, stats.window_nll, stats.window_tokens)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
