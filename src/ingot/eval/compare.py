"""``compare(model, options)``: convert one model to each scheme, evaluate each, and write the report.

Conversions go to ``workdir/<scheme>`` through ``ingot.quant.convert.convert``, which returns the existing
manifest at once when a directory already holds the same finished conversion (so a second compare re-evaluates
without re-converting). Every scheme is evaluated with the same options against one reference model - the
source checkpoint - loaded once and shared. Each evaluation's JSON is written as ``out_dir/eval-<scheme>.json``
(per-item predictions included), then ``compare.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ingot.eval import report
from ingot.eval.data import DataDir
from ingot.eval.runner import (
    EvalOptions,
    IngotModel,
    check_data,
    default_reference,
    evaluate,
    read_config,
    run_info,
    write_results,
)

ALL_SCHEMES = ("bf16", "fp8-block", "int8-block", "int8-channel", "int8-weight", "int4-group")


@dataclass(frozen=True)
class CompareOptions:
    schemes: tuple[str, ...] = ALL_SCHEMES
    workdir: Path = Path("out/compare")  # conversions: workdir/<scheme>
    out_dir: Path | None = None  # report and JSON; None: workdir
    convert_device: str = "cpu"
    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        from ingot.quant.schemes import PRESETS

        if not self.schemes:
            raise ValueError("no schemes to compare")
        for s in self.schemes:
            if s not in PRESETS:
                raise ValueError(f"unknown scheme {s!r}; expected one of: {', '.join(PRESETS)}")
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes listed twice: {list(self.schemes)}")


def compare(model_path: Path | str, options: CompareOptions, data: DataDir,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Returns {"rows": [table rows], "report": path of report.md, "plot": path of report.png or None, ...}."""
    from ingot.quant.convert import ConvertOptions, convert
    from ingot.quant.schemes import Scheme

    model_path = Path(model_path)
    check_data(data, options.eval.tasks)
    read_config(model_path)
    out_dir = Path(options.out_dir or options.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = options.eval
    ref_path = None
    ref_model = None
    if "kl" in ev.tasks:
        ref_path = default_reference(model_path) or model_path
        ref_model = IngotModel(ref_path, ev.device, ev.dtype, ev.fp8_fallback)

    rows, evals = [], {}
    baseline_ppl = None
    try:
        for name in options.schemes:
            dst = Path(options.workdir) / name
            log(f"compare: {name}: converting to {dst}")
            convert_options = ConvertOptions(scheme=Scheme.from_name(name), device=options.convert_device)
            manifest = convert(model_path, dst, convert_options, progress=False)
            log(f"compare: {name}: evaluating {', '.join(ev.tasks)}")
            results = evaluate(dst, ev, data, ref=ref_path, ref_model=ref_model, out=out_dir / f"eval-{name}.json")
            row = report.make_row(name, manifest, results, baseline_ppl)
            if name == "bf16" and row.get("ppl") is not None:
                baseline_ppl = row["ppl"]
                row["dppl_pct"] = 0.0 if baseline_ppl else None  # itself; later rows are measured against it
            rows.append(row)
            evals[name] = str(out_dir / f"eval-{name}.json")
            log(report.format_table([row]).splitlines()[-1])
    finally:
        if ref_model is not None:
            ref_model.release()
    if baseline_ppl is not None:  # rows evaluated before bf16 (an unusual order) are re-based on it too
        for r in rows:
            if r.get("ppl") is not None:
                r["dppl_pct"] = 100.0 * (r["ppl"] / baseline_ppl - 1.0)

    info = run_info(ev.device, ev.git_sha)
    dev = info["device"]
    meta = {
        "model": str(model_path),
        "ref": str(ref_path) if ref_path else None,
        "config": asdict(ev),
        "data": dict(sorted(data.hashes.items())),
        "device_name": (dev["gpus"][0]["name"] if dev["gpus"]
                        else f"CPU {dev['cpu']['model']} ({dev['cpu']['cores_usable']} cores)"),
        "git_sha": (info["git"]["sha"] or "unknown")[:12] + (" (dirty)" if info["git"]["dirty"] else ""),
        "timestamp": info["timestamp"],
        "notes": _notes(options, ev) + [
            f"{r['scheme']}: non-finite log-probabilities in windows {r['nonfinite_windows']} (a numerics bug in the "
            "model): its ppl and KL are left empty" for r in rows if r.get("nonfinite_windows")],
    }
    md = out_dir / "report.md"
    md_tmp = md.with_name(md.name + ".tmp")
    md_tmp.write_text(report.format_report(rows, meta))
    md_tmp.replace(md)
    png = out_dir / "report.png"
    plotted = report.plot(rows, png)
    summary = {"kind": "ingot-compare", "model": str(model_path), "schemes": list(options.schemes),
               "workdir": str(options.workdir), "rows": rows, "evals": evals, "report": str(md),
               "plot": str(png) if plotted else None, "config": {**asdict(options), "eval": asdict(ev)}, **info}
    write_results(out_dir / "compare.json", _paths_to_str(summary))
    return summary


def _notes(options: CompareOptions, ev: EvalOptions) -> list[str]:
    notes = []
    if "fp8-block" in options.schemes and not _fp8_native(ev.device):
        notes.append(f"fp8-block ran on {ev.device}, which has no FP8 matmul (needs CUDA sm89+): its linears ran "
                     f"as the {ev.fp8_fallback!r} fallback (re-quantized at load), so that row measures the fallback.")
    return notes


def _fp8_native(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        import torch

        from ingot.kernels.fp8_gemm import fp8_supported

        return fp8_supported(torch.device(device))
    except ImportError:
        return False


def _paths_to_str(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {k: _paths_to_str(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_paths_to_str(v) for v in x]
    return x
