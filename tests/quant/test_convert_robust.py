"""The converter under failure: killed and resumed, refused DSTs, and every kind of bad input.

Each bad input must exit non-zero with ONE line naming the file/tensor and what was expected, and leave no
config.json in DST (a directory without it never looks like a finished checkpoint).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ingot.formats.safetensors_io import INDEX_NAME, Checkpoint
from ingot.quant import convert as convert_mod
from ingot.quant.convert import MANIFEST_NAME, ConvertOptions, convert
from ingot.quant.schemes import Scheme

INT8_BLOCK = ConvertOptions(Scheme.from_name("int8-block"), max_shard_bytes=150_000)


def make_llama(path: Path, hidden: int = 192, inter: int = 320, layers: int = 3, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def make_fp8(tmp: Path) -> Path:
    """A small hf-fp8 checkpoint in several shards, written by ingot."""
    src = make_llama(tmp / "bf16")
    dst = tmp / "fp8"
    convert(src, dst, ConvertOptions(Scheme.from_name("fp8-block"), max_shard_bytes=200_000), progress=False)
    return dst


def files_of(path: Path) -> dict[str, bytes]:
    """Every file of a finished checkpoint, except the manifest (it records timings and peak RSS)."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file() and f.name != MANIFEST_NAME}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingot.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("ref") / "int8"
    convert(src, dst, INT8_BLOCK, progress=False)
    return dst


