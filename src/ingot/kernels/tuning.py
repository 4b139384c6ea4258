"""Tile configs of the GEMM kernels: the ``GemmConfig`` dataclass, tuned tables as JSON beside the kernels, their
lookup at launch, and the sweep that writes them (``ingot tune``).

A table is one file per (op, N, K, GPU), named the way vLLM and SGLang name theirs so the layout is familiar::

    configs/int8_gemm_channel,N=4096,K=4096,device_name=NVIDIA_H100_80GB_HBM3.json
    {"op": ..., "n": 4096, "k": 4096, "device_name": ..., "triton": "3.6.0", "git_sha": ..., "configs": {
        "1": {"block_m": 16, "block_n": 32, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 6,
              "us": 5.9, "candidates": 24}, "16": {...}, ...}}

Keys of "configs" are the M values it was tuned at; a launch with m rows takes the smallest tuned M >= m (the
largest when m is beyond them all). A missing file or a GPU without tables gets the kernel's default tiles: there
is no autotuning at serve time (a first request must not wait for a sweep, and CUDA-graph capture must not time).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KERNELS = ("triton", "sm90", "gluon")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM launch.

    block_m/n/k: the [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tile each program multiplies per K step (powers of two,
    >= 16: tl.dot's smallest int8 shape; block_m 1 selects the GEMV kernels, for M = 1: weight-only and W8A8).
    group_m: programs along M that sweep N together (the Triton matmul tutorial's grouped ordering: a group re-reads
    the same W columns from L2). num_warps, num_stages: as in triton.
    split_k: programs that share one output tile's K range (decode, where M x N alone gives too few programs to keep
    HBM busy); kernels that do not split K require 1.
    kernel: "triton" (the op's Triton kernels) or "sm90" (W8A8 int8 ops only: the Hopper swap-AB decode kernel
    ``gemm_sm90._int8_skinny_gemm_sm90_kernel``, block_n weight rows x block_m tokens per program; group_m and
    num_warps unused) or "gluon" (w4a16_gemm / w8a16_gemm at M = 1 only: the Gluon GEMV ``gemv_gluon._gemv_kernel``;
    ``gemv_gluon.tile_shape`` reads its tile: block_k = chunk x num_stages x lanes x warps_k, block_n = rows per
    thread x 32 / lanes x num_warps / warps_k, a chunk being 32 int4 / 16 int8 weights; num_stages is there the chunks
    a thread loads per row and step).
    warps_k: "gluon" only, the warps that share one row block's K step (1 elsewhere).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    kernel: str = "triton"
    warps_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if name == "block_m" and v == 1:  # the GEMV kernels (M = 1: weight-only and W8A8)
                continue
            if name == "block_n" and self.kernel == "gluon" and v >= 4 and not v & (v - 1):  # a few rows per warp
                continue
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("group_m", "num_warps", "num_stages", "split_k", "warps_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"GemmConfig.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "sm90" and self.block_m == 1:
            raise ValueError("GemmConfig: block_m 1 (the GEMV kernels) is a Triton kernel, not kernel 'sm90'")
        if self.kernel == "gluon" and self.block_m != 1:
            raise ValueError(f"GemmConfig: kernel 'gluon' is the weight-only GEMV (block_m 1), got block_m {self.block_m}")
        if self.kernel != "gluon" and self.warps_k != 1:
            raise ValueError(f"GemmConfig: warps_k {self.warps_k} is for kernel 'gluon' only")

    @classmethod
    def from_dict(cls, d: dict) -> "GemmConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v if k == "kernel" else int(v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (file-name safe)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def config_path(op: str, n: int, k: int, device_name: str, config_dir: Path = CONFIG_DIR) -> Path:
    return config_dir / f"{op},N={n},K={k},device_name={device_slug(device_name)}.json"


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=1024)
def _load_table(path: str) -> tuple[tuple[int, GemmConfig], ...]:
    """((tuned M, config), ...) sorted by M; () when the file does not exist."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return ()
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"kernel config table {path}: unreadable ({e})") from None
    try:
        table = sorted((int(m), GemmConfig.from_dict(cfg)) for m, cfg in data["configs"].items())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"kernel config table {path}: bad entry ({type(e).__name__}: {e})") from None
    return tuple(table)


