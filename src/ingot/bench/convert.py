"""``ingot bench convert``: FP8 -> INT8 conversion throughput and peak memory on a synthetic DeepSeek-V3.

1. Build (or reuse) a multi-GB hf-fp8 checkpoint with DeepSeek-V3's real layer shapes and tensor names, filled
   with random e4m3 bytes (never the NaN codes 0x7F / 0xFF) and positive random block scales.
2. For each device, scheme and worker count, run ``python -m ingot.cli convert`` in a fresh process (so its peak
   RSS is its own) into a fresh directory, deleted afterwards; read the run's ``ingot_manifest.json`` totals.
3. Write JSON (command, git sha, device, versions, config, runs, targets with pass/fail) and print a table.

Targets (the converter's acceptance numbers): >= 150 MB/s of FP8 source per CPU worker, >= 1 GB/s on an H100,
peak RSS <= 3 source shards per process.

Throughput is source bytes over the converter's own seconds (the manifest's, from planning to config.json;
interpreter start and imports excluded, reported separately as wall time). The source is normally in the page
cache (it was just written or read) and the output goes to the page cache without fsync: the numbers measure
the converter, not the disk. Both facts are recorded per run (page-cache residency via mincore).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ingot.bench.common import (
    TreeRssSampler,
    default_results_path,
    device_info,
    device_slug,
    filesystem,
    git_info,
    load_average,
    page_cache_fraction,
    software_info,
    timestamp,
    write_results,
)
from ingot.formats.safetensors_io import CONFIG_NAME, INDEX_NAME, read_json, shard_name, write_json, write_shard

FP8 = torch.float8_e4m3fn
STAMP_NAME = "ingot_bench_source.json"  # what a built source holds; written just before config.json
SOURCE_VERSION = 1  # bump when the generator changes what it writes
SUPPORTED_SCHEMES = ("int8-block", "int8-channel")
TARGET_CPU_MB_S_PER_WORKER = 150.0
TARGET_CUDA_MB_S = 1000.0  # on an H100
TARGET_PEAK_RSS_SHARDS = 3.0


@dataclass(frozen=True)
class SyntheticDeepseekV3:
    """DeepSeek-V3's dimensions (its config.json); the bench writes as many MoE layers as its size asks.

    Defaults are the real model's; tests pass small ones. Only routed experts are trimmed (the last layer's).
    """

    hidden_size: int = 7168
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    num_attention_heads: int = 128
    moe_intermediate_size: int = 2048
    intermediate_size: int = 18432  # dense layers' MLP; the bench writes MoE layers only
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    vocab_size: int = 129280
    weight_block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"SyntheticDeepseekV3.{name}: must be positive, got {value}")

    def units(self, layer: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
        """One MoE layer as units of (name, kind, shape): its attention with norms, its router with the shared
        experts, then one unit per routed expert. kind: "fp8" (a linear: weight + weight_scale_inv), "bf16", "f32".
        """
        h, heads = self.hidden_size, self.num_attention_heads
        pre = f"model.layers.{layer}"
        attn = [
            (f"{pre}.input_layernorm.weight", "bf16", (h,)),
            (f"{pre}.self_attn.q_a_proj", "fp8", (self.q_lora_rank, h)),
            (f"{pre}.self_attn.q_a_layernorm.weight", "bf16", (self.q_lora_rank,)),
            (f"{pre}.self_attn.q_b_proj", "fp8", (heads * (self.qk_nope_head_dim + self.qk_rope_head_dim), self.q_lora_rank)),
            (f"{pre}.self_attn.kv_a_proj_with_mqa", "fp8", (self.kv_lora_rank + self.qk_rope_head_dim, h)),
            (f"{pre}.self_attn.kv_a_layernorm.weight", "bf16", (self.kv_lora_rank,)),
            (f"{pre}.self_attn.kv_b_proj", "fp8", (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)),
            (f"{pre}.self_attn.o_proj", "fp8", (h, heads * self.v_head_dim)),
            (f"{pre}.post_attention_layernorm.weight", "bf16", (h,)),
        ]
        shared = self.moe_intermediate_size * self.n_shared_experts
        router = [
            (f"{pre}.mlp.gate.weight", "bf16", (self.n_routed_experts, h)),
            (f"{pre}.mlp.gate.e_score_correction_bias", "f32", (self.n_routed_experts,)),
            (f"{pre}.mlp.shared_experts.gate_proj", "fp8", (shared, h)),
            (f"{pre}.mlp.shared_experts.up_proj", "fp8", (shared, h)),
            (f"{pre}.mlp.shared_experts.down_proj", "fp8", (h, shared)),
        ]
        experts = [
            [
                (f"{pre}.mlp.experts.{e}.gate_proj", "fp8", (self.moe_intermediate_size, h)),
                (f"{pre}.mlp.experts.{e}.up_proj", "fp8", (self.moe_intermediate_size, h)),
                (f"{pre}.mlp.experts.{e}.down_proj", "fp8", (h, self.moe_intermediate_size)),
            ]
            for e in range(self.n_routed_experts)
        ]
        return [attn, router, *experts]

    def config(self, num_layers: int) -> dict:
        """config.json of DeepSeek-V3 as published, with ``num_hidden_layers`` = the layers written, all MoE
        (``first_k_dense_replace`` 0) and no MTP layer."""
        bn, bk = self.weight_block_size
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "first_k_dense_replace": 0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "kv_lora_rank": self.kv_lora_rank,
            "max_position_embeddings": 163840,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_layer_freq": 1,
            "n_group": 8,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": True,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": num_layers,
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [bn, bk],
            },
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096, "type": "yarn",
            },
            "rope_theta": 10000,
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "tie_word_embeddings": False,
            "topk_group": 4,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "v_head_dim": self.v_head_dim,
            "vocab_size": self.vocab_size,
        }


@dataclass(frozen=True)
class BenchConvertOptions:
    workdir: Path  # the synthetic source is built (and reused) here; outputs go here and are deleted
    size_bytes: int = 4 * 10**9
    shard_bytes: int = 10**9
    workers: tuple[int, ...] = (1, 2)  # CPU worker counts; a CUDA device always runs 1 worker
    devices: tuple[str, ...] = ("cpu",)
    schemes: tuple[str, ...] = SUPPORTED_SCHEMES
    out: Path | None = None  # None: benchmarks/results/convert-<device>-<date>.json
    command: str = ""  # the command line, recorded in the JSON
    git_sha: str | None = None  # for trees copied without .git (the GPU machine): the sha they were copied at
    model: SyntheticDeepseekV3 = field(default_factory=SyntheticDeepseekV3)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size_bytes <= 0 or self.shard_bytes <= 0:
            raise ValueError(f"bench convert: --size and --shard-size must be positive, got {self.size_bytes}, {self.shard_bytes}")
        if not self.workers or any(w < 1 for w in self.workers):
            raise ValueError(f"bench convert: --workers must be positive integers, got {list(self.workers)}")
        for d in self.devices:
            if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"bench convert: device {d!r}; expected cpu, cuda or cuda:N")
        for s in self.schemes:
            if s not in SUPPORTED_SCHEMES:
                raise ValueError(f"bench convert: scheme {s!r}; expected one of {', '.join(SUPPORTED_SCHEMES)}")


# ------------------------------------------------------------------------------------------ the source


def source_dir(options: BenchConvertOptions) -> Path:
    return Path(options.workdir) / f"deepseek-v3-fp8-{options.size_bytes // 10**6}MB-shard{options.shard_bytes // 10**6}MB"


def _stamp(options: BenchConvertOptions) -> dict:
    return json.loads(json.dumps({  # as it reads back from disk (tuples become lists)
        "version": SOURCE_VERSION,
        "model": asdict(options.model),
        "size_bytes": options.size_bytes,
        "shard_bytes": options.shard_bytes,
        "seed": options.seed,
    }))


def plan_source(options: BenchConvertOptions) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], int, dict]:
    """Tensors (name, dtype, shape) in write order until ``size_bytes``, whole units at a time.

    Returns the tensors, the number of layers they touch, and a summary (experts per layer).
    """
    m = options.model
    bn, bk = m.weight_block_size
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    total, layer, experts = 0, 0, []
    while total < options.size_bytes:
        experts.append(0)
        for u, unit in enumerate(m.units(layer)):
            if total >= options.size_bytes:
                break
            for name, kind, shape in unit:
                if kind == "fp8":
                    n, k = shape
                    tensors.append((f"{name}.weight", FP8, shape))
                    tensors.append((f"{name}.weight_scale_inv", torch.float32, (-(-n // bn), -(-k // bk))))
                else:
                    tensors.append((name, torch.bfloat16 if kind == "bf16" else torch.float32, shape))
                total += _nbytes(tensors[-1]) + (_nbytes(tensors[-2]) if kind == "fp8" else 0)
            if u >= 2:
                experts[-1] += 1
        layer += 1
    return tensors, layer, {"bytes": total, "layers": layer, "routed_experts_per_layer": experts}


def _nbytes(t: tuple[str, torch.dtype, tuple[int, ...]]) -> int:
    n = t[1].itemsize
    for d in t[2]:
        n *= d
    return n


def build_source(options: BenchConvertOptions) -> tuple[Path, dict]:
    """The synthetic checkpoint, built unless a complete one with the same stamp is there. Returns (dir, info)."""
    out = source_dir(options)
    stamp = _stamp(options)
    tensors, n_layers, summary = plan_source(options)
    if (out / CONFIG_NAME).exists() and (out / STAMP_NAME).exists() and read_json(out / STAMP_NAME, "bench stamp") == stamp:
        return out, {**summary, "reused": True, "build_seconds": None, "shards": _shard_files(out)}
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:  # greedy, in order: as in the real R1, a weight's scale may open the next shard
        if groups[-1] and size + _nbytes(t) > options.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += _nbytes(t)
    gen = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)  # numpy's bytes come ~3x faster than torch.randint's
    weight_map = {}
    for i, group in enumerate(groups):
        name = shard_name(i, len(groups))
        write_shard(out / name, {t[0]: _random_tensor(t[1], t[2], gen, rng) for t in group})
        weight_map.update({t[0]: name for t in group})
    write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(_nbytes(t) for t in tensors)}, "weight_map": weight_map})
    write_json(out / STAMP_NAME, stamp)
    write_json(out / CONFIG_NAME, options.model.config(n_layers))  # last: only now is the source complete
    return out, {**summary, "reused": False, "build_seconds": round(time.perf_counter() - t0, 3), "shards": len(groups)}


def _shard_files(src: Path) -> int:
    return len(set(read_json(src / INDEX_NAME, "shard index")["weight_map"].values()))


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """Random bytes viewed as e4m3 (0x7F / 0xFF, the NaN codes, nudged to 0x7E / 0xFE: +-448), positive block
    scales around DeepSeek's (amax / 448 ~ 1e-4..1e-3), norms near 1, router weights ~ N(0, 0.02)."""
    if dtype == FP8:
        b = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        b.sub_(((b & 0x7F) == 0x7F).to(torch.uint8))
        return b.view(FP8)
    if len(shape) == 2 and dtype == torch.float32:  # a block scale grid
        return torch.rand(shape, generator=gen).mul_(9e-4).add_(1e-4)
    if len(shape) == 1 and dtype == torch.bfloat16:  # a norm
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


