"""ShardWriter writes, tensor by tensor and in any order, the bytes safetensors' save_file writes."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from ingot.formats import safetensors_io
from ingot.formats.safetensors_io import CheckpointError, ShardWriter

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn, torch.int32, torch.int64,
          torch.float64, torch.uint8, torch.bool, torch.int16]


def _random_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(rng.randint(1, 12)):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))  # 0-dim and empty tensors too
        name = rng.choice(["a", "b.weight", "model.layers.3.mlp.experts.7.up_proj.weight_scale_inv", "é"]) + str(i)
        if dtype == torch.bool:
            out[name] = torch.rand(shape) > 0.5
        elif dtype.is_floating_point:
            out[name] = torch.randn(shape).to(dtype)
        else:
            out[name] = torch.randint(-5, 5, shape).to(dtype)
    return out


@pytest.mark.parametrize("queue", [0, 2])
def test_same_bytes_as_save_file(tmp_path, queue):
    rng = random.Random(queue)
    for trial in range(25):
        tensors = _random_tensors(rng)
        save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        with ShardWriter(tmp_path / "out.safetensors", specs, queue=queue) as w:
            for name in rng.sample(list(tensors), len(tensors)):
                w.write(name, tensors[name])
        assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), trial
        assert not (tmp_path / "out.safetensors.tmp").exists()
    back = load_file(str(tmp_path / "out.safetensors"))
    assert set(back) == set(tensors)


def test_refuses_unplanned_missing_and_mismatched(tmp_path):
    specs = [("a", torch.float32, (2, 3)), ("b", torch.int8, (4,))]
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="never written, e.g. b"):
        with ShardWriter(path, specs) as w:
            w.write("a", torch.zeros(2, 3))
    assert not path.exists() and not path.with_name(path.name + ".tmp").exists()
    with ShardWriter(path, specs) as w:
        with pytest.raises(ValueError, match="tensor c is not planned"):
            w.write("c", torch.zeros(1))
        with pytest.raises(ValueError, match=r"planned torch.int8\(4,\)"):
            w.write("b", torch.zeros(4))
        w.write("a", torch.zeros(2, 3))
        w.write("b", torch.zeros(4, dtype=torch.int8))
        with pytest.raises(ValueError, match="written twice"):
            w.write("b", torch.zeros(4, dtype=torch.int8))
    assert path.exists()


@pytest.mark.parametrize("queue", [0, 2])
def test_disk_full_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, queue):
    real = os.pwrite

    def full(fd, data, offset):
        if offset > 0:
            real(fd, b"\0" * 10, offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(safetensors_io.os, "pwrite", full)
    path = tmp_path / "model-00001-of-00002.safetensors"
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: disk full"):
        with ShardWriter(path, [("a", torch.float32, (1000,)), ("b", torch.float32, (1000,))], queue=queue) as w:
            w.write("a", torch.zeros(1000))
            w.write("b", torch.zeros(1000))
    assert not list(tmp_path.iterdir())


def test_error_in_the_caller_removes_the_temp_file(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, [("a", torch.float32, (10,)), ("b", torch.float32, (10,))], queue=2) as w:
            w.write("a", torch.zeros(10))
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
