"""KL divergence of a model's next-token distributions from a reference model's, the llama.cpp way.

Method (llama.cpp tools/perplexity/perplexity.cpp, ``kl_divergence()``, run as ``llama-perplexity
--kl-divergence``): both models see the same perplexity windows (``ingot.eval.perplexity``: n_ctx tokens, second
half scored); at every scored position

    KL(ref || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))

and "same top p" is whether the two argmax tokens agree. llama.cpp reports mean KL +/- its standard error, the
percentiles of the per-token KL (99.0%, median, ...) and the top-1 agreement; also both perplexities from the
same forwards. ingot computes the same from full log-softmax of both models in float64 (llama.cpp stores the
reference's log-probs quantized to 16 bits and skips reference probabilities below e^-16; ingot runs both
models side by side, window by window, so nothing is stored or rounded).
"""

from __future__ import annotations

import math

import torch

from ingot.eval.perplexity import NllStats, Score, WindowConfig, row_chunks, scored_logits, window_items, window_metrics

KL_PERCENTILES = (0.5, 0.9, 0.99, 0.999)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token statistics of one chunk of positions, all float64 [n] (top1 bool [n]).

    logits, ref_logits: float [n, vocab] of the model and the reference at the same positions; targets int64 [n].
    kl: KL(ref || model); nll / ref_nll: -log p of the target under each; top1: the argmaxes agree.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"model logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} differ "
                         "in shape (different vocabularies?)")
    logp = torch.log_softmax(logits.double(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    # p_ref * (log p_ref - log p): where p_ref underflows to 0 the term is 0 (exp(-inf) * finite).
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    t = targets[:, None]
    return {
        "kl": kl,
        "nll": -logp.gather(-1, t).squeeze(-1),
        "ref_nll": -ref_logp.gather(-1, t).squeeze(-1),
        # argmax of the logits (not of the float64 log-softmax, whose rounding could split exact ties differently)
        "top1": logits.argmax(-1) == ref_logits.argmax(-1),
    }


def kl_divergence(score: Score, ref_score: Score, windows: torch.Tensor, cfg: WindowConfig, batch_tokens: int = 4096,
                  window_ids: list[int] | None = None) -> tuple[dict, list[dict], dict]:
    """KL(ref || model), top-1 agreement and both perplexities over ``windows`` int64 [W, n_ctx].

    Returns (metrics, per-window items, ppl metrics of the model from the same forwards). metrics: kl_mean,
    kl_stderr, kl_median, kl_p90, kl_p99, kl_p999, kl_max, top1 (fraction), top1_stderr, tokens, ppl,
    ref_ppl, dppl_pct (100 * (ppl / ref_ppl - 1)), ln_ppl_ratio, ref_model_seconds.
    Items: per window {window, start, kl_sum, top1, nll_sum, ref_nll_sum, tokens}. ``ref_score is score``: the
    model is its own reference (KL 0, top-1 1 by construction) and runs once per window.
    """
    n_windows = windows.shape[0]
    stats, ref_stats = NllStats(n_windows), NllStats(n_windows)
    window_kl = [0.0] * n_windows
    window_top1 = [0] * n_windows
    kls: list[torch.Tensor] = []
    top1 = 0
    model_seconds = ref_seconds = 0.0
    for start, logits, targets, seconds in scored_logits(score, windows, cfg.first, batch_tokens):
        model_seconds += seconds
        if ref_score is score:  # a model against itself (an unquantized model's own reference): one forward
            ref_logits = logits
        else:
            same_windows = windows[start : start + logits.shape[0]]
            _, ref_logits, _, r_seconds = next(scored_logits(ref_score, same_windows, cfg.first, batch_tokens))
            ref_seconds += r_seconds
            ref_logits = ref_logits.to(logits.device)
        for b in range(logits.shape[0]):
            w = start + b
            for rows in row_chunks(logits.shape[1], logits.shape[2]):
                t = {k: v.cpu() for k, v in token_kl(logits[b, rows], ref_logits[b, rows], targets[b, rows]).items()}
                stats.add(w, t["nll"])
                ref_stats.add(w, t["ref_nll"])
                kls.append(t["kl"])
                window_kl[w] += float(t["kl"].sum())
                n_top1 = int(t["top1"].sum())
                window_top1[w] += n_top1
                top1 += n_top1
    kl = torch.cat(kls)
    n = kl.numel()
    mean = float(kl.mean())
    ppl_metrics = window_metrics(stats, windows, model_seconds, window_ids)
    ref_ppl = ref_stats.result()
    agree = top1 / n
    metrics = {
        "kl_mean": mean,
        "kl_stderr": float(kl.std()) / math.sqrt(n) if n > 1 else float("nan"),
        **{_pct_name(q): float(torch.quantile(kl, q)) for q in KL_PERCENTILES},
        "kl_max": float(kl.max()),
        "top1": agree,
        "top1_stderr": math.sqrt(agree * (1 - agree) / (n - 1)) if n > 1 else float("nan"),
        "tokens": n,
        "windows": n_windows,
        "nonfinite_windows": sorted(set(ppl_metrics["nonfinite_windows"]) | {
            w for w, k in zip(window_ids if window_ids is not None else range(n_windows), window_kl)
            if not math.isfinite(k)}),
        "ppl": ppl_metrics["ppl"],
        "ref_ppl": ref_ppl["ppl"],
        "dppl_pct": 100.0 * (ppl_metrics["ppl"] / ref_ppl["ppl"] - 1.0),
        "ln_ppl_ratio": ppl_metrics["nll_mean"] - ref_ppl["nll_mean"],
        "model_seconds": model_seconds,
        "ref_model_seconds": ref_seconds,
    }
    items = window_items(stats, cfg, window_ids)
    for item, ref_nll, k, t1 in zip(items, ref_stats.window_nll, window_kl, window_top1):
        item.update(ref_nll_sum=ref_nll, kl_sum=k, top1=t1)
    return metrics, items, ppl_metrics


def _pct_name(q: float) -> str:
    """0.5 -> kl_median, 0.99 -> kl_p99, 0.999 -> kl_p999."""
    return "kl_median" if q == 0.5 else "kl_p" + f"{q * 100:g}".replace(".", "")
