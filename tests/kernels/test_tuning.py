"""Tuned tile tables: file names, lookup by M bucket, validation, and what a launch picks (ingot.kernels.tuning)."""

from __future__ import annotations

import json

import pytest
import torch

from ingot.kernels import tuning
from ingot.kernels.tuning import (GemmConfig, TuneOptions, candidates, config_path, select, skinny_block_steps_ok,
                                  sm90_decode_smem, write_table)


def _table(tmp_path, configs: dict) -> tuple:
    path = config_path("int8_gemm_channel", 4096, 4096, "NVIDIA H100 80GB HBM3", tmp_path)
    write_table(path, {"op": "int8_gemm_channel", "n": 4096, "k": 4096, "configs": configs})
    return path, tuning._load_table(str(path))


def test_file_name_is_vllm_style(tmp_path):
    path = config_path("int8_gemm_block", 7168, 2048, "NVIDIA H100 80GB HBM3", tmp_path)
    assert path.name == "int8_gemm_block,N=7168,K=2048,device_name=NVIDIA_H100_80GB_HBM3.json"


def test_select_takes_smallest_tuned_m_at_or_above(tmp_path):
    small = {"block_m": 16, "block_n": 32, "block_k": 128, "split_k": 2, "us": 5.0}
    mid = {"block_m": 64, "block_n": 64, "block_k": 256, "num_stages": 6}
    big = {"block_m": 128, "block_n": 256, "block_k": 128, "num_warps": 8}
    _, table = _table(tmp_path, {"16": small, "64": mid, "4096": big})
    assert select(table, 1) == GemmConfig(16, 32, 128, split_k=2)  # unknown keys ("us") ignored
    assert select(table, 16) == GemmConfig(16, 32, 128, split_k=2)
    assert select(table, 17) == GemmConfig(64, 64, 256, num_stages=6)
    assert select(table, 5000) == GemmConfig(128, 256, 128, num_warps=8)  # beyond all: the largest
    assert select((), 5) is None


def test_write_table_replaces_cached_copy(tmp_path):
    path, table = _table(tmp_path, {"16": {"block_m": 16, "block_n": 32, "block_k": 128}})
    assert select(table, 1).block_n == 32
    _, table = _table(tmp_path, {"16": {"block_m": 16, "block_n": 64, "block_k": 128}})
    assert select(table, 1).block_n == 64
    assert json.loads(path.read_text())["configs"]["16"]["block_n"] == 64


def test_bad_tables_are_clear_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"t.json: unreadable"):
        tuning._load_table(str(path))
    path.write_text(json.dumps({"configs": {"16": {"block_m": 16, "block_n": 48, "block_k": 128}}}))
    with pytest.raises(ValueError, match=r"t.json: bad entry .*block_n must be a power of two >= 16, got 48"):
        tuning._load_table(str(path))
    assert tuning._load_table(str(tmp_path / "missing.json")) == ()


def test_lookup_is_none_off_cuda():
    assert tuning.lookup("int8_gemm_channel", 4096, 4096, 1, torch.device("cpu")) is None


