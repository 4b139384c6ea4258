"""The one CLI: ``ingot pull|convert|inspect|bench|tune|generate|chat|eval|compare``. Flags map onto dataclass
fields; this is the only place that reads argv or the environment (INGOT_CACHE_DIR, XDG_CACHE_HOME, INGOT_DATA_DIR)."""

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
    smooth, calibrate, gptq, calibrate_gptq = None, None, None, None
    data = args.data_dir or os.environ.get("INGOT_DATA_DIR")
    calib_path = Path(data) / "gsm8k" / "train.jsonl" if data else None
    if args.smooth is not None:
        from ingot.calibrate import calibrate
        from ingot.quant.smooth import SmoothConfig

        smooth = SmoothConfig(
            alpha=args.smooth, calib_path=calib_path,
            samples=args.calib_samples, seq_len=args.calib_seq_len, seed=args.calib_seed,
            pairs=tuple(p.strip() for p in args.smooth_pairs.split(",") if p.strip()),
        )
        if not scheme.is_quantized or scheme.activation == "none":
            print(f"ingot: warning: --smooth with {scheme.name}: only W8A8 / FP8 schemes quantize activations; "
                  "smoothing only moves their outliers into the weights", file=sys.stderr)
    if args.gptq:
        from functools import partial

        from ingot.calibrate import calibrate_gptq
        from ingot.quant.gptq import GptqConfig, check_scheme

        check_scheme(scheme)  # bf16: a clear error before anything is read
        gptq = GptqConfig(damp=args.gptq_damp, block=args.gptq_block, act_order=args.gptq_act_order,
                          scales=args.gptq_scales, sequential=args.gptq_sequential, calib_path=calib_path,
                          samples=args.calib_samples, seq_len=args.calib_seq_len, seed=args.calib_seed)
        if not args.quiet:
            calibrate_gptq = partial(calibrate_gptq, log=lambda line: print(line, file=sys.stderr, flush=True))
    options = ConvertOptions(
        scheme=scheme,
        format=args.format,
        ignore=tuple(args.ignore),
        quantize_mtp=args.quantize_mtp,
        device=args.device,
        workers=args.workers,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
        smooth=smooth,
        gptq=gptq,
    )
    for pattern in options.ignore:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--ignore {pattern!r}: not a regular expression ({e})") from None
    src = _resolve_model(args.src, _cache_dir(args.cache_dir))
    if smooth is not None or gptq is not None:
        from ingot.calibrate import calibration_rows

        calibration_rows(smooth or gptq)  # a missing calibration file fails now, before any planning or loading
    manifest = convert(src, Path(args.dst), options, progress=not args.quiet, calibrate=calibrate,
                       calibrate_gptq=calibrate_gptq)
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
        settle_ms=args.settle_ms,
    )
    run_bench_kernels(options)
    return 0


# Which GEMM kernels serve a stored kind (fp8-block also falls back to int8-block on GPUs without FP8).
TUNE_OPS_OF_KIND = {
    "int8-channel": ("int8_gemm_channel",),
    "int8-block": ("int8_gemm_block",),
    "fp8-block": ("fp8_gemm_block", "int8_gemm_block"),
    "int8-weight": ("w8a16_gemm",),
    "int4-group": ("w4a16_gemm",),
}


def _model_linear_shapes(path: Path) -> tuple[list[tuple[int, int]], list[str]]:
    """The distinct (N, K) of a checkpoint's linears (from shard headers only) and the kernels its kinds use."""
    from ingot.formats import Checkpoint, detect, find_linears, linear_shape
    from ingot.formats.safetensors_io import read_json

    ckpt = Checkpoint(path)
    fmt, kind = detect(read_json(path / "config.json", "config.json"))
    linears, _ = find_linears(ckpt, fmt, kind)
    shapes = sorted({linear_shape(ckpt, prefix) for prefix in linears})
    kinds = set(linears.values())
    ops = sorted({op for kd in kinds for op in TUNE_OPS_OF_KIND.get(kd, ())})
    return shapes, ops