# ------------------------------------------------------------------------------------------ resume


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after", [0, 1, 3])
@pytest.mark.parametrize("mid_write", [False, True])
def test_crash_and_resume_is_byte_identical(src, reference, tmp_path, monkeypatch, crash_after, mid_write):
    """Die after `crash_after` shards (optionally half-way through writing the next one), run again: same bytes."""
    n_shards = len(set(json.loads((reference / INDEX_NAME).read_text())["weight_map"].values()))
    assert n_shards > crash_after + 1
    real_writer = convert_mod.ShardWriter
    calls, torn = [], []

    class DyingWriter(real_writer):
        def __init__(self, path, *args, **kwargs):
            if len(calls) == crash_after and not mid_write:
                raise Crash  # dies before the shard is begun
            super().__init__(path, *args, **kwargs)
            calls.append(path)

        def write(self, name, tensor):
            super().write(name, tensor)
            if len(calls) == crash_after + 1 and mid_write:
                torn.append(self.tmp)
                raise Crash  # dies with the shard half written

    dst = tmp_path / "out"
    monkeypatch.setattr(convert_mod, "ShardWriter", DyingWriter)
    with pytest.raises(Crash):
        convert(src, dst, INT8_BLOCK, progress=False)
    assert not (dst / "config.json").exists()
    assert len(list(dst.glob("*.safetensors"))) == crash_after
    if mid_write:
        torn[0].write_bytes(b"\0" * 1000)  # the torn temp file a SIGKILL would have left (an exception removes it)
    monkeypatch.setattr(convert_mod, "ShardWriter", real_writer)

    manifest = convert(src, dst, INT8_BLOCK, progress=False)
    assert manifest["totals"]["shards_resumed"] == crash_after
    assert files_of(dst) == files_of(reference)
    assert not list(dst.glob("*.tmp")) and not (dst / ".ingot").exists()
    ref_rows = json.loads((reference / MANIFEST_NAME).read_text())["tensors"]
    assert manifest["tensors"] == ref_rows


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(src, reference, tmp_path):
    """SIGKILL the real CLI at several moments of the conversion; the re-run always finishes identically.

    The kill is timed from the job record (written once planning is done, before the first shard), so each
    delay lands inside the conversion whatever the machine's speed or load.
    """
    cmd = ["convert", str(src), "--scheme", "int8-block", "--max-shard-size", "150000", "--quiet"]
    interrupted = 0
    for k, delay in enumerate((0.0, 0.02, 0.1)):
        dst = tmp_path / f"kill{k}"
        argv = [sys.executable, "-m", "ingot.cli", *cmd[:2], str(dst), *cmd[2:]]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (dst / ".ingot" / "job.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (dst / "config.json").exists():
            interrupted += 1
        rerun = run_cli(*cmd[:2], str(dst), *cmd[2:])
        assert rerun.returncode == 0, rerun.stderr
        assert files_of(dst) == files_of(reference)
    assert interrupted >= 1, "no kill landed mid-conversion; the test did not test resuming"


def test_finished_dst_is_a_no_op_and_other_conversion_is_refused(src, reference, tmp_path):
    dst = tmp_path / "out"
    convert(src, dst, INT8_BLOCK, progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in dst.iterdir()}
    convert(src, dst, INT8_BLOCK, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in dst.iterdir()} == before

    r = run_cli("convert", str(src), str(dst), "--scheme", "int8-channel", "--quiet")
    assert r.returncode == 1
    assert "holds a different conversion" in r.stderr and "--overwrite" in r.stderr
    r = run_cli("convert", str(src), str(dst), "--scheme", "int8-channel", "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "w8a8_int8"

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    r = run_cli("convert", str(src), str(stranger), "--scheme", "int8-block", "--quiet", "--overwrite")
    assert r.returncode == 1 and "not a model directory" in r.stderr
    assert (stranger / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------- bad input


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ingot: error: ")
    return lines[0]


def _convert_cli(src: Path, dst: Path, scheme: str = "int8-block") -> subprocess.CompletedProcess:
    return run_cli("convert", str(src), str(dst), "--scheme", scheme, "--quiet")


def _first_shard_with(ckpt_dir: Path, suffix: str) -> tuple[str, Path]:
    ckpt = Checkpoint(ckpt_dir)
    name = next(n for n in sorted(ckpt.tensors) if n.endswith(suffix))
    return name, ckpt_dir / ckpt.tensors[name].shard


def _rewrite_shard(shard: Path, index_dir: Path, edit) -> None:
    """Load a shard, let `edit` change its tensors dict, save it back and fix the index."""
    from safetensors.torch import load_file

    tensors = load_file(shard)
    before = set(tensors)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = index_dir / INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text())
        for name in before - set(tensors):
            index["weight_map"].pop(name)
        for name in set(tensors) - before:
            index["weight_map"][name] = shard.name
        index_path.write_text(json.dumps(index))


@pytest.fixture()
def fp8(tmp_path) -> Path:
    return make_fp8(tmp_path)


def test_truncated_shard(fp8, tmp_path):
    _, shard = _first_shard_with(fp8, ".weight_scale_inv")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = _one_line_error(_convert_cli(fp8, tmp_path / "out"))
    assert shard.name in line and "truncated" in line
    assert not (tmp_path / "out" / "config.json").exists()


def test_corrupt_header(fp8, tmp_path):
    _, shard = _first_shard_with(fp8, ".weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    line = _one_line_error(_convert_cli(fp8, tmp_path / "out"))
    assert shard.name in line and "corrupt" in line
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_scale(fp8, tmp_path):
    name, shard = _first_shard_with(fp8, ".weight_scale_inv")
    _rewrite_shard(shard, fp8, lambda t: t.pop(name))
    line = _one_line_error(_convert_cli(fp8, tmp_path / "out"))
    assert name in line and ("no scale" in line or "missing" in line)
    assert not (tmp_path / "out" / "config.json").exists()


def test_scale_of_wrong_shape(fp8, tmp_path):
    name, shard = _first_shard_with(fp8, ".weight_scale_inv")

    def edit(t):
        t[name] = torch.ones(t[name].shape[0] + 1, t[name].shape[1])

    _rewrite_shard(shard, fp8, edit)
    line = _one_line_error(_convert_cli(fp8, tmp_path / "out"))
    assert name in line and "expected" in line
    assert not (tmp_path / "out" / "config.json").exists()


def test_unknown_dtype(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    name, shard = _first_shard_with(bad, "norm.weight")
    _rewrite_shard(shard, bad, lambda t: t.__setitem__(name, t[name].to(torch.float8_e5m2)))
    line = _one_line_error(_convert_cli(bad, tmp_path / "out"))
    assert name in line and "F8_E5M2" in line and "expected one of" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weight(src, tmp_path, value):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    name, shard = _first_shard_with(bad, "mlp.down_proj.weight")

    def edit(t):
        t[name] = t[name].clone()
        t[name][3, 5] = value

    _rewrite_shard(shard, bad, edit)
    for scheme in ("int8-channel", "bf16"):
        line = _one_line_error(_convert_cli(bad, tmp_path / f"out-{scheme}", scheme))
        assert name in line and "NaN or Inf" in line
        assert not (tmp_path / f"out-{scheme}" / "config.json").exists()


def test_unreadable_config(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{ not json")
    line = _one_line_error(_convert_cli(bad, tmp_path / "out"))
    assert "config.json" in line and "unreadable" in line


def test_unknown_quant_method(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    (bad / "config.json").write_text(json.dumps(cfg))
    line = _one_line_error(_convert_cli(bad, tmp_path / "out"))
    assert "'awq'" in line and "quant_method" in line


def test_disk_full(src, tmp_path, monkeypatch):
    """ENOSPC while writing a shard: a clear error naming the file, the torn temp file removed, no config.json."""
    from ingot.formats import safetensors_io

    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        real_pwrite(fd, b"\0" * 100, offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io.os, "pwrite", full_disk)  # shards are written with pwrite, tensor by tensor
    dst = tmp_path / "out"
    with pytest.raises(safetensors_io.CheckpointError, match=r"model-00001-of-\d+\.safetensors: disk full"):
        convert(src, dst, INT8_BLOCK, progress=False)
    assert not list(dst.glob("*.tmp")) and not list(dst.glob("*.safetensors"))
    assert not (dst / "config.json").exists()


def test_bad_format_pair_and_bad_regex(src, tmp_path):
    line = _one_line_error(run_cli("convert", str(src), str(tmp_path / "o"), "--scheme", "int8-block", "--format", "gptq"))
    assert "'gptq'" in line and "int8-block" in line
    line = _one_line_error(run_cli("convert", str(src), str(tmp_path / "o"), "--scheme", "int8-block", "--ignore", "("))
    assert "--ignore" in line