# --------------------------------------------------------------------------------------------- the runs


def run_one(src: Path, dst: Path, scheme: str, workers: int, device: str, shard_bytes: int) -> dict:
    """One conversion in a fresh interpreter; its numbers, from its manifest and from outside."""
    if dst.exists():
        shutil.rmtree(dst)
    shards = sorted(src.glob("*.safetensors"))
    cached = page_cache_fraction(shards)
    load_before = load_average()
    cmd = [sys.executable, "-m", "ingot.cli", "convert", str(src), str(dst), "--scheme", scheme,
           "--workers", str(workers), "--device", device, "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeRssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    tree_peak = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row: dict = {
        "device": device, "scheme": scheme, "workers": workers, "command": " ".join(cmd[1:]),
        "returncode": proc.returncode, "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu_s, 3),
        "source_page_cache_fraction": None if cached is None else round(cached, 4),
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    if proc.returncode != 0:
        row["error"] = (stderr or stdout).strip()[-2000:]
        shutil.rmtree(dst, ignore_errors=True)
        return row
    totals = json.loads((dst / "ingot_manifest.json").read_text())["totals"]
    shutil.rmtree(dst)
    mb = totals["bytes_in"] / 1e6
    secs = max(totals["seconds"], 1e-3)  # the manifest rounds to ms
    row.update({
        "seconds": secs,
        "bytes_in": totals["bytes_in"],
        "bytes_out": totals["bytes_out"],
        "shards": totals["shards"],
        "mb_per_s": round(mb / secs, 1),
        "mb_per_s_per_worker": round(mb / secs / workers, 1),
        "mb_per_s_wall": round(mb / wall, 1),
        "mb_per_cpu_second": round(mb / cpu_s, 1) if cpu_s > 0 else None,
        # ru_maxrss of the converter and of its (joined) workers: the largest single process, not their sum.
        "peak_rss_bytes": totals["peak_rss_bytes"],
        "peak_rss_shards": round(totals["peak_rss_bytes"] / shard_bytes, 3),
        # /proc sampled every 100 ms: the converter and all its workers together.
        "peak_tree_rss_bytes": tree_peak,
        "peak_tree_rss_shards": None if tree_peak is None else round(tree_peak / shard_bytes, 3),
        "snr_db_mean": totals["snr_db_mean"],
        "snr_db_min": totals["snr_db_min"],
    })
    row["targets"] = _targets(row, shard_bytes)
    return row


def _targets(row: dict, shard_bytes: int) -> dict:
    out = {}
    if row["device"] == "cpu":
        out["mb_per_s_per_worker"] = {"target": TARGET_CPU_MB_S_PER_WORKER, "value": row["mb_per_s_per_worker"],
                                      "pass": row["mb_per_s_per_worker"] >= TARGET_CPU_MB_S_PER_WORKER}
    else:
        out["mb_per_s"] = {"target": TARGET_CUDA_MB_S, "value": row["mb_per_s"], "pass": row["mb_per_s"] >= TARGET_CUDA_MB_S,
                           "note": "the target is for an H100"}
    out["peak_rss_shards"] = {"target": TARGET_PEAK_RSS_SHARDS, "value": row["peak_rss_shards"],
                              "pass": row["peak_rss_shards"] <= TARGET_PEAK_RSS_SHARDS}
    return out


def copy_baseline(src: Path, workdir: Path) -> dict:
    """Copying the source shards (read + write through the page cache): the I/O ceiling of any converter."""
    dst = Path(workdir) / "copy-baseline"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shards = sorted(src.glob("*.safetensors"))
    t0 = time.perf_counter()
    for f in shards:
        shutil.copyfile(f, dst / f.name)
    secs = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in shards)
    shutil.rmtree(dst)
    return {"seconds": round(secs, 3), "bytes": nbytes, "mb_per_s": round(nbytes / 1e6 / secs, 1)}


