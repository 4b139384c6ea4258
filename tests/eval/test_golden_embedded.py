"""Golden numbers of the embedded model (SmolLM2-135M-Instruct) through the whole pipeline: ingot compare converts
it to bf16, int8-channel and int8-block, evaluates each on the same 4 WikiText-2 windows of 256 tokens (seed 0:
windows 82, 530, 788 and 861; 508 scored tokens) against the source model, and writes the report.

The locked values were measured once on CPU (ingot a0ebe18, torch 2.13, 2-vCPU EPYC). Tolerances: BF16 perplexity
0.2% (bf16 matmuls may round differently on other CPUs); the int8 deltas about +-30% (a model that silently ran
unquantized gives KL 0 and top-1 100%; int8-weight, the same weights without activation quantization, KL 0.004:
both far outside).

Why the int8 rows are far from "KL 0.002": SmolLM2-135M's activations have outlier channels (max |x| / mean |x| of
a token exceeds 1,000 at down_proj inputs), and W8A8 round-to-nearest with per-token (or per-128-group) activation
scales loses them; weight-only int8 of the same weights gives KL 0.003. An independent fake-quant of transformers'
model (fp32, per-token int8 activations, per-channel int8 weights) gives the same KL, 0.028 over the first 4
windows of 512.
"""

from __future__ import annotations

import json

import pytest

from ingot.eval import CompareOptions, DataDir, EvalOptions, compare

BF16_PPL = 23.5337
INT8 = {  # scheme: (dPPL %, KL mean, top-1 %)
    "int8-channel": (5.54, 0.0309, 89.37),
    "int8-block": (4.02, 0.0228, 87.40),
}

pytestmark = pytest.mark.slow  # about 20 s on 2 vCPUs: three conversions and six passes over 4 windows


@pytest.fixture(scope="module")
def compared(embedded_model_dir, data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("golden")
    options = CompareOptions(schemes=("bf16", "int8-channel", "int8-block"), workdir=work,
                             eval=EvalOptions(tasks=("ppl", "kl"), limit=4, n_ctx=256, seed=0))
    return compare(embedded_model_dir, options, DataDir(data_root)), options


def test_golden_numbers(compared):
    summary, _ = compared
    rows = {r["scheme"]: r for r in summary["rows"]}
    assert rows["bf16"]["ppl"] == pytest.approx(BF16_PPL, rel=2e-3)
    # the bf16 conversion holds the source's exact weights: KL 0 and full agreement, measured with two forwards
    assert rows["bf16"]["kl_mean"] == 0.0 and rows["bf16"]["top1_pct"] == 100.0
    for scheme, (dppl, kl, top1) in INT8.items():
        r = rows[scheme]
        assert r["dppl_pct"] == pytest.approx(dppl, abs=1.5), scheme
        assert r["kl_mean"] == pytest.approx(kl, rel=0.3), scheme
        assert r["top1_pct"] == pytest.approx(top1, abs=3.0), scheme
        assert r["bytes"] < 0.65 * rows["bf16"]["bytes"]  # int8 linears; embeddings stay bf16


def test_report_and_results_files(compared):
    summary, options = compared
    work = options.workdir
    md = (work / "report.md").read_text()
    assert md.count("\n| int8-") == 2 and "| bf16 |" in md and "KL mean" in md
    ev = json.loads((work / "eval-int8-channel.json").read_text())
    assert [it["window"] for it in ev["predictions"]["kl"]] == [82, 530, 788, 861]
    assert ev["metrics"]["kl"]["tokens"] == 4 * 127
    assert ev["ref"] == str(summary["model"]) and ev["config"]["wikitext"]["tokens"] == 304_839
    assert set(ev["data"]) == {"wikitext-2/wiki.test.raw"}
    saved = json.loads((work / "compare.json").read_text())
    assert [r["scheme"] for r in saved["rows"]] == ["bf16", "int8-channel", "int8-block"]
    if summary["plot"]:
        assert (work / "report.png").stat().st_size > 10_000


def test_second_compare_reuses_the_conversions(compared, embedded_model_dir, data_root):
    _, options = compared
    stamps = {s: (options.workdir / s / "model.safetensors").stat().st_mtime_ns for s in options.schemes}
    again = CompareOptions(schemes=options.schemes, workdir=options.workdir, out_dir=options.workdir / "again",
                           eval=EvalOptions(tasks=("ppl",), limit=1, n_ctx=64))
    summary = compare(embedded_model_dir, again, DataDir(data_root))
    assert {s: (options.workdir / s / "model.safetensors").stat().st_mtime_ns for s in options.schemes} == stamps
    assert [r["ppl"] is not None for r in summary["rows"]] == [True] * 3