def cmd_tune(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("tune: needs a CUDA device (torch.cuda.is_available() is False)")
    from ingot.bench.kernels import SHAPES
    from ingot.kernels.tuning import CONFIG_DIR, TUNABLE_OPS, TuneOptions, tune

    shapes: list[tuple[int, int]] = list(args.shape)
    ops: list[str] = list(args.ops or [])
    if args.model:
        model_shapes, model_ops = _model_linear_shapes(_resolve_model(args.model, _cache_dir(args.cache_dir)))
        shapes += model_shapes
        ops = ops or model_ops or list(TUNABLE_OPS)  # a bf16 model: tune every kernel for its shapes
    if args.shapes:
        shapes += SHAPES[args.shapes]
    if not shapes:
        raise ValueError("tune: give a MODEL directory, --shapes PRESET or --shape NxK")
    options = TuneOptions(
        ops=tuple(ops or TUNABLE_OPS),
        shapes=tuple(dict.fromkeys(shapes)),
        m_sizes=tuple(args.m),
        rep_ms=args.rep_ms,
        out_dir=Path(args.out_dir) if args.out_dir else CONFIG_DIR,
        git_sha=args.git_sha,
    )
    for path in tune(options, log=lambda line: print(line, flush=True)):
        print(path)
    return 0


def _data_dir(arg: str | None):
    """--data-dir, else $INGOT_DATA_DIR; DataDir raises a clear error when neither is set or it is missing."""
    from ingot.eval.data import DataDir

    env = os.environ.get("INGOT_DATA_DIR")
    return DataDir(Path(arg) if arg else (Path(env) if env else None))


def _limits(text: str) -> tuple[int | None, dict[str, int]]:
    """'100' -> (100, {}); '64,gsm8k=8' -> (64, {'gsm8k': 8}); 'mmlu=50' -> (None, {'mmlu': 50})."""
    limit, per_task = None, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, _, n = part.rpartition("=")
        if not n.isdigit() or int(n) <= 0:
            raise argparse.ArgumentTypeError(
                f"--limit {text!r}: expected N or TASK=N (positive integers), got {part!r}")
        if task:
            per_task[task] = int(n)
        else:
            limit = int(n)
    return limit, per_task


def _eval_options(args):
    from ingot.eval import EvalOptions

    limit, per_task = args.limit or (None, {})
    return EvalOptions(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        limit=limit,
        task_limits=per_task,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        n_ctx=args.n_ctx,
        stride=args.stride,
        batch_tokens=args.batch_tokens,
        fp8_fallback=args.fp8_fallback,
        git_sha=args.git_sha,
    )


def cmd_eval(args) -> int:
    from ingot.eval import evaluate, format_summary

    options = _eval_options(args)
    data = _data_dir(args.data_dir)
    model = _resolve_model(args.model, _cache_dir(args.cache_dir))
    out = Path(args.out) if args.out else Path("out") / "eval" / f"{model.name}.json"
    ref = _resolve_model(args.ref, _cache_dir(args.cache_dir)) if args.ref else None
    results = evaluate(model, options, data, ref=ref, out=out)
    print(format_summary(results))
    print(out)
    return 0


def cmd_compare(args) -> int:
    from ingot.eval import CompareOptions, compare
    from ingot.eval.report import format_table

    options = CompareOptions(
        schemes=tuple(s.strip() for s in args.schemes.split(",") if s.strip()),
        workdir=Path(args.workdir),
        out_dir=Path(args.out_dir) if args.out_dir else None,
        convert_device=args.convert_device,
        eval=_eval_options(args),
    )
    data = _data_dir(args.data_dir)
    model = _resolve_model(args.model, _cache_dir(args.cache_dir))
    summary = compare(model, options, data, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(summary["rows"]))
    print(summary["report"])
    return 0


def _engine(args):
    """An LLM from the engine flags (``_add_engine_flags``); MODEL defaults to the embedded model."""
    import torch

    from ingot.engine import LLM

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return LLM(
        _resolve_model(args.model, _cache_dir(args.cache_dir)),
        device=args.device,
        dtype=dtypes[args.dtype] if args.dtype else None,
        mem_fraction=args.mem_fraction,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        cuda_graphs=not args.eager,
        prefill_graph_tokens=args.prefill_graphs,
        weight_prefetch_mb=args.weight_prefetch_mb,
        async_steps=not args.no_overlap,
        fp8_fallback=args.fp8_fallback,
    )


def _sampling(args):
    from ingot.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_generate(args) -> int:
    llm, params = _engine(args), _sampling(args)
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in args.prompt] if args.chat else args.prompt
    if len(prompts) == 1:  # one prompt: stream it
        for delta in llm.stream(prompts, params):
            print(delta.text, end="", flush=True)
        print()
        return 0
    for i, out in enumerate(llm.generate(prompts, params)):
        print(f"--- [{i}] {out.finish_reason}, {len(out.token_ids)} tokens\n{out.text}")
    return 0