def run_bench_convert(options: BenchConvertOptions) -> dict:
    """Build the source, run every (device, scheme, workers), write the JSON, print a table; returns the results."""
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = timestamp()
    src, source = build_source(options)
    device = device_info(options.devices)
    baseline = copy_baseline(src, workdir)
    runs = []
    for dev in options.devices:
        for scheme in options.schemes:
            for workers in (options.workers if dev == "cpu" else (1,)):
                dst = workdir / f"out-{dev.replace(':', '')}-{scheme}-w{workers}"
                row = run_one(src, dst, scheme, workers, dev, options.shard_bytes)
                if "mb_per_s" in row:
                    row["ratio_to_copy"] = round(row["mb_per_s"] / baseline["mb_per_s"], 3)
                runs.append(row)
    checks = [t["pass"] for r in runs for t in r.get("targets", {}).values()]
    results = {
        "bench": "convert",
        "command": options.command,
        "started": started,
        "finished": timestamp(),
        "git": {"sha": options.git_sha, "dirty": None} if options.git_sha else git_info(),
        "device": device,
        "software": software_info(),
        "config": {
            "size_bytes": options.size_bytes,
            "shard_bytes": options.shard_bytes,
            "devices": list(options.devices),
            "schemes": list(options.schemes),
            "workers": list(options.workers),
            "seed": options.seed,
            "workdir": str(workdir),
            "workdir_filesystem": filesystem(workdir),
            "model": asdict(options.model),
            "source": {"path": str(src), **source,
                       "omitted": "embed_tokens, lm_head and the final norm: not converted (copied), and 3.7 GB"},
            "units": "MB = 1e6 bytes; throughput = FP8 source bytes / the converter's manifest seconds",
            "page_cache": "the source is read through the page cache (fraction resident recorded per run; it was "
                          "just built or read); the output is written to the page cache without fsync",
        },
        "baseline": {"copy": baseline},
        "runs": runs,
        "targets": {
            "cpu_mb_per_s_per_worker": TARGET_CPU_MB_S_PER_WORKER,
            "cuda_mb_per_s": TARGET_CUDA_MB_S,
            "peak_rss_shards": TARGET_PEAK_RSS_SHARDS,
            "all_pass": bool(checks) and all(checks) and all(r["returncode"] == 0 for r in runs),
        },
    }
    out = options.out or default_results_path("convert", device_slug(device))
    results["out"] = str(write_results(out, results))
    print(format_table(results))
    return results