def select(table: tuple[tuple[int, GemmConfig], ...], m: int) -> GemmConfig | None:
    """The entry for m rows: the smallest tuned M >= m, else the largest; None for an empty table."""
    for tuned_m, config in table:
        if tuned_m >= m:
            return config
    return table[-1][1] if table else None


@functools.lru_cache(maxsize=4096)
def _table(op: str, n: int, k: int, index: int, config_dir: Path) -> tuple[tuple[int, GemmConfig], ...]:
    """One (op, shape, GPU)'s table, found once per process: a launch must not build paths or stat files."""
    return _load_table(str(config_path(op, n, k, _device_name(index), config_dir)))


def lookup(op: str, n: int, k: int, m: int, device: torch.device, config_dir: Path = CONFIG_DIR) -> GemmConfig | None:
    """The tuned config of ``op`` for an [m, k] x [n, k] launch on ``device``, or None (use the default tiles)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return select(_table(op, n, k, index, config_dir), m)


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None elsewhere): the default configs size split-K by it."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def resolve_config(op: str, config: GemmConfig | None, m: int, n: int, k: int, device: torch.device,
                   default: Callable[[int | None], GemmConfig]) -> GemmConfig:
    """The config a launch uses: the caller's, else the tuned table's, else ``default(num_sms(device))``. A tuned
    GEMV entry (block_m 1, tuned at M = 1) never serves M > 1: a table tuned at M = 1 only gives the default there."""
    if config is not None:
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config must be a GemmConfig, got {type(config).__name__}")
        return config
    tuned = lookup(op, n, k, m, device)
    if tuned is not None and tuned.block_m == 1 and m != 1:
        tuned = None
    return tuned or default(num_sms(device))


# ---------------------------------------------------------------------------------------------------- sweeping


def write_table(path: Path, data: dict) -> None:
    """Write a table atomically (temp file + rename) and forget any cached copy of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    _load_table.cache_clear()
    _table.cache_clear()


TUNABLE_OPS = ("int8_gemm_channel", "int8_gemm_block", "fp8_gemm_block", "w8a16_gemm", "w4a16_gemm")
WEIGHT_ONLY_OPS = ("w8a16_gemm", "w4a16_gemm")
WEIGHT_BITS = {"w8a16_gemm": 8, "w4a16_gemm": 4}  # the weight-only ops' weight widths
GLUON_VEC = 4  # the Gluon GEMV's 32-bit words per thread, row and chunk: one 16-byte load


def gluon_chunk(bits: int) -> int:
    """The Gluon GEMV's unit of K: a thread-chunk of GLUON_VEC words, 32 int4 or 16 int8 weights."""
    return GLUON_VEC * 32 // bits


