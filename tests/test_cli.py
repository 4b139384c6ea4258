"""The CLI end to end: pull, convert (with an embedded model's name as SRC), inspect on a directory and on a bare
index, and the GPU-memory estimate against what conversions actually write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingot.cli import main
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.inspect import inspect_checkpoint
from ingot.quant.schemes import Scheme


def test_pull_prints_the_cached_path(embedded_model_dir, capsys):
    cache = embedded_model_dir.parent
    assert main(["--cache-dir", str(cache), "pull"]) == 0
    assert Path(capsys.readouterr().out.strip()) == embedded_model_dir


def test_convert_and_inspect_by_model_name(embedded_model_dir, tmp_path, capsys):
    cache = str(embedded_model_dir.parent)
    dst = tmp_path / "int8"
    assert main(["--cache-dir", cache, "convert", "smollm2-135m-instruct", str(dst), "--scheme", "int8-channel",
                 "--quiet", "--max-shard-size", "60MB"]) == 0
    assert "int8-channel as sglang" in capsys.readouterr().out
    assert (dst / "model.safetensors.index.json").exists()

    # inspect: the directory and its bare index give the same answer
    by_dir = inspect_checkpoint(dst)
    by_index = inspect_checkpoint(dst / "model.safetensors.index.json")
    assert by_dir == by_index
    assert by_dir["format"] == "sglang" and by_dir["scheme"] == "int8-channel" and by_dir["model_type"] == "llama"
    assert by_dir["linears"] == {"int8-channel": 210} and by_dir["shards"] >= 3

    assert main(["--cache-dir", cache, "inspect", str(dst / "model.safetensors.index.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == by_dir["params"]
    assert main(["--cache-dir", cache, "inspect"]) == 0  # no PATH: the embedded model
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["path", "format", "scheme", "model"] and "bf16" in table[2]


@pytest.mark.parametrize("scheme", ["bf16", "fp8-block", "int8-channel", "int4-group"])
def test_gpu_estimate_matches_what_a_conversion_writes(embedded_model_dir, tmp_path, scheme):
    """The estimate for a precision is the bytes of the weights that conversion writes (headers aside)."""
    estimate = inspect_checkpoint(embedded_model_dir)["gpu_bytes_estimate"][scheme]
    manifest = convert(embedded_model_dir, tmp_path / scheme, ConvertOptions(Scheme.from_name(scheme)), progress=False)
    written = manifest["totals"]["bytes_out"]
    # int4-group as compressed-tensors stores its scales in bf16, as the estimate assumes; fp8/int8 scales in float32.
    assert abs(estimate - written) <= 0.001 * written, (estimate, written)


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ingot: error: ") and "nowhere" in err[0]
