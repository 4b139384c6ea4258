"""The streaming checkpoint-to-checkpoint converter: any format ingot reads -> any scheme and format it writes.

Top-down:
1. ``plan``: read config.json and every shard *header* (not the data), decide for each tensor what it becomes
   (a quantized linear, a linear kept in source precision, or a tensor copied as is) and which output shard
   each output tensor lands in. Output shapes follow from input shapes, so the index is known before any work.
2. ``convert_shard``: for one output shard, read each needed source tensor through the index (a scale may sit
   in another shard), dequantize, re-quantize (FP8 -> INT8 in one pass, never writing a BF16 copy), and write
   the shard atomically (temp name, rename), tensor by tensor as they are made. Shards are independent:
   ``workers`` processes convert them in parallel (one torch thread each on CPU), and peak memory is about one
   mapped source shard plus one linear's temporaries, whatever the model's size (1 GB shards: 1.3 GB RSS).
3. ``finish``: the index, tokenizer/generation files, ``ingot_manifest.json``, and config.json last - a
   directory without config.json is never mistaken for a finished checkpoint.

Calibrated options run once, before any shard, and keep their result beside the job: ``--smooth`` its factors
(``smoothing.safetensors``), ``--gptq`` its GPTQ-rounded linears (``gptq.safetensors``, made after the smoothing, from
the Hessians of the smoothed inputs); the shards then write those linears instead of rounding to nearest.

Resumable: ``DST/.ingot/job.json`` records the arguments; a shard is done once its file has been renamed into
place (its manifest rows are written first, beside the job). Run again with the same arguments and only the
missing shards are converted; the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from ingot import formats
from ingot.formats.base import QUANTIZABLE, Format, StoredLinear, TensorSpec, layer_index
from ingot.formats.safetensors_io import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
    ShardWriter,
    numel,
    read_json,
    shard_name,
    write_json,
)
from ingot.quant import fast, ref
from ingot.quant.gptq import GptqConfig, GptqWeights, check_scheme
from ingot.quant.schemes import BF16, Scheme
from ingot.quant.smooth import Smoothing, SmoothConfig

MANIFEST_NAME = "ingot_manifest.json"
WORK_DIR = ".ingot"  # job record and per-shard manifest rows while a conversion is in progress
SMOOTHING_NAME = "smoothing.safetensors"  # in WORK_DIR: the factors, so a resumed conversion does not recalibrate
GPTQ_NAME = "gptq.safetensors"  # in WORK_DIR: GPTQ's quantized linears, made once before any shard is written
# Files of a source directory that are never copied: weights (re-written), pickles (never loaded), our own
# bookkeeping. Everything else at the top level (tokenizer, generation config, chat template, remote code
# files for other engines) is copied byte for byte.
SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.tmp|^" + re.escape(MANIFEST_NAME) + ")$")


@dataclass(frozen=True)
class ConvertOptions:
    scheme: Scheme
    format: str | None = None  # None: the scheme's default format
    ignore: tuple[str, ...] = ()  # regexes (re.search) over linear module names kept in source precision
    quantize_mtp: bool = False  # DeepSeek MTP layers are copied unquantized unless asked
    device: str = "cpu"
    workers: int = 1
    max_shard_bytes: int | None = None  # None: one output shard per source shard
    overwrite: bool = False
    smooth: SmoothConfig | None = None  # SmoothQuant smoothing folded in before quantization (ingot.quant.smooth)
    gptq: GptqConfig | None = None  # GPTQ rounding of the quantized linears (ingot.quant.gptq), after smoothing

    def job(self, src: Path) -> dict:
        """What makes two runs 'the same conversion' (device and workers do not change the bytes)."""
        return {
            "source": str(src.resolve()),
            "scheme": self.scheme.name,
            "format": self.format,
            "ignore": list(self.ignore),
            "quantize_mtp": self.quantize_mtp,
            "max_shard_bytes": self.max_shard_bytes,
            **({"smooth": self.smooth.job()} if self.smooth else {}),
            **({"gptq": self.gptq.job()} if self.gptq else {}),
        }


@dataclass
class Item:
    """One unit of work: a linear (all its stored tensors) or a single tensor copied as is."""

    name: str  # linear module prefix, or the tensor's name
    sources: list[str]  # source tensors it reads
    src_kind: str | None  # stored kind of a linear; None for a copied tensor
    dst_kind: str | None  # kind it is written as; None for a copied tensor
    specs: list[TensorSpec]  # what it writes
    src_bytes: int


@dataclass
class Plan:
    src: Path
    dst: Path
    options: ConvertOptions
    src_format: str
    src_kind: str
    dst_format: str
    out_dtype: torch.dtype  # dtype of linears written unquantized (fp16 / bf16 for those formats, else the model's)
    kept: list[str]  # quantizable linears written unquantized (--ignore, MTP), recorded in the config
    caveats: list[str]  # what loaders of the target format will refuse (e.g. ragged int4 groups), one line each
    items: list[Item]
    shards: list[list[tuple[int, list[str]]]]  # per output shard: (item index, names of its specs in this shard)
    owner: list[int]  # per item: the shard holding its first output tensor (it reports the manifest row)
    shard_files: list[str]
    config: dict  # the source config.json
    smoothing: Smoothing | None = None  # factors folded into the tensors they touch (set by ``convert``)
    gptq: GptqWeights | None = None  # GPTQ's quantized linears, read from DST/.ingot (set by ``convert``)

    def quantized(self) -> list[Item]:
        """The linears written in the target scheme (not kept in source precision)."""
        return [it for it in self.items if it.src_kind is not None and it.dst_kind != "bf16"]

    def shard_src_bytes(self, i: int) -> int:
        return sum(self.items[j].src_bytes for j, _ in self.shards[i] if self.owner[j] == i)


# ------------------------------------------------------------------------------------------------- plan


def plan(src: Path, dst: Path, options: ConvertOptions, ckpt: Checkpoint | None = None) -> Plan:
    """Decide every output tensor and shard from config.json and the shard headers alone (``ckpt``: ``src`` opened)."""
    ckpt = ckpt or Checkpoint(src)
    config = ckpt.config
    src_fmt, src_kind = formats.detect(config)
    scheme = options.scheme
    dst_fmt = formats.writer(options.format, scheme.kind)
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dst_fmt.name, formats.model_dtype(config))
    n_layers = config.get("num_hidden_layers")
    n_mtp = int(config.get("num_nextn_predict_layers") or 0)
    ignore = [re.compile(p) for p in options.ignore]

    def is_mtp(prefix: str) -> bool:
        layer = layer_index(prefix)
        return n_mtp > 0 and layer is not None and n_layers is not None and layer >= n_layers

    linears, consumed = formats.find_linears(ckpt, src_fmt, src_kind)

    # 3. Decide each linear's target and the output tensors.
    items: list[Item] = []
    kept: list[str] = []
    caveats: dict[str, list[str]] = {}
    for prefix, kind in linears.items():
        sources = [p for p in (prefix + s for s in src_fmt.companions) if p in ckpt] if kind != "bf16" else [f"{prefix}.weight"]
        n, k = formats.linear_shape(ckpt, prefix)
        quantize = (
            scheme.is_quantized
            and QUANTIZABLE.match(prefix) is not None
            and not any(p.search(prefix) for p in ignore)
            and (options.quantize_mtp or not is_mtp(prefix))
        )
        dst_kind = scheme.kind if quantize else "bf16"
        if scheme.is_quantized and not quantize:
            kept.append(prefix)
        specs = dst_fmt.linear_specs(prefix, dst_kind, n, k, out_dtype) if quantize else [TensorSpec(f"{prefix}.weight", out_dtype, (n, k))]
        items.append(Item(prefix, sources, kind, dst_kind, specs, sum(ckpt.tensors[s].nbytes for s in sources)))
        caveat = dst_fmt.load_caveat(dst_kind, n, k) if quantize else None
        if caveat:
            caveats.setdefault(caveat, []).append(prefix)

    # 4. Everything else is copied as is (fp16 / bf16 formats: 16-bit float tensors are cast, float32 stays float32).
    for name, info in ckpt.tensors.items():
        if name in consumed:
            continue
        dtype = out_dtype if (dst_fmt.name in ("fp16", "bf16") and info.dtype in (torch.bfloat16, torch.float16)) else info.dtype
        items.append(Item(name, [name], None, None, [TensorSpec(name, dtype, info.shape)], info.nbytes))

    # 5. Order: by source shard, then name - deterministic, and each output shard reads mostly one source shard.
    shard_pos = {s: i for i, s in enumerate(ckpt.shards)}
    items.sort(key=lambda it: (shard_pos[ckpt.tensors[it.sources[0]].shard], it.name))
    groups = _assign_shards(items, [shard_pos[ckpt.tensors[it.sources[0]].shard] for it in items], options.max_shard_bytes)
    owner = [0] * len(items)
    for i, group in reversed(list(enumerate(groups))):
        for j, _ in group:
            owner[j] = i
    files = [SINGLE_NAME] if len(groups) == 1 else [shard_name(i, len(groups)) for i in range(len(groups))]
    return Plan(
        src, dst, options, src_fmt.name, src_kind, dst_fmt.name, out_dtype, sorted(kept),
        [f"{c}: {len(v)} linears, e.g. {v[0]} (--ignore them or choose another --format)" for c, v in caveats.items()],
        items, groups, owner, files, config,
    )


def _assign_shards(items: list[Item], src_shard: list[int], max_bytes: int | None) -> list[list[tuple[int, list[str]]]]:
    """Output shards as lists of (item, its tensors in this shard).

    Without a size limit, output shard i holds what came from source shard i. With one, tensors fill shards
    greedily in order - so, as in the real DeepSeek-R1, a weight's scale can land in the next shard.
    """
    groups: list[list[tuple[int, list[str]]]] = []
    size, current = 0, None
    for j, it in enumerate(items):
        for spec in it.specs:
            if max_bytes is None:
                new = current is None or src_shard[j] != current
                current = src_shard[j]
            else:
                new = not groups or (size > 0 and size + spec.nbytes > max_bytes)
            if new:
                groups.append([])
                size = 0
            if not groups[-1] or groups[-1][-1][0] != j:
                groups[-1].append((j, []))
            groups[-1][-1][1].append(spec.name)
            size += spec.nbytes
    return groups


# -------------------------------------------------------------------------------------------- convert


def convert_item(p: Plan, it: Item, src: Checkpoint, dst_fmt: Format, src_fmt: Format, device: str) -> tuple[dict, dict]:
    """Produce one item's output tensors and its manifest row."""
    if it.src_kind is None:
        return _copy_tensor(p, it, src)
    if it.src_kind == "bf16":  # a plain linear, also inside a quantized checkpoint (e.g. kept by --ignore)
        stored = StoredLinear("bf16", src.get(it.sources[0]), None)
    else:
        stored = src_fmt.decode(it.name, src, it.src_kind, src.config)
    stored.qweight = stored.qweight.to(device)
    stored.scale = None if stored.scale is None else stored.scale.to(device)

    # On a GPU, block-scaled sources dequantize through the Triton kernel: one pass, the same float32 bits.
    use_kernel = stored.qweight.is_cuda
    smooth = p.smoothing if p.smoothing is not None and p.smoothing.touches(it.name) else None
    if it.dst_kind == "bf16":  # kept in source precision: dequantize only
        weight_name = f"{it.name}.weight"
        w = _dequantize(stored, use_kernel)
        w = smooth.apply(it.name, w) if smooth else w
        kept = ref.quantize_weight(w.to(p.out_dtype), BF16, name=weight_name).qweight  # checks NaN/Inf
        tensors, snr, shape = {weight_name: kept.cpu()}, ref.snr_db(w, kept), kept.shape
    else:
        scheme = p.options.scheme
        scale_dtype = dst_fmt.scale_dtype(it.dst_kind, p.out_dtype)
        gptq = p.gptq is not None and it.name in p.gptq
        result = None
        if not smooth and not gptq and fast.supports(stored.kind, stored.block_size, scheme):  # FP8 -> INT8: bit-identical below
            result = fast.requantize(stored.qweight, stored.scale, stored.block_size, scheme, scale_dtype, f"{it.name}.weight")
        if result is None:
            w = _dequantize(stored, use_kernel)
            w = smooth.apply(it.name, w) if smooth else w  # smoothed: the SNR is that of the weight quantized
            if gptq:  # rounded by GPTQ in calibration; the SNR is still against this weight (GPTQ trades it for outputs)
                qw = _gptq_weight(p.gptq, it.name, w.shape, scale_dtype)
            else:
                qw = ref.quantize_weight(w, scheme, scale_dtype=scale_dtype, name=f"{it.name}.weight")
            result = qw, ref.snr_db(w, ref.dequantize_weight(qw).to(w.device))
        qw, snr = result
        out = StoredLinear(it.dst_kind, qw.qweight.cpu(), qw.scale.cpu())
        tensors, shape = dst_fmt.encode(it.name, out, p.out_dtype), out.qweight.shape
    row = {
        "name": it.name,
        "shape": list(shape),
        "dtype_in": it.src_kind if it.src_kind != "bf16" else _dt(src.tensors[it.sources[0]].dtype),
        "dtype_out": it.dst_kind if it.dst_kind != "bf16" else _dt(p.out_dtype),
        "snr_db": None if snr == float("inf") else round(snr, 3),  # None: exact (JSON has no inf)
    }
    return tensors, row


