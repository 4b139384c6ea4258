"""The one CLI: ``ingot pull|convert|inspect|bench``. Flags map onto dataclass fields; this is the only place
that reads argv or the environment (INGOT_CACHE_DIR, XDG_CACHE_HOME)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ingot.formats.gguf_import import DEFAULT_MODEL, EMBEDDED_MODELS


def _cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("INGOT_CACHE_DIR"):
        return Path(os.environ["INGOT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ingot"


def _resolve_model(name_or_path: str | None, cache_dir: Path) -> Path:
    """A path as is; an embedded model's name (or nothing) is pulled into the cache first."""
    name_or_path = name_or_path or DEFAULT_MODEL
    if name_or_path in EMBEDDED_MODELS and not Path(name_or_path).exists():
        from ingot.formats.gguf_import import pull

        return pull(name_or_path, cache_dir)
    return Path(name_or_path)


def _size(text: str) -> int:
    """'5GB', '500MB', '4GiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 4GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def cmd_pull(args) -> int:
    from ingot.formats.gguf_import import pull

    print(pull(args.name, _cache_dir(args.cache_dir)))
    return 0


def cmd_convert(args) -> int:
    from ingot.quant.convert import ConvertOptions, convert
    from ingot.quant.schemes import Scheme

    scheme = Scheme.from_name(args.scheme)
    if args.scale_fmt:
        scheme = scheme.with_scale_fmt(args.scale_fmt)
    options = ConvertOptions(
        scheme=scheme,
        format=args.format,
        ignore=tuple(args.ignore),
        quantize_mtp=args.quantize_mtp,
        device=args.device,
        workers=args.workers,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
    )
    for pattern in options.ignore:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--ignore {pattern!r}: not a regular expression ({e})") from None
    src = _resolve_model(args.src, _cache_dir(args.cache_dir))
    manifest = convert(src, Path(args.dst), options, progress=not args.quiet)
    t = manifest["totals"]
    for warning in manifest.get("warnings", []):
        print(f"ingot: warning: {warning}", file=sys.stderr)
    print(
        f"{args.dst}: {manifest['scheme']} as {manifest['format']}, {t['tensors']} tensors, "
        f"{t['bytes_in'] / 1e6:.1f} MB -> {t['bytes_out'] / 1e6:.1f} MB in {t['seconds']:.1f}s, "
        f"weight SNR mean {t['snr_db_mean']} dB (min {t['snr_db_min']})"
    )
    return 0


def cmd_inspect(args) -> int:
    from ingot.quant.inspect import format_table, inspect_checkpoint

    paths = args.paths or [None]
    rows = [inspect_checkpoint(_resolve_model(p, _cache_dir(args.cache_dir))) for p in paths]
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2) if args.json else format_table(rows))
    return 0


def cmd_bench_convert(args) -> int:
    from ingot.bench.convert import BenchConvertOptions, run_bench_convert

    options = BenchConvertOptions(
        workdir=Path(args.workdir),
        size_bytes=args.size,
        shard_bytes=args.shard_size,
        workers=tuple(args.workers),
        devices=tuple(args.devices),
        schemes=tuple(args.schemes),
        out=Path(args.out) if args.out else None,
        command=" ".join(["ingot", *sys.argv[1:]]),
        git_sha=args.git_sha,
    )
    run_bench_convert(options)
    return 0


def _nk(text: str) -> tuple[int, int]:
    """'4096x14336' -> (4096, 14336): a linear's N x K."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not an N x K shape: {text!r} (e.g. 4096x14336)")
    return int(m.group(1)), int(m.group(2))


def cmd_bench_kernels(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench kernels: needs a CUDA device (torch.cuda.is_available() is False)")
    from ingot.bench.kernels import BenchKernelsOptions, run_bench_kernels

    options = BenchKernelsOptions(
        shapes=args.shapes,
        custom_shapes=tuple(args.shape),
        m_sizes=tuple(args.m),
        out=Path(args.out) if args.out else None,
        command=" ".join(["ingot", *sys.argv[1:]]),
        git_sha=args.git_sha,
        rep_ms=args.rep_ms,
    )
    run_bench_kernels(options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ingot.formats import FORMAT_NAMES
    from ingot.quant.schemes import PRESETS

    parser = argparse.ArgumentParser(prog="ingot", description="Cast LLM checkpoints into low-precision ingots.")
    parser.add_argument("--cache-dir", help="where pulled models live (default: $INGOT_CACHE_DIR or ~/.cache/ingot)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="write an embedded model as an HF BF16 directory in the cache; prints its path")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert a checkpoint to a scheme and format, streaming shard by shard")
    p.add_argument("src", help=f"source model directory (or an embedded model name, e.g. {DEFAULT_MODEL})")
    p.add_argument("dst", help="output directory")
    p.add_argument("--scheme", required=True, choices=sorted(PRESETS))
    p.add_argument("--format", choices=FORMAT_NAMES, help="output format (default: the scheme's own)")
    p.add_argument("--scale-fmt", choices=["float", "ue8m0"], help="fp8 scale format (ue8m0: powers of two)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="keep linears whose module name matches in source precision (repeatable)")
    p.add_argument("--quantize-mtp", action="store_true", help="also quantize DeepSeek MTP layers")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel processes")
    p.add_argument("--max-shard-size", type=_size, help="re-shard the output (e.g. 5GB); default: one per source shard")
    p.add_argument("--overwrite", action="store_true", help="replace a DST that holds a different conversion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="format, parameters, tensors, disk size and GPU memory at each precision")
    p.add_argument("paths", nargs="*", help=f"model directories or index files (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks that write JSON")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("convert", help="FP8 -> INT8 conversion throughput and peak RSS on a synthetic DeepSeek-V3")
    b.add_argument("--workdir", default="/tmp/ingot-bench-convert", help="where the synthetic checkpoint is built")
    b.add_argument("--size", type=_size, default=_size("4GB"), help="synthetic checkpoint size")
    b.add_argument("--shard-size", type=_size, default=_size("1GB"))
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--devices", nargs="+", default=["cpu"])
    b.add_argument("--schemes", nargs="+", default=["int8-block", "int8-channel"])
    b.add_argument("--out", help="results JSON (default: benchmarks/results/convert-<device>-<date>.json)")
    b.add_argument("--git-sha", help="record this sha (a copied tree without .git); default: the checkout's")
    b.set_defaults(func=cmd_bench_convert)

    b = bench.add_parser("kernels", help="ingot's int8 GEMMs and activation quantizers vs cuBLAS BF16/int8/FP8 (CUDA)")
    b.add_argument("--shapes", default="all", choices=["llama3-8b", "deepseek-v3", "all"], help="(N, K) preset")
    b.add_argument("--shape", type=_nk, action="append", default=[], metavar="NxK",
                   help="a custom N x K (repeatable); replaces the preset")
    b.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 128, 256, 1024, 4096], help="token counts")
    b.add_argument("--rep-ms", type=int, default=10, help="ms of unrolled calls per CUDA graph (10 replays each)")
    b.add_argument("--out", help="results JSON (default: benchmarks/results/kernels-<device>-<date>.json)")
    b.add_argument("--git-sha", help="record this sha (a copied tree without .git); default: the checkout's")
    b.set_defaults(func=cmd_bench_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ingot.formats.safetensors_io import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"ingot: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ingot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