def test_candidates_respect_kernel_ties():
    for m in (1, 16, 64, 128, 1024, 4096):
        block = candidates("int8_gemm_block", m, 4096, 4096, 132)
        assert block and all(c.block_k == 128 for c in block)
        channel = candidates("int8_gemm_channel", m, 4096, 4096, 132)
        # M = 1 adds the dp4a GEMV (block_m 1) with 256- and 512-byte K steps; the block op's GEMV keeps 128
        assert channel and {c.block_k for c in channel} == ({128, 256, 512} if m == 1 else {128, 256})
        assert any(c.block_m == 1 for c in channel + block) == (m == 1)
    # split-K only at decode, only up to 8 programs per SM, never more splits than half the K tiles
    for c in candidates("int8_gemm_channel", 1, 4096, 512, 132):
        assert c.split_k <= 2 if c.block_k == 128 else c.split_k == 1
    assert all(c.split_k == 1 for c in candidates("int8_gemm_channel", 1024, 4096, 4096, 132))
    assert all((4096 // c.block_n) * c.split_k <= 8 * 132 for c in candidates("int8_gemm_channel", 1, 4096, 4096, 132))


def test_sm90_decode_candidates_only_where_asked():
    """The Hopper swap-AB decode tiles (kernel "sm90") join the int8 W8A8 ops' candidates at M <= 64 when the sweep's
    device runs them, never elsewhere; their split-K keeps the programs within two per SM; block takes 256-K steps
    only on tiles whose GROUP_K holds both scale blocks; the ring and block's staged scales fit the shared memory."""
    for op in ("int8_gemm_channel", "int8_gemm_block", "fp8_gemm_block", "w8a16_gemm"):
        for m in (1, 16, 64, 128):
            plain = candidates(op, m, 4096, 4096, 132)
            assert all(c.kernel == "triton" for c in plain)
            sm90 = [c for c in candidates(op, m, 4096, 4096, 132, sm90=True) if c.kernel == "sm90"]
            assert bool(sm90) == (m <= 64 and op in ("int8_gemm_channel", "int8_gemm_block")), (op, m)
            for c in sm90:
                assert c.block_m in ((16,) if m <= 16 else (64, 32)) and c.block_n in (64, 128)
                assert (4096 // c.block_n) * c.split_k <= 2 * 132 or c.split_k == 1
                assert c.block_k in (128, 256)
                if op == "int8_gemm_block":
                    assert skinny_block_steps_ok(c), c
                smem = sm90_decode_smem(c, 4096, op == "int8_gemm_block")
                assert smem <= 200 * 1024 or c.num_stages == 4, c
            if sm90 and m == 64:  # the token bucket and half of it
                assert {c.block_m for c in sm90} == {64, 32}
            if op == "int8_gemm_block" and sm90:  # both step sizes offered, 256 never on 128 x 64 tiles
                assert {c.block_k for c in sm90} == {128, 256}
                assert all(c.block_k == 128 for c in sm90 if c.block_n * c.block_m > 4096)


def test_gemm_config_kernel_field():
    cfg = GemmConfig(16, 64, 256, group_m=1, num_stages=8, kernel="sm90")
    assert GemmConfig.from_dict(cfg.to_dict()) == cfg
    assert GemmConfig.from_dict({"block_m": 16, "block_n": 32, "block_k": 128}).kernel == "triton"  # old tables
    with pytest.raises(ValueError, match="kernel must be one of triton, sm90"):
        GemmConfig(16, 64, 256, kernel="cutlass")
    with pytest.raises(ValueError, match="block_m 1"):
        GemmConfig(1, 64, 256, kernel="sm90")


def test_tune_options_validation():
    with pytest.raises(ValueError, match=r"op 'w9a9'"):
        TuneOptions(ops=("w9a9",), shapes=((8, 8),))
    with pytest.raises(ValueError, match=r"no \(N, K\) shapes"):
        TuneOptions()
    with pytest.raises(ValueError, match=r"M sizes must be positive"):
        TuneOptions(shapes=((8, 8),), m_sizes=(0,))


@pytest.mark.gpu
def test_gpu_tune_writes_a_table_the_kernels_use(tmp_path):
    """A tiny real sweep: the table is written, and a launch with no config picks its entry."""
    from ingot.kernels import int8_gemm

    paths = tuning.tune(TuneOptions(ops=("int8_gemm_channel",), shapes=((512, 1024),), m_sizes=(16,), rep_ms=2,
                                    out_dir=tmp_path), log=lambda _: None)
    assert len(paths) == 1
    entry = json.loads(paths[0].read_text())["configs"]["16"]
    assert entry["candidates"] > 0 and entry["us"] > 0
    dev = torch.device("cuda", torch.cuda.current_device())
    picked = tuning.lookup("int8_gemm_channel", 512, 1024, 16, dev, tmp_path)
    assert picked == GemmConfig.from_dict(entry)
    assert int8_gemm.resolve_config("int8_gemm_channel", None, 16, 512, 1024, dev) is not None


def test_a_gemv_entry_serves_m_1_only(monkeypatch):
    """A table tuned at M = 1 with a GEMV winner (block_m 1) must not hand that config to M = 16: the default serves
    there (the GEMV kernels take one row)."""
    gemv, default = GemmConfig(1, 32, 256), GemmConfig(16, 64, 128)
    monkeypatch.setattr(tuning, "lookup", lambda op, n, k, m, device: gemv)
    assert tuning.resolve_config("w8a16_gemm", None, 1, 64, 64, torch.device("cpu"), lambda sms: default) == gemv
    assert tuning.resolve_config("w8a16_gemm", None, 16, 64, 64, torch.device("cpu"), lambda sms: default) == default
