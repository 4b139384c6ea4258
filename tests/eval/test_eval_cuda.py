"""The evaluation pipeline on CUDA (the lead's GPU runs): ingot's kernels give the CPU reference math's numbers on
the golden windows, fp8-block runs as FP8 where the GPU has it, and MMLU / GSM8K run through the model and engine."""

from __future__ import annotations

import pytest
import torch

from ingot.eval import CompareOptions, DataDir, EvalOptions, compare

from test_golden_embedded import BF16_PPL, INT8

pytestmark = pytest.mark.gpu


def test_compare_every_scheme_on_cuda(embedded_model_dir, data_root, tmp_path):
    schemes = ("bf16", "fp8-block", "int8-block", "int8-channel", "int8-weight", "int4-group")
    options = CompareOptions(
        schemes=schemes, workdir=tmp_path, convert_device="cuda",
        eval=EvalOptions(tasks=("ppl", "kl", "mmlu", "gsm8k"), limit=4, task_limits={"mmlu": 20, "gsm8k": 4},
                         n_ctx=256, seed=0, device="cuda"))
    summary = compare(embedded_model_dir, options, DataDir(data_root))
    rows = {r["scheme"]: r for r in summary["rows"]}
    assert list(rows) == list(schemes)
    # the golden windows of the CPU test: same numbers within GPU accumulation-order noise
    assert rows["bf16"]["ppl"] == pytest.approx(BF16_PPL, rel=0.01)
    assert rows["bf16"]["kl_mean"] < 1e-3
    for scheme, (dppl, kl, top1) in INT8.items():
        assert rows[scheme]["kl_mean"] == pytest.approx(kl, rel=0.5), scheme
        assert rows[scheme]["top1_pct"] == pytest.approx(top1, abs=5.0), scheme
    assert 0 < rows["int8-weight"]["kl_mean"] < rows["int8-channel"]["kl_mean"]
    assert rows["int4-group"]["kl_mean"] > rows["int8-weight"]["kl_mean"]
    for r in rows.values():
        assert 0.0 <= r["mmlu_pct"] <= 100.0 and 0.0 <= r["gsm8k_pct"] <= 100.0
        assert r["gen_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0
    md = (tmp_path / "report.md").read_text()
    from ingot.kernels.fp8_gemm import fp8_supported

    fp8 = fp8_supported(torch.device("cuda"))
    assert ("fp8-block ran on cuda" in md) == (not fp8)  # the report says when fp8-block was the fallback