BLOCK_KINDS = ("fp8-block", "int8-block")


def _gptq_weight(gptq: GptqWeights, name: str, shape: tuple[int, int], scale_dtype: torch.dtype) -> ref.QuantizedWeight:
    """GPTQ's result for one linear, checked against what this conversion writes (a stale DST/.ingot fails here)."""
    qw = gptq.get(name)
    expected = ref.scale_shape(qw.scheme, *shape)
    if tuple(qw.shape) != tuple(shape) or qw.scale is None or tuple(qw.scale.shape) != expected or qw.scale.dtype != scale_dtype:
        raise CheckpointError(
            f"{gptq.path}: GPTQ result for {name} is {tuple(qw.shape)} with scale "
            f"{None if qw.scale is None else (qw.scale.dtype, tuple(qw.scale.shape))}; this conversion writes "
            f"{tuple(shape)} with {scale_dtype} scales {expected}")
    return qw


def _dequantize(stored: StoredLinear, use_kernel: bool = False) -> torch.Tensor:
    """A stored linear as a float32 [N, K] weight.

    use_kernel: block kinds go through ``ingot.kernels.dequant.block_dequant`` (CUDA tensors, or triton's interpreter),
    one pass instead of torch's three over float32 temporaries, bit-identical to the reference below (both compute
    ``q.float() * scale`` with one fp32 rounding; tests/kernels/test_dequant.py holds them to it).
    """
    if stored.kind == "bf16":
        return stored.qweight.float()
    if use_kernel and stored.kind in BLOCK_KINDS:
        from ingot.kernels.dequant import block_dequant  # triton: imported only where the GPU path runs

        return block_dequant(stored.qweight.contiguous(), stored.scale.float().contiguous(), tuple(stored.block_size),
                             out_dtype=torch.float32)
    scheme = replace(Scheme.from_name(stored.kind), block_size=tuple(stored.block_size), group_size=stored.group_size)
    return ref.dequantize_weight(ref.QuantizedWeight(scheme, stored.qweight, stored.scale))