def format_table(results: dict) -> str:
    head = f"{'device':8} {'scheme':13} {'wk':>2} {'sec':>7} {'MB/s':>7} {'MB/s/wk':>8} {'MB/cpu-s':>8} {'RSS GB':>7} {'shards':>6} {'tree':>5}  pass"
    lines = [head, "-" * len(head)]
    for r in results["runs"]:
        if r["returncode"] != 0:
            lines.append(f"{r['device']:8} {r['scheme']:13} {r['workers']:>2}  FAILED: {r.get('error', '')[-200:]}")
            continue
        ok = all(t["pass"] for t in r["targets"].values())
        tree = "" if r["peak_tree_rss_shards"] is None else f"{r['peak_tree_rss_shards']:.2f}"
        lines.append(
            f"{r['device']:8} {r['scheme']:13} {r['workers']:>2} {r['seconds']:>7.1f} {r['mb_per_s']:>7.0f} "
            f"{r['mb_per_s_per_worker']:>8.0f} {r['mb_per_cpu_second'] or 0:>8.0f} {r['peak_rss_bytes'] / 1e9:>7.2f} "
            f"{r['peak_rss_shards']:>6.2f} {tree:>5}  {'yes' if ok else 'NO'}"
        )
    c = results["config"]
    base = results["baseline"]["copy"]
    lines.append(
        f"source {c['source']['bytes'] / 1e9:.2f} GB in {c['source']['shards']} shards of {c['shard_bytes'] / 1e9:.2f} GB; "
        f"copy baseline {base['mb_per_s']:.0f} MB/s; targets: >= {TARGET_CPU_MB_S_PER_WORKER:.0f} MB/s per CPU worker, "
        f">= {TARGET_CUDA_MB_S:.0f} MB/s on an H100, peak RSS <= {TARGET_PEAK_RSS_SHARDS:.0f} shards -> "
        f"{'all pass' if results['targets']['all_pass'] else 'NOT all pass'}"
    )
    lines.append(f"results: {results['out']}")
    return "\n".join(lines)
