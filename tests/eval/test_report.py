"""Report rows from a manifest and results, the markdown table, the plot."""

from __future__ import annotations

import pytest

from ingot.eval import report


def _results(ppl, kl=None, mmlu=None, gsm=None):
    m = {"ppl": {"ppl": ppl, "windows": 10, "model_seconds": 2.0}}
    if kl is not None:
        m["kl"] = {"kl_mean": kl, "kl_p99": 10 * kl, "top1": 0.985, "ref_ppl": 20.0, "windows": 10,
                   "model_seconds": 4.0}
    if mmlu is not None:
        m["mmlu"] = {"accuracy": mmlu}
    if gsm is not None:
        m["gsm8k"] = {"accuracy": gsm, "gen_tokens_per_s": 12.5}
    return {"metrics": m, "model": "x", "config": {"n_ctx": 512}}


def test_rows_and_table():
    manifest = {"totals": {"bytes_out": 162_000_000, "snr_db_mean": 41.4, "snr_db_min": 38.02}}
    row = report.make_row("int8-channel", manifest, _results(20.1, kl=0.0012, mmlu=0.3, gsm=0.05))
    assert row["dppl_pct"] == pytest.approx(0.5)  # against the kl reference's ppl (20.0)
    assert row["top1_pct"] == pytest.approx(98.5) and row["snr"] == "41.4 / 38.0"
    assert row["score_tokens_per_s"] == pytest.approx(10 * 512 / 4.0)  # the kl pass's model time
    based = report.make_row("int8-channel", manifest, _results(20.1), baseline_ppl=20.1)
    assert based["dppl_pct"] == 0.0 and "kl_mean" not in based
    bf16 = report.make_row("bf16", {"totals": {"bytes_out": 269_000_000, "snr_db_mean": None}}, _results(20.0))
    table = report.format_table([bf16, row])
    lines = table.splitlines()
    assert lines[0].startswith("| scheme | bytes | weight SNR") and "| GSM8K % |" in lines[0]
    assert lines[2].startswith("| bf16 | 269.0 MB | - | 20.0000 |")
    assert lines[3].startswith(
        "| int8-channel | 162.0 MB | 41.4 / 38.0 | 20.1000 | +0.500 | 0.001200 | 0.01200 | 98.50 | 5.0 | 30.00 |")
    # columns nobody measured are left out
    assert "MMLU" not in report.format_table([bf16])


def test_plot_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [report.make_row(s, {"totals": {"bytes_out": b}}, _results(p, kl=k)) for s, b, p, k in
            [("bf16", 269e6, 20.0, 0.0), ("int8-block", 162e6, 20.05, 0.001), ("int4-group", 110e6, 23.0, 0.08)]]
    png = tmp_path / "report.png"
    assert report.plot(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not report.plot([{"scheme": "x", "bytes": None, "ppl": 3.0}], tmp_path / "none.png")
    config = {"tasks": ["ppl", "kl"], "limit": 8, "n_ctx": 512, "seed": 0}
    md = report.format_report(rows, {"model": "m", "config": config, "data": {"wikitext-2/wiki.test.raw": "ab" * 32},
                                     "notes": ["a note"]})
    assert "ppl (limit 8), kl (limit 8)" in md and "| int4-group |" in md and "- a note" in md
    assert "wikitext-2/wiki.test.raw sha256 abababababab" in md