def _copy_tensor(p: Plan, it: Item, src: Checkpoint) -> tuple[dict, dict]:
    """A non-linear tensor, copied as is (cast only by the plain fp16/bf16 formats)."""
    t = src.get(it.name)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"{p.src}: tensor {it.name} contains NaN or Inf")
    if p.smoothing is not None and p.smoothing.touches(it.name):  # a norm weight, a bias, the MoE router
        t = p.smoothing.apply(it.name, t)
    t = t.to(it.specs[0].dtype)
    if t.is_floating_point() and not torch.isfinite(t).all():  # bf16 -> fp16 overflows past 65504
        raise CheckpointError(f"{p.src}: tensor {it.name} overflows {_dt(t.dtype)} (its largest magnitude does not fit)")
    row = {"name": it.name, "shape": list(t.shape), "dtype_in": _dt(src.tensors[it.name].dtype), "dtype_out": _dt(t.dtype), "snr_db": None}
    return {it.name: t}, row


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def convert_shard(p: Plan, i: int, progress: Callable[[int], None] | None = None, src: Checkpoint | None = None) -> None:
    """Convert output shard i: write it atomically, its manifest rows first (they mark nothing done alone).

    ``src``: the source, opened once by the caller (a worker process opens its own: headers are read again).
    Its shard handles are closed at the end, so the memory maps of what this shard read do not pile up.
    """
    src = src or Checkpoint(p.src)
    src_fmt, _ = formats.detect(src.config)
    dst_fmt = formats.writer(p.dst_format, p.options.scheme.kind)
    rows = []
    planned = [s for j, names in p.shards[i] for s in p.items[j].specs if s.name in names]
    # Tensor by tensor (same bytes as save_file): each output is on disk before the next linear is made, so a worker
    # holds one linear, not the shard - 1 GB shards: peak RSS 2.26 -> ~1.3 shards, and no fresh pages per output.
    # queue=2: the page-cache copy of one linear overlaps the making of the next (pwrite releases the GIL).
    with ShardWriter(p.dst / p.shard_files[i], [(s.name, s.dtype, s.shape) for s in planned], queue=2) as out:
        for j, names in p.shards[i]:
            it = p.items[j]
            tensors, row = convert_item(p, it, src, dst_fmt, src_fmt, p.options.device)
            want = {s.name: s for s in it.specs}
            for name, t in tensors.items():
                spec = want[name]
                if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:  # planning and encoding must agree
                    raise AssertionError(f"{name}: produced {t.dtype}{tuple(t.shape)}, planned {spec.dtype}{spec.shape}")
                if name in names:
                    out.write(name, t)
            tensors = t = None  # free this linear before the next one is made
            if p.owner[j] == i:
                rows.append(row)
                if progress:
                    progress(it.src_bytes)
        src.close()
        write_json(p.dst / WORK_DIR / f"rows-{i:05d}.json", {"rows": rows})  # before the shard is renamed into place


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _threads_per_worker(options: ConvertOptions) -> int:
    """Torch threads per worker. CPU: one. The FP8 -> INT8 path runs ops on ~2^17-element slabs
    (quant/fast.py), where OpenMP fork/join costs more than it saves: on a 2-vCPU VM under load, 2 threads ran it
    3-10x slower than 1 (the reference path 1.3x slower). Parallelism comes from ``workers`` (a shard each)."""
    if options.device == "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // options.workers)