def gluon_step_fits(k: int, block_k: int) -> bool:
    """Whether K steps of block_k suit a K: the ragged last step wastes at most 1/8 of its loads."""
    padded = -(-k // block_k) * block_k
    return (padded - k) * 8 <= padded


DEFAULT_TUNE_M = (1, 16, 64, 128, 256, 1024, 4096)


def candidates(op: str, m: int, n: int, k: int, num_sms: int, sm90: bool = False,
               gluon: bool = False) -> list[GemmConfig]:
    """The configs a sweep tries for ``op`` at an [m, k] x [n, k] launch (kernel ties respected: block ops keep
    block_k 128). ``sm90``: the device runs the Hopper swap-AB decode kernel, whose tiles join the W8A8 int8 ops'
    candidates at M <= 64 (``_sm90_decode_candidates``). ``gluon``: the device runs the Gluon weight-only GEMV, whose
    tiles join w4a16_gemm's and w8a16_gemm's at M = 1 (``_gluon_gemv_candidates``).

    Decode (m <= 64) is weight-bandwidth bound: narrow N tiles, deep pipelines, and split-K up to ~8 programs per SM
    so that enough bytes are in flight (~40 KB per SM: 3 TB/s x ~1.5 us / 132 SMs). Prefill is tensor-core bound:
    128x128 to 256x128 tiles, 8 warps (two warpgroups), 3-4 stages (a 128x256x128 int8 stage is 48 KB of shared
    memory; Hopper gives a program up to 227 KB).
    """
    if op in WEIGHT_ONLY_OPS:
        out = _weight_only_candidates(op, m, n, k, num_sms)
        if m == 1 and gluon:
            out += _gluon_gemv_candidates(n, k, num_sms, bits=WEIGHT_BITS[op])
        return out
    block_ks = (128,) if op in ("int8_gemm_block", "fp8_gemm_block") else (128, 256)
    out: list[GemmConfig] = []
    if m == 1 and op in ("int8_gemm_channel", "int8_gemm_block"):
        out += _int8_gemv_candidates(op, n, k, num_sms)
    if m <= 64 and sm90 and op in ("int8_gemm_channel", "int8_gemm_block"):
        out += _sm90_decode_candidates(op, m, n, k, num_sms)
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        # 128-wide N tiles too: every program re-reads its rows of x (from L2), M x K x N / BLOCK_N bytes in all - at
        # M = 64 with 32-wide tiles twice the int8 weight's own bytes
        for bn in (32, 64, 128):
            tiles = -(-m // bm) * -(-n // bn)
            for bk in block_ks:
                k_tiles = -(-k // bk)
                for stages in (4, 6):
                    for split in (1, 2, 4, 8, 16):
                        if split > 1 and (tiles * split > 8 * num_sms or k_tiles < 2 * split):
                            continue
                        out.append(GemmConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=stages, split_k=split))
        return out
    # Large M: 64 x 128 / 128 x 64 tiles too - two or three programs per SM by registers and shared memory, so one
    # program's per-128-K promotion (block ops) overlaps another's MMAs.
    tiles = [(64, 64), (64, 128), (128, 64), (128, 128)] if m <= 256 else [(64, 128), (128, 64), (128, 128), (128, 256),
                                                                          (256, 128)]
    for bm, bn in tiles:
        for bk in block_ks:
            for stages in (3, 4):
                smem = bk * (bm + bn) * stages
                if smem > 200 * 1024:
                    continue
                for warps in (4, 8) if bm * bn <= 128 * 128 else (8,):
                    out.append(GemmConfig(bm, bn, bk, group_m=8, num_warps=warps, num_stages=stages))
    return out


def _sm90_decode_candidates(op: str, m: int, n: int, k: int, num_sms: int) -> list[GemmConfig]:
    """The swap-AB decode kernel (kernel "sm90") at M <= 64: 64 or 128 weight rows x the token bucket (or half of
    it: twice the programs, without split-K's partial sums) per program, K steps of 128 or 256 (block: 256 only where
    ``skinny_block_steps_ok``), a 4-deep ring and the deepest that fits ~200 KB of shared memory beside the block
    op's staged scales, split-K while the programs stay within two per SM (more waves of these short programs lost on
    the H100, session 14: 4096x4096 at M = 64, 64 x 256 steps, 4 stages: 13.0 / 21.2 / 31.6 us at split 2 / 4 / 8)."""
    out = []
    blocked = op == "int8_gemm_block"
    bucket = 16 if m <= 16 else (32 if m <= 32 else 64)
    for bm, bn in itertools.product((bucket,) if bucket == 16 else (bucket, bucket // 2), (64, 128)):
        tiles = -(-m // bm) * -(-n // bn)
        for bk in (128, 256):
            if blocked and not skinny_block_steps_ok(GemmConfig(bm, bn, bk)):
                continue
            k_tiles = -(-k // bk)
            for split in (1, 2, 4):
                if split > 1 and (tiles * split > 2 * num_sms or k_tiles < 2 * split):
                    continue
                cfg = GemmConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=4, split_k=split, kernel="sm90")
                scales = sm90_decode_scale_bytes(cfg, k) if blocked else 0
                deepest = min(8, (200 * 1024 - scales) // ((bn + bm) * bk))
                out += [replace(cfg, num_stages=stages) for stages in sorted({4, deepest}) if stages >= 4]
    return out


# The sm90 decode kernel's block-scaled 128-K sub-steps per drain of its wgmma pipeline
# (``_int8_skinny_gemm_sm90_kernel``), for tiles of up to SKINNY_GROUP_K_TILE int32 elements: two int32 dots in flight
# beside the fp32 accumulator take 3 x 64 registers a thread at 128 x 64, which spilled (476 bytes), so that tile
# waits for each sub-step alone.
SKINNY_GROUP_K = 4
SKINNY_GROUP_K_TILE = 128 * 32


def skinny_group_k(config: GemmConfig) -> int:
    """GROUP_K of the decode kernel's block-scaled path for this tile."""
    return SKINNY_GROUP_K if config.block_n * config.block_m <= SKINNY_GROUP_K_TILE else 1


def skinny_block_steps_ok(config: GemmConfig) -> bool:
    """Whether the decode kernel's block-scaled path takes this tile's K step: whole 128-K scale blocks (sub-steps,
    each promoted on its own) that one GROUP_K holds."""
    return config.block_k % 128 == 0 and skinny_group_k(config) % (config.block_k // 128) == 0


def sm90_decode_scale_steps(config: GemmConfig, k: int) -> int:
    """The 128-K blocks of one split whose scales the block-scaled decode kernel stages in shared memory: a power of
    two (its arange), at least 4 (its largest GROUP_K; a split's blocks are rounded up to whole groups)."""
    k_tiles = -(-k // config.block_k)
    blocks = -(-k_tiles // config.split_k) * (config.block_k // 128)
    return max(4, 1 << (blocks - 1).bit_length())


def sm90_decode_scale_bytes(config: GemmConfig, k: int) -> int:
    """Shared memory of the block-scaled decode kernel's staged fp32 scales: ``sm90_decode_scale_steps`` rows of the
    token tile."""
    return sm90_decode_scale_steps(config, k) * config.block_m * 4


def sm90_decode_smem(config: GemmConfig, k: int, blocked: bool) -> int:
    """Shared memory of the decode kernel: its ring (int8 weight and x boxes per stage) and, block-scaled, the staged
    scales."""
    ring = config.num_stages * (config.block_n + config.block_m) * config.block_k
    return ring + (sm90_decode_scale_bytes(config, k) if blocked else 0)


def _int8_gemv_candidates(op: str, n: int, k: int, num_sms: int) -> list[GemmConfig]:
    """The W8A8 GEMV (block_m 1: dp4a on int32 words, no tensor cores) at M = 1: row tiles x K steps (the block op's
    step is its 128-column block), 4 or 8 warps, split-K up to ~8 programs per SM, loads pipelined or not."""
    out = []
    for bn in (16, 32, 64):
        tiles = -(-n // bn)
        for bk in (128,) if op == "int8_gemm_block" else (256, 512):
            for warps in (4, 8):
                if bn * bk // 4 // (32 * warps) < 4:  # under 4 words (16 bytes) per thread: idle lanes
                    continue
                for split in (1, 2, 4, 8):
                    if split > 1 and (tiles * split > 8 * num_sms or -(-k // bk) < 2 * split):
                        continue
                    for stages in (1, 3):
                        out.append(GemmConfig(1, bn, bk, group_m=1, num_warps=warps, num_stages=stages, split_k=split))
    return out


def _gluon_gemv_candidates(n: int, k: int, num_sms: int, bits: int = 4) -> list[GemmConfig]:
    """The Gluon weight-only GEMV (kernel "gluon") over ``bits``-bit weights: 2 / 4 / 8 rows per thread, 8 / 16 / 32
    lanes along a row, 1-8 warps along K (``warps_k``), one or (with warps along K) two chunks (32 int4 / 16 int8
    weights) per thread and row in a step, 4 or 8 warps;
    K steps up to the whole K, a ragged last step wasting at most 1/8 of its loads; split-K up to 8 (one warp along
    K, one chunk) where the row tiles leave SMs idle. Session 18's sweeps (kernels/NOTES.md) found their winners here:
    whole-K steps with warps along K on the small shapes, the session 17 tiles on the large."""
    out = []
    for warps in (4, 8):
        for wk in (1, 2, 4, 8):
            for lanes in (8, 16, 32):
                for chunks in (1, 2) if wk > 1 else (1,):
                    for rows in (2, 4, 8):
                        bk, bn = gluon_chunk(bits) * chunks * lanes * wk, rows * (32 // lanes) * (warps // wk)
                        if wk > warps or rows * chunks > 8 or not 4 <= bn <= 256 or not gluon_step_fits(k, bk):
                            continue
                        tiles, k_tiles = -(-n // bn), -(-k // bk)
                        for split in (1, 2, 3, 4, 6, 8) if wk == 1 else (1,):
                            per = -(-k_tiles // split)
                            if split > 1 and (-(-k_tiles // per) != split or tiles * split > 8 * num_sms
                                              or tiles >= 2 * num_sms):
                                continue
                            out.append(GemmConfig(1, bn, bk, group_m=1, num_warps=warps, num_stages=chunks,
                                                  split_k=split, kernel="gluon", warps_k=wk))
    return out


def _weight_only_candidates(op: str, m: int, n: int, k: int, num_sms: int) -> list[GemmConfig]:
    """W8A16 / W4A16: at M = 1 the GEMV kernel (block_m 1: FMA units, register double-buffering, with or without
    its loop's loads pipelined) over row tiles and K steps (int4: within one 128-group or whole groups) and the swap-AB
    dot tiles; decode (M <= 64) the swap-AB tiles with split-K; prefill the 128 x 128 tiles of the defaults and their
    neighbours (W8A16 with 4 warps only, so no 128 x 256: weight_only.PREFILL_WARPS)."""
    out: list[GemmConfig] = []
    block_ks = (64, 128, 256, 512) if op == "w4a16_gemm" else (256, 512)  # int4: 256 / 512 = 2 / 4 whole groups
    if m == 1:
        for bn in (16, 32, 64):
            for bk in block_ks:
                tiles = -(-n // bn)
                for warps in (2, 4, 8):
                    if bn * bk // (32 * warps) < 8:  # under 8 weights per thread: idle lanes
                        continue
                    for split in (1, 2, 4, 8):
                        if split > 1 and (tiles * split > 16 * num_sms or -(-k // bk) < 2 * split):
                            continue
                        for stages in (1, 3):  # 3: the K loop's loads pipelined by tl.range (cp.async)
                            out.append(GemmConfig(1, bn, bk, group_m=1, num_warps=warps, num_stages=stages,
                                                  split_k=split))
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        for bn in (32, 64):
            tiles = -(-m // bm) * -(-n // bn)
            for bk in (64, 128) if op == "w4a16_gemm" else (128, 256):
                for stages in (4, 6):
                    for split in (1, 2, 4, 8):
                        if split > 1 and (tiles * split > 8 * num_sms or -(-k // bk) < 2 * split):
                            continue
                        out.append(GemmConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=stages, split_k=split))
        return out
    from ingot.kernels.weight_only import PREFILL_WARPS  # W8A16: 4, its 8-warp tiles wrote garbage on the H100

    warps = PREFILL_WARPS[op]
    tiles = [(128, 128, 64, warps), (64, 128, 64, 4), (128, 128, 128, warps)]
    if warps == 8:  # a 128 x 256 fp32 accumulator needs two warpgroups' registers
        tiles.append((128, 256, 64, 8))
    for bm, bn, bk, tile_warps in tiles:
        for stages in (3, 4):
            out.append(GemmConfig(bm, bn, bk, group_m=8, num_warps=tile_warps, num_stages=stages))
    return out


@dataclass(frozen=True)
class TuneOptions:
    """What ``ingot tune`` sweeps: ops x (N, K) shapes x M sizes; tables go to out_dir (the package's configs)."""

    ops: tuple[str, ...] = TUNABLE_OPS
    shapes: tuple[tuple[int, int], ...] = ()
    m_sizes: tuple[int, ...] = DEFAULT_TUNE_M
    rep_ms: int = 10
    out_dir: Path = CONFIG_DIR
    git_sha: str | None = None

    def __post_init__(self) -> None:
        for op in self.ops:
            if op not in TUNABLE_OPS:
                raise ValueError(f"tune: op {op!r}; expected one of {', '.join(TUNABLE_OPS)}")
        if not self.shapes:
            raise ValueError("tune: no (N, K) shapes given")

        if not self.m_sizes or any(m < 1 for m in self.m_sizes):
            raise ValueError(f"tune: M sizes must be positive, got {list(self.m_sizes)}")


def _inputs(op: str, m: int, n: int, k: int, sets: int, device: torch.device) -> list[tuple]:
    """``sets`` independent random operand sets of ``op`` (rotated so weights come from HBM, not L2)."""
    from ingot.formats.base import cdiv

    out = []
    for _ in range(sets):
        if op == "w8a16_gemm":
            out.append((torch.randn(m, k, device=device, dtype=torch.bfloat16),
                        torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
                        torch.rand(n, 1, device=device) / 100))
        elif op == "w4a16_gemm":
            out.append((torch.randn(m, k, device=device, dtype=torch.bfloat16),
                        torch.randint(-2**31, 2**31 - 1, (n, cdiv(k, 8)), dtype=torch.int32, device=device),
                        torch.rand(n, cdiv(k, 128), device=device) / 100, k))
        elif op == "int8_gemm_channel":
            out.append((torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device),
                        torch.rand(m, 1, device=device) / 100,
                        torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
                        torch.rand(n, 1, device=device) / 100))
        else:
            dtype = torch.int8 if op == "int8_gemm_block" else torch.float8_e4m3fn
            if dtype == torch.int8:
                x_q = torch.randint(-127, 128, (m, k), dtype=dtype, device=device)
                w_q = torch.randint(-127, 128, (n, k), dtype=dtype, device=device)
            else:
                x_q = (torch.randn(m, k, device=device) * 100).clamp(-448, 448).to(dtype)  # e4m3 saturates at 448
                w_q = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(dtype)
            out.append((x_q, torch.rand(m, cdiv(k, 128), device=device) / 100, w_q,
                        torch.rand(cdiv(n, 128), cdiv(k, 128), device=device) / 100))
    return out


def _op_fn(op: str):
    from ingot.kernels import fp8_gemm, int8_gemm, weight_only

    return {"int8_gemm_channel": int8_gemm.int8_gemm_channel, "int8_gemm_block": int8_gemm.int8_gemm_block,
            "fp8_gemm_block": fp8_gemm.fp8_gemm_block, "w8a16_gemm": weight_only.w8a16_gemm,
            "w4a16_gemm": weight_only.w4a16_gemm}[op]


def _default_fn(op: str, device: torch.device):
    """(m, n, k, num_sms) -> the config ``op`` launches with on ``device`` where no table has the shape."""
    from ingot.kernels import int8_gemm, weight_only

    if op in WEIGHT_ONLY_OPS:
        return lambda m, n, k, sms: weight_only.untuned_config(op, m, n, k, device, sms)
    return lambda m, n, k, sms: int8_gemm.default_config(m, n, k, sms, op)


def _sm90_decode_available(device: torch.device) -> bool:
    """Whether the Hopper swap-AB decode kernel can run on ``device`` (sm_90, triton with Gluon)."""
    if torch.cuda.get_device_capability(device) != (9, 0) or torch.version.hip is not None:
        return False
    from ingot.kernels import int8_gemm

    return int8_gemm._sm90_module() is not None


def _gluon_gemv_available(device: torch.device) -> bool:
    """Whether the Gluon weight-only GEMV can run on ``device`` (NVIDIA sm_80+, triton with Gluon)."""
    if torch.version.hip is not None or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    from ingot.kernels import weight_only

    return weight_only._gluon_module() is not None


def tune(options: TuneOptions, log=print) -> list[Path]:
    """Sweep ``candidates`` for every (op, shape, M) on the current CUDA device; write one table per (op, shape).

    Timing: ``triton.testing.do_bench_cudagraph`` (median of graph replays), each call on the next of several input
    sets (>= 2x the L2 size of weights in all, so they come from HBM). The winner is checked against the default
    config's output on the same inputs (a config that computes something else is dropped); entries record the time,
    the default's time and how many were tried. An existing table is updated: M values not swept keep their entries.
    Returns the paths written.
    """
    import triton
    import triton.testing

    if not torch.cuda.is_available():
        raise ValueError("tune: needs a CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    name, num_sms = props.name, props.multi_processor_count
    sm90 = _sm90_decode_available(device)
    gluon = _gluon_gemv_available(device)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    written = []
    for op in options.ops:
        fn = _op_fn(op)
        default_config = _default_fn(op, device)
        for n, k in options.shapes:
            entries = {}
            for m in options.m_sizes:
                sets = _inputs(op, m, n, k, max(2, min(16, -(-2 * l2 // (n * k)))), device)
                out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
                state = [0]

                def timed(cfg):
                    def call():
                        args = sets[state[0] % len(sets)]
                        state[0] += 1
                        fn(*args, out=out, config=cfg)
                    # CUDA graph replays: no Python launch overhead in the numbers (a decode GEMM takes ~5-50 us,
                    # the wrapper ~20-40 us on the host; the engine replays graphs too). Capture unrolls the calls,
                    # so the rotation over input sets is baked in and weights stream from HBM.
                    torch.cuda.synchronize()
                    return triton.testing.do_bench_cudagraph(call, rep=options.rep_ms, return_mode="median") * 1e3

                default = default_config(m, n, k, num_sms)
                results = []
                for cfg in candidates(op, m, n, k, num_sms, sm90, gluon):
                    try:
                        results.append((timed(cfg), cfg))
                    except Exception as e:  # out of shared memory / registers for this tile: not a candidate
                        log(f"  {op} M={m} {n}x{k} {cfg}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                default_us = timed(default)
                reference = fn(*sets[0], config=default).float()
                for us, cfg in sorted(results, key=lambda r: r[0]):
                    y = fn(*sets[0], config=cfg).float()
                    err = ((y - reference).norm() / reference.norm().clamp_min(1e-30)).item()
                    if err <= 1e-2:  # bf16 outputs, different summation orders
                        break
                    log(f"  {op} M={m} {n}x{k} {cfg}: output differs from the default config (rel {err:.3g}), dropped")
                else:
                    us, cfg = default_us, default
                if default_us < us:
                    us, cfg = default_us, default
                entries[str(m)] = {**cfg.to_dict(), "us": round(us, 2), "default_us": round(default_us, 2),
                                   "candidates": len(results)}
                log(f"{op} M={m} N={n} K={k}: {us:.1f} us (default {default_us:.1f} us) {cfg.kernel} "
                    f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} split{cfg.split_k}")
            path = config_path(op, n, k, name, options.out_dir)
            if path.exists():  # keep the M values this sweep did not time
                try:
                    entries = {**json.loads(path.read_text()).get("configs", {}), **entries}
                except (OSError, ValueError):
                    log(f"  {path}: unreadable, replaced")
            write_table(path, {"op": op, "n": n, "k": k, "device_name": name, "triton": triton.__version__,
                               "torch": torch.__version__, "git_sha": options.git_sha, "configs": entries})
            written.append(path)
    return written
