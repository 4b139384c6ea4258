"""The comparison report: one markdown table (report.md) and accuracy against bytes (report.png).

A row is built from a conversion's manifest (ingot_manifest.json: bytes written, weight SNR per linear) and an
evaluation's results (``ingot.eval.runner.evaluate``). The plot needs matplotlib (``pip install 'ingot[eval]'``);
without it the report is written without the png and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

COLUMNS = (
    # (header, row key, format)
    ("scheme", "scheme", "{}"),
    ("bytes", "bytes", "bytes"),
    ("weight SNR dB mean / min", "snr", "{}"),
    ("ppl", "ppl", "{:.4f}"),
    ("dPPL %", "dppl_pct", "{:+.3f}"),
    ("KL mean", "kl_mean", "{:.6f}"),
    ("KL p99", "kl_p99", "{:.5f}"),
    ("top-1 %", "top1_pct", "{:.2f}"),
    ("GSM8K %", "gsm8k_pct", "{:.1f}"),
    ("MMLU %", "mmlu_pct", "{:.2f}"),
    ("score tok/s", "score_tokens_per_s", "{:.0f}"),
    ("gen tok/s", "gen_tokens_per_s", "{:.1f}"),
)


def make_row(scheme: str, manifest: dict | None, results: dict, baseline_ppl: float | None = None) -> dict:
    """One table row. dPPL is against ``baseline_ppl`` (the bf16 row's ppl in a comparison) when given, else
    against the kl reference's ppl measured in the same run."""
    m = results["metrics"]
    totals = (manifest or {}).get("totals", {})
    row: dict = {"scheme": scheme, "bytes": totals.get("bytes_out"), "model": results["model"]}
    if totals.get("snr_db_mean") is not None:
        row["snr"] = f"{totals['snr_db_mean']:.1f} / {totals['snr_db_min']:.1f}"
    ppl = m.get("ppl", {}).get("ppl")
    row["ppl"] = ppl
    if ppl is not None:
        base = baseline_ppl if baseline_ppl is not None else m.get("kl", {}).get("ref_ppl")
        row["dppl_pct"] = 100.0 * (ppl / base - 1.0) if base else None
    if "kl" in m:
        row.update(kl_mean=m["kl"]["kl_mean"], kl_p99=m["kl"]["kl_p99"], top1_pct=100.0 * m["kl"]["top1"])
    if "gsm8k" in m:
        row["gsm8k_pct"] = 100.0 * m["gsm8k"]["accuracy"]
        row["gen_tokens_per_s"] = m["gsm8k"]["gen_tokens_per_s"]
    if "mmlu" in m:
        row["mmlu_pct"] = 100.0 * m["mmlu"]["accuracy"]
    bad = sorted(set(m.get("ppl", {}).get("nonfinite_windows", [])) | set(m.get("kl", {}).get("nonfinite_windows", [])))
    if bad:
        row["nonfinite_windows"] = bad
    scoring = m.get("kl") or m.get("ppl")
    if scoring and scoring.get("model_seconds"):
        windows, n_ctx = scoring["windows"], results["config"]["n_ctx"]
        row["score_tokens_per_s"] = windows * n_ctx / scoring["model_seconds"]
    return row


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "bytes":
        return f"{value / 1e6:.1f} MB"
    return fmt.format(value)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table with the columns that at least one row has (scheme and bytes always)."""
    cols = [c for c in COLUMNS if c[1] in ("scheme", "bytes") or any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f) for _, k, f in cols) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> bool:
    """report.png: one panel per measured metric (ppl, top-1, MMLU, GSM8K) against model bytes, a labelled
    point per scheme. Returns False (writes nothing) when matplotlib is not installed or no row has bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(k, label) for k, label in (("ppl", "WikiText-2 perplexity (lower is better)"),
                                          ("top1_pct", "top-1 agreement with reference, %"),
                                          ("mmlu_pct", "MMLU accuracy, %"), ("gsm8k_pct", "GSM8K accuracy, %"))
              if any(r.get(k) is not None and r.get("bytes") for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [(r["bytes"] / 1e6, r[key], r["scheme"]) for r in rows if r.get(key) is not None and r.get("bytes")]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("model size on disk, MB")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def format_report(rows: Sequence[dict], meta: dict) -> str:
    """report.md: what was compared, how, on what, then the table and what its columns mean."""
    cfg = meta.get("config", {})
    limits = {t: (cfg.get("task_limits") or {}).get(t, cfg.get("limit")) for t in cfg.get("tasks", ())}
    lines = [
        f"# ingot compare: {meta.get('model')}",
        "",
        f"- tasks: {', '.join(f'{t} (limit {n})' if n else f'{t} (all)' for t, n in limits.items())}; "
        f"seed {cfg.get('seed')}",
        f"- perplexity / KL: WikiText-2 test, windows of {cfg.get('n_ctx')} tokens, "
        f"stride {cfg.get('stride') or cfg.get('n_ctx')}, second half of each window scored (llama.cpp); "
        f"reference: {meta.get('ref')}",
        f"- device: {meta.get('device_name')}; git {meta.get('git_sha')}; {meta.get('timestamp')}",
        f"- data: {', '.join(f'{k} sha256 {v[:12]}' for k, v in sorted(meta.get('data', {}).items()))}",
        "",
        format_table(rows),
        "",
        "bytes: all tensors written (quantized linears, their scales, and what stays BF16: embeddings, norms, "
        "lm_head). Weight SNR: of each dequantized linear against its source, over all linears (the conversion "
        "manifest). dPPL: against the bf16 row. KL: KL(reference || model) per scored token, float64. top-1: the two "
        "models' argmax tokens agree. score tok/s: window tokens through score() per second (the ppl/kl pass, model "
        "only); gen tok/s: GSM8K tokens generated per second through the engine.",
    ]
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"