@contextmanager
def _torch_threads(n: int):
    """Run the in-process conversion with ``n`` torch threads, restoring the caller's setting after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _convert_shard_job(p: Plan, i: int) -> int:
    convert_shard(p, i)
    return p.shard_src_bytes(i)


def convert(src: Path | str, dst: Path | str, options: ConvertOptions, progress: bool = True,
            calibrate: Callable[[Path, SmoothConfig, str], Smoothing] | None = None,
            calibrate_gptq: Callable[..., GptqWeights] | None = None) -> dict:
    """Convert a checkpoint; returns the manifest. Raises CheckpointError / ValueError on bad input.

    calibrate: with ``options.smooth``, measures the smoothing factors of ``src`` (``ingot.calibrate.calibrate``,
    which runs the model and so lives downstream of this package); called once, its result kept in DST/.ingot.
    calibrate_gptq: with ``options.gptq``, ``ingot.calibrate.calibrate_gptq(src, cfg, scheme, targets, smoothing,
    device)``: GPTQ's quantized linears, made once after the smoothing (the Hessians are of the smoothed inputs)
    and kept in DST/.ingot, so a resumed conversion writes the same bytes without calibrating again.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    source = Checkpoint(src)  # headers read once, for the plan and the in-process shard loop
    p = plan(src, dst, options, source)
    job = options.job(src)
    if options.smooth is not None and calibrate is None:
        raise ValueError("convert: options.smooth needs a calibrate function (ingot.calibrate.calibrate)")
    if options.gptq is not None:
        check_scheme(options.scheme)
        if calibrate_gptq is None:
            raise ValueError("convert: options.gptq needs a calibrate_gptq function (ingot.calibrate.calibrate_gptq)")
    if _prepare_dst(dst, job, options.overwrite) == "complete":
        return json.loads((dst / MANIFEST_NAME).read_text())
    if options.smooth is not None:
        p.smoothing = _smoothing(p, calibrate)
    if options.gptq is not None:
        p.gptq = _gptq(p, calibrate_gptq)
    todo = [i for i, f in enumerate(p.shard_files) if not ((dst / f).exists() and (dst / WORK_DIR / f"rows-{i:05d}.json").exists())]

    total = sum(p.shard_src_bytes(i) for i in todo)
    bar = _progress_bar(total, progress)
    threads = _threads_per_worker(options)
    if options.workers <= 1 or len(todo) <= 1:
        with _torch_threads(threads):
            for i in todo:
                convert_shard(p, i, bar.update, source)
    else:
        ctx = get_context("spawn")  # fork after torch threads start is unsafe
        with ProcessPoolExecutor(options.workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
            for done in pool.map(_convert_shard_job, [p] * len(todo), todo):
                bar.update(done)
    bar.close()
    return _finish(p, job, resumed=len(p.shard_files) - len(todo), seconds=time.perf_counter() - t0)


def _smoothing(p: Plan, calibrate: Callable[[Path, SmoothConfig, str], Smoothing]) -> Smoothing:
    """The factors of this conversion: saved ones (a resumed job), else calibrated now and saved. Pairs none of
    whose consumers is quantized here (all kept by --ignore) are dropped: smoothing them buys nothing."""
    path = p.dst / WORK_DIR / SMOOTHING_NAME
    if path.exists():
        smoothing = Smoothing.load(path)
    else:
        smoothing = calibrate(p.src, p.options.smooth, p.options.device)
        smoothing.save(path)
    quantized = {it.name for it in p.quantized()}
    kept = smoothing.only(lambda pair: any(c in quantized for c in pair.consumers))
    dropped = len(smoothing.factors) - len(kept.factors)
    kept.record = {**kept.record, "pairs_dropped_unquantized": dropped}
    return kept


def _gptq(p: Plan, calibrate_gptq: Callable[..., GptqWeights]) -> GptqWeights:
    """GPTQ's linears of this conversion: saved ones (a resumed job), else calibrated now and saved; opened lazily."""
    path = p.dst / WORK_DIR / GPTQ_NAME
    if not path.exists():
        dst_fmt = formats.writer(p.dst_format, p.options.scheme.kind)
        targets = {it.name: dst_fmt.scale_dtype(it.dst_kind, p.out_dtype) for it in p.quantized()}
        calibrate_gptq(p.src, p.options.gptq, p.options.scheme, targets, p.smoothing, p.options.device).save(path)
    return GptqWeights.open(path)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not enabled, smoothing=0.1)


