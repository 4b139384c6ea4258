"""`ingot bench kernels`: refuses cleanly without CUDA; on a GPU, one tiny shape gives a complete JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ingot.bench.kernels import OPS, SHAPES, BenchKernelsOptions, run_bench_kernels
from ingot.cli import _nk, build_parser


def test_options_and_presets():
    assert len(SHAPES["all"]) == 9 and (28672, 4096) in SHAPES["llama3-8b"] and (18432, 7168) in SHAPES["deepseek-v3"]
    assert BenchKernelsOptions(custom_shapes=((256, 256),)).shape_list() == ((256, 256),)
    assert BenchKernelsOptions(shapes="llama3-8b").shape_list() == SHAPES["llama3-8b"]
    with pytest.raises(ValueError, match="shapes"):
        BenchKernelsOptions(shapes="gpt2")
    with pytest.raises(ValueError, match="M sizes"):
        BenchKernelsOptions(m_sizes=(0,))
    with pytest.raises(ValueError, match="settle_ms"):
        BenchKernelsOptions(settle_ms=-1)
    assert _nk("4096x14336") == (4096, 14336)
    args = build_parser().parse_args(["bench", "kernels", "--shape", "256x512", "--m", "1", "64", "--out", "x.json"])
    assert args.shape == [(256, 512)] and args.m == [1, 64] and args.shapes == "all" and args.settle_ms == 500


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cli_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-m", "ingot.cli", "bench", "kernels", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ingot: error: bench kernels: needs a CUDA device"), proc.stderr
    assert not out.exists()


@pytest.mark.gpu
def test_bench_kernels_tiny(tmp_path):
    out = tmp_path / "kernels.json"
    res = run_bench_kernels(BenchKernelsOptions(custom_shapes=((256, 256),), m_sizes=(1, 64), out=out, rep_ms=2,
                                                command="test"))
    data = json.loads(out.read_text())
    assert data == {key: value for key, value in json.loads(json.dumps(res)).items() if key != "out"}
    assert res["out"] == str(out)
    for key in ("bench", "command", "git", "device", "software", "config", "peaks", "rows", "targets", "started",
                "finished"):
        assert key in data, key
    assert data["peaks"]["bf16_matmul"]["tflops"] > 0 and data["peaks"]["copy"]["gbps"] > 0
    assert len(data["rows"]) == 2 * len(OPS)
    ops = {(r["op"], r["m"]): r for r in data["rows"]}
    for m in (1, 64):
        for op in ("bf16", "int8_channel", "int8_block", "quant_int8", "quant_fp8"):
            r = ops[(op, m)]
            assert r["status"] == "ok" and r["us"] > 0 and r["gbps"] > 0, r
        for op in ("int8_channel", "int8_block"):
            assert ops[(op, m)]["ratio_to_bf16"] > 0 and "target" in ops[(op, m)]
            assert ops[(op, m)]["tflops"] > 0 and "frac_of_roofline" in ops[(op, m)]
        for op in ("fp8_block", "w8a16", "w4a16"):
            assert ops[(op, m)]["status"] == "ok" and ops[(op, m)]["ratio_to_bf16"] > 0, ops[(op, m)]
    assert "target" in ops[("w4a16", 1)] and "target" not in ops[("w4a16", 64)]
    assert ops[("int_mm", 1)]["status"].startswith("n/a")
    assert "us" in ops[("int_mm", 64)] or ops[("int_mm", 64)]["status"].startswith("error")
    assert "us" in ops[("scaled_mm_fp8", 64)] or ops[("scaled_mm_fp8", 64)]["status"].startswith("n/a")
    assert "not_implemented" in data["targets"] and "all_pass" in data["targets"]