def cmd_chat(args) -> int:
    from ingot.engine.chat import chat_loop

    llm, params = _engine(args), _sampling(args)
    chat_loop(llm, params, input, lambda text: print(text, end="", flush=True), system=args.system)
    return 0


def _add_engine_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("model", nargs="?", help=f"model directory (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--device", help="cuda[:N] or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="model dtype (default: the checkpoint's)")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="GPU memory share for weights + KV cache")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens per sequence")
    p.add_argument("--max-num-seqs", type=int, help="sequences per batch")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (decode, and the prefill graphs below)")
    p.add_argument("--prefill-graphs", type=int, default=None, metavar="TOKENS",
                   help="CUDA graphs for a lone prompt of up to TOKENS tokens (its TTFT); 0: off "
                        "(default: 512 on CUDA)")
    p.add_argument("--weight-prefetch-mb", type=int, default=None, metavar="MB",
                   help="decode graphs of up to 16 rows pull the next int8 W8A8 linear's first MB of weight into L2 "
                        "while the kernels before it run (sm_90+); 0: off (default: 16)")
    p.add_argument("--no-overlap", action="store_true",
                   help="read each step's tokens before queueing the next (default: overlap host and GPU work)")
    p.add_argument("--fp8-fallback", default="int8-block", choices=["int8-block", "bf16"],
                   help="what fp8-block linears run as where FP8 matmuls are missing (CPU, GPUs before sm89)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens whatever the model says")


def cmd_bench_e2e(args) -> int:
    from ingot.bench.e2e import BenchE2EOptions, run_bench_e2e

    options = BenchE2EOptions(
        model=args.random_weights,
        layers=args.layers,
        schemes=tuple(args.schemes),
        batch_sizes=tuple(args.batch_sizes),
        input_len=args.input_len,
        output_len=args.output_len,
        device=args.device,
        hf_peer=not args.no_hf,
        hf_compile=not args.hf_no_compile,
        cuda_graphs=not args.eager,
        async_steps=not args.no_overlap,
        out=Path(args.out) if args.out else None,
        command=" ".join(["ingot", *sys.argv[1:]]),
        git_sha=args.git_sha,
        repeats=args.repeats,
        prefill_graph_tokens=args.prefill_graphs,
        weight_prefetch_mb=args.weight_prefetch_mb,
    )
    run_bench_e2e(options)
    return 0


def _add_eval_flags(p: argparse.ArgumentParser, tasks_default: str | None) -> None:
    p.add_argument("--tasks", required=tasks_default is None, default=tasks_default,
                   help="comma-separated: ppl, kl, mmlu, gsm8k")
    p.add_argument("--limit", type=_limits, metavar="N|TASK=N,...",
                   help="evaluate a fixed seeded subset: N windows (ppl, kl) or questions (mmlu, gsm8k); "
                        "TASK=N for one task (e.g. 64,gsm8k=8)")
    p.add_argument("--seed", type=int, default=0, help="which subset --limit picks")
    p.add_argument("--data-dir", help="evaluation data (default: $INGOT_DATA_DIR)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--n-ctx", type=int, default=512, help="perplexity/KL window (second half scored)")
    p.add_argument("--stride", type=int, help="window step (default: --n-ctx, as llama.cpp)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward while scoring")
    p.add_argument("--fp8-fallback", default="int8-block", choices=["int8-block", "bf16"],
                   help="what fp8-block linears run as where FP8 matmuls are missing (CPU, GPUs before sm89)")
    p.add_argument("--git-sha", help="record this sha (a copied tree without .git); default: the checkout's")


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
    p.add_argument("--smooth", type=float, nargs="?", const=0.5, metavar="ALPHA",
                   help="SmoothQuant: fold per-channel factors max|X|^a / max|W|^(1-a) from calibration into the "
                        "norms / up_proj / v_proj before quantizing (ALPHA default 0.5)")
    p.add_argument("--smooth-pairs", default="norm,up-down",
                   help="sites to smooth: norm (norms -> q/k/v, gate/up), up-down (up_proj -> down_proj), v-o "
                        "(v_proj -> o_proj, shared across a GQA group; off by default: no gain measured)")
    p.add_argument("--gptq", action="store_true",
                   help="GPTQ: round each quantized linear column by column, pushing its error onto the columns not "
                        "yet rounded through the inverse Hessian of its calibration inputs (after --smooth if given)")
    p.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    p.add_argument("--gptq-block", type=int, default=128, help="GPTQ lazy-update block (columns)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="GPTQ: columns in descending Hessian diagonal (static scales; the stored layout is unchanged)")
    p.add_argument("--gptq-scales", choices=["static", "dynamic"], default="static",
                   help="static: every scale from the original weights (llm-compressor); dynamic: each group's / "
                        "block's from the error-updated weights when GPTQ reaches it (the GPTQ paper)")
    p.add_argument("--gptq-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="each decoder layer's Hessians from the outputs of the layers before it already quantized "
                        "(default); --no-gptq-sequential: all from the original model in one pass")
    p.add_argument("--calib-samples", type=int, default=128, help="GSM8K train rows drawn for calibration")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--calib-seed", type=int, default=0, help="which calibration rows are drawn")
    p.add_argument("--data-dir", help="calibration text DIR/gsm8k/train.jsonl (default: $INGOT_DATA_DIR)")
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
    b.add_argument("--settle-ms", type=int, default=500,
                   help="idle ms before each GEMM timing at M >= 256, so every op starts from the same power state")
    b.add_argument("--out", help="results JSON (default: benchmarks/results/kernels-<device>-<date>.json)")
    b.add_argument("--git-sha", help="record this sha (a copied tree without .git); default: the checkout's")
    b.set_defaults(func=cmd_bench_kernels)

    b = bench.add_parser("e2e", help="engine tokens/s, TTFT, TPOT, memory per scheme vs BF16 and transformers (random weights)")
    b.add_argument("--random-weights", default="llama3-8b", metavar="PRESET|CONFIG",
                   help="llama3-8b, deepseek-v3, or a config.json path: real shapes, random weights built on the device")
    b.add_argument("--layers", type=int, help="keep the first N decoder layers (DeepSeek-V3: e.g. 4 = 3 dense + 1 MoE)")
    b.add_argument("--schemes", nargs="+", default=["bf16", "int8-channel", "int8-block", "fp8-block"])
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    b.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    b.add_argument("--output-len", type=int, default=128, help="generated tokens per request (eos ignored)")
    b.add_argument("--device", default="cuda")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers generate peer")
    b.add_argument("--hf-no-compile", action="store_true",
                   help="run the transformers peer without its static-cache torch.compile (default: compiled, "
                        "compile time excluded by identical warm-up calls)")
    b.add_argument("--repeats", type=int, default=3,
                   help="timed runs per batch size after the warm-up run; the median run is reported")
    b.add_argument("--prefill-graphs", type=int, default=None, metavar="TOKENS",
                   help="CUDA graphs for lone prompts of up to TOKENS tokens (the batch-1 TTFT); 0: off "
                        "(default: the engine's, 512 on CUDA)")
    b.add_argument("--weight-prefetch-mb", type=int, default=None, metavar="MB",
                   help="decode graphs of up to 16 rows pull the next int8 W8A8 linear's first MB of weight into L2 "
                        "while the kernels before it run (sm_90+); 0: off (default: 16)")
    b.add_argument("--eager", action="store_true", help="no CUDA graphs (decode, and prefill graphs)")
    b.add_argument("--no-overlap", action="store_true",
                   help="read each step's tokens before queueing the next (the engine's default overlaps them)")
    b.add_argument("--out", help="results JSON (default: benchmarks/results/e2e-<device>-<date>.json)")
    b.add_argument("--git-sha", help="record this sha (a copied tree without .git); default: the checkout's")
    b.set_defaults(func=cmd_bench_e2e)

    p = sub.add_parser("tune", help="sweep GEMM tile configs on this GPU; write tables the kernels read (CUDA)")
    p.add_argument("model", nargs="?", help="a checkpoint: tune its linears' shapes for the kernels its scheme uses")
    p.add_argument("--shapes", choices=["llama3-8b", "deepseek-v3", "all"], help="(N, K) preset (as bench kernels)")
    p.add_argument("--shape", type=_nk, action="append", default=[], metavar="NxK", help="an N x K (repeatable)")
    p.add_argument("--ops", nargs="+", choices=["int8_gemm_channel", "int8_gemm_block", "fp8_gemm_block", "w8a16_gemm",
                                                 "w4a16_gemm"],
                   help="kernels to tune (default: the model's, else all)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 128, 256, 1024, 4096], help="token counts")
    p.add_argument("--rep-ms", type=int, default=10, help="ms of timed calls per candidate")
    p.add_argument("--out-dir", help="where tables go (default: the package's ingot/kernels/configs)")
    p.add_argument("--git-sha", help="record this sha in the tables (a copied tree without .git)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="perplexity, KL vs a reference, MMLU, GSM8K of one model -> JSON")
    p.add_argument("model", help=f"model directory (or an embedded model's name, e.g. {DEFAULT_MODEL})")
    _add_eval_flags(p, tasks_default=None)
    p.add_argument("--ref", help="kl reference model (default: the source named in ingot_manifest.json, "
                                 "or MODEL itself if unquantized)")
    p.add_argument("--out", help="results JSON (default: out/eval/<model>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="convert a model to each scheme, evaluate each, write report.md and report.png")
    p.add_argument("model", help=f"source model directory (or an embedded model's name, e.g. {DEFAULT_MODEL})")
    p.add_argument("--schemes", default="bf16,fp8-block,int8-block,int8-channel,int8-weight,int4-group",
                   help="comma-separated scheme presets")
    _add_eval_flags(p, tasks_default="ppl,kl")
    p.add_argument("--workdir", default="out/compare", help="conversions go to WORKDIR/<scheme> (reused when complete)")
    p.add_argument("--out-dir", help="report.md, report.png and the JSON results (default: --workdir)")
    p.add_argument("--convert-device", default="cpu", help="device of the conversions")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="generate text for one or more prompts (streams a single prompt)")
    _add_engine_flags(p, max_tokens=128)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: generated as one batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat, streaming replies (/reset, /exit)")
    _add_engine_flags(p, max_tokens=512)
    p.add_argument("--system", help="a system message that starts every conversation")
    p.set_defaults(func=cmd_chat)
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