def _prepare_dst(dst: Path, job: dict, overwrite: bool) -> str:
    """'complete', 'resume' or 'new'; refuses a DST that holds another conversion unless ``overwrite``."""
    work = dst / WORK_DIR
    if dst.exists() and any(dst.iterdir()):
        manifest = dst / MANIFEST_NAME
        done_job = read_json(manifest, "manifest").get("job") if manifest.exists() else None
        running_job = read_json(work / "job.json", "job record") if (work / "job.json").exists() else None
        if not overwrite:
            if done_job == job and (dst / CONFIG_NAME).exists():
                shutil.rmtree(work, ignore_errors=True)  # killed between config.json and clean-up
                return "complete"
            if running_job == job:
                # A kill mid-write leaves torn temp files: ours (<shard>.tmp) and safetensors' own
                # (it writes through a .tmpXXXXXX file and renames). Nothing else in DST is ours to touch.
                for f in [*dst.iterdir(), *work.iterdir()]:
                    if f.is_file() and (f.name.endswith(".tmp") or f.name.startswith(".tmp")):
                        f.unlink()
                return "resume"
            what = "a different conversion" if (done_job or running_job) else "other files"
            raise CheckpointError(f"{dst}: holds {what}; choose another DST or pass --overwrite")
        if not (done_job or running_job or (dst / CONFIG_NAME).exists()):
            raise CheckpointError(f"{dst}: not a model directory; refusing to delete it for --overwrite")
        shutil.rmtree(dst)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "job.json", job)
    return "new"


def _finish(p: Plan, job: dict, resumed: int, seconds: float) -> dict:
    dst = p.dst
    rows = []
    for i in range(len(p.shard_files)):
        rows += read_json(dst / WORK_DIR / f"rows-{i:05d}.json", "shard rows")["rows"]
    weight_map = {name: p.shard_files[i] for i, sh in enumerate(p.shards) for _, names in sh for name in names}
    total_size = sum(s.nbytes for it in p.items for s in it.specs)
    if len(p.shard_files) > 1:
        write_json(dst / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    for f in sorted(p.src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not SKIP_COPY.search(f.name) and f.name not in (CONFIG_NAME, INDEX_NAME):
            shutil.copyfile(f, dst / f.name)

    linears = [r for r in rows if r["snr_db"] is not None]
    usage = max(_peak_rss_self(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # workers: their max
    manifest = {
        "ingot_version": _version(),
        "job": job,
        "source": {"path": str(p.src.resolve()), "format": p.src_format, "scheme": p.src_kind},
        "scheme": p.options.scheme.name,
        "format": p.dst_format,
        "kept_unquantized": p.kept,
        "smoothing": p.smoothing.summary() if p.smoothing is not None else None,
        "gptq": p.gptq.summary() if p.gptq is not None else None,
        "warnings": p.caveats,
        "tensors": rows,
        "totals": {
            "params": sum(numel(r["shape"]) for r in rows),
            "tensors": len(rows),
            "bytes_in": sum(it.src_bytes for it in p.items),
            "bytes_out": total_size,
            "shards": len(p.shard_files),
            "shards_resumed": resumed,
            "seconds": round(seconds, 3),
            "peak_rss_bytes": usage,  # the largest of this process and each of its workers (not their sum)
            "snr_db_min": min((r["snr_db"] for r in linears), default=None),
            "snr_db_mean": round(sum(r["snr_db"] for r in linears) / len(linears), 3) if linears else None,
        },
    }
    write_json(dst / MANIFEST_NAME, manifest)

    config = {k: v for k, v in p.config.items() if k not in ("quantization_config", "compression_config")}
    scheme = p.options.scheme
    qcfg = None
    if scheme.is_quantized:
        qcfg = formats.writer(p.dst_format, scheme.kind).quantization_config(scheme.kind, p.kept, scheme.scale_fmt)
    if qcfg is not None:
        config["quantization_config"] = qcfg
    if p.out_dtype in (torch.float16, torch.bfloat16):
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = _dt(p.out_dtype)
    write_json(dst / CONFIG_NAME, config)  # last: only now does DST look like a finished checkpoint
    shutil.rmtree(dst / WORK_DIR, ignore_errors=True)
    return manifest


def _peak_rss_self() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own memory since exec.

    Not ru_maxrss: Linux carries it across exec from the parent's memory at fork/vfork time, so an ingot started
    from a large process (a notebook holding a model, a benchmark that just built a checkpoint) reported the
    parent's peak (measured: 1.86 GB reported for a 1.33 GB conversion).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ingot")
    except PackageNotFoundError:
        return "unknown"
