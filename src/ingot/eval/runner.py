"""``evaluate(model_path, options)``: run the chosen tasks on one ingot model and record everything needed to
trust and compare the numbers (config, data hashes, git sha, device, timing, per-item predictions).

Tasks: ``ppl`` (WikiText-2 perplexity), ``kl`` (KL divergence and top-1 agreement against a reference model),
``mmlu`` (5-shot, letter log-probabilities), ``gsm8k`` (8-shot CoT, greedy, through ``ingot.engine.LLM``).
Scoring tasks run first on ``model.score``; the model is released before the engine is built for gsm8k (on a
GPU the engine sizes its KV cache from the memory left free).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ingot.eval import gsm8k as gsm8k_task
from ingot.eval import mmlu as mmlu_task
from ingot.eval.data import GSM8K, MMLU, WIKITEXT_TEST, DataDir, seeded_subset
from ingot.eval.kl import kl_divergence
from ingot.eval.perplexity import Score, WindowConfig, make_windows, perplexity

TASKS = ("ppl", "kl", "mmlu", "gsm8k")
MANIFEST_NAME = "ingot_manifest.json"  # written by ingot.quant.convert beside every converted model
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...] = ("ppl",)
    limit: int | None = None  # per task: windows (ppl, kl) or questions (mmlu, gsm8k); None: all
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task overrides of ``limit``
    seed: int = 0  # which subset --limit picks
    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's
    n_ctx: int = 512
    stride: int | None = None  # None: n_ctx (llama.cpp)
    batch_tokens: int = 4096  # tokens per score() call: logits are [B, T, vocab] float32 (805 MB at 4096 x 49152)
    mmlu_shots: int = mmlu_task.DEFAULT_SHOTS
    gsm8k_shots: int = gsm8k_task.DEFAULT_SHOTS
    gsm8k_max_tokens: int = gsm8k_task.DEFAULT_MAX_TOKENS
    fp8_fallback: str = "int8-block"
    git_sha: str | None = None  # for trees copied without .git (the GPU machine): the sha they were copied at

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no tasks; expected one or more of: " + ", ".join(TASKS))
        for t in [*self.tasks, *self.task_limits]:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; expected one of: {', '.join(TASKS)}")
        for name, n in [("limit", self.limit), *self.task_limits.items()]:
            if n is not None and n <= 0:
                raise ValueError(f"{name} limit {n}: must be positive")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; expected one of: {', '.join(DTYPES)}")
        if self.batch_tokens <= 0:
            raise ValueError(f"batch_tokens {self.batch_tokens}: must be positive")
        WindowConfig(self.n_ctx, self.stride)  # validates

    def limit_of(self, task: str) -> int | None:
        return self.task_limits.get(task, self.limit)

    @property
    def windows(self) -> WindowConfig:
        return WindowConfig(self.n_ctx, self.stride)


class EvalModel(Protocol):
    """What the tasks need of a model. ``IngotModel`` is the real one; tests pass small stand-ins."""

    name: str
    tokenizer: object  # encode(text, add_special_tokens=True) -> list[int]; bos_token_id; pad/eos ids
    max_len: int | None  # longest sequence score() accepts

    def load(self) -> None: ...  # build what score() needs now, so that load time is not counted as scoring time

    def score(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # int64 [B, T] -> float32 [B, T, vocab]

    def generate(self, prompts: list[str], max_tokens: int, stop: Sequence[str]) -> list[gsm8k_task.Generation]: ...

    def release(self) -> None: ...


class IngotModel:
    """An ingot checkpoint: ``ingot.models.loader.load_model`` for scoring, ``ingot.engine.LLM`` for generation,
    each built on first use; the tokenizer from the checkpoint directory (transformers, no remote code)."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str | None = None, fp8_fallback: str = "int8-block"):
        self.path, self.device, self.fp8_fallback = Path(path), device, fp8_fallback
        self.dtype = DTYPES[dtype] if dtype else None
        self.name = str(path)
        self._model = None
        self._llm = None
        config = read_config(self.path)
        from transformers import AutoTokenizer

        # local_files_only: a directory without tokenizer files must fail here, not turn into a hub download
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.max_len = config.get("max_position_embeddings")

    @property
    def model(self):
        if self._model is None:
            from ingot.models.loader import load_model

            self._model = load_model(self.path, device=self.device, dtype=self.dtype, fp8_fallback=self.fp8_fallback)
        return self._model

    def load(self) -> None:
        self.model  # noqa: B018 (builds it)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.score(input_ids.to(self.device))

    def generate(self, prompts: list[str], max_tokens: int, stop: Sequence[str]) -> list[gsm8k_task.Generation]:
        from ingot.engine import LLM, SamplingParams

        if self._llm is None:
            self._release_model()  # the engine sizes its KV cache from free memory
            self._llm = LLM(str(self.path), device=self.device, dtype=self.dtype, fp8_fallback=self.fp8_fallback)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop))
        return [gsm8k_task.Generation(o.text, len(o.token_ids)) for o in self._llm.generate(prompts, params)]

    def _release_model(self) -> None:
        self._model = None
        _free_memory(self.device)

    def release(self) -> None:
        self._model = self._llm = None
        _free_memory(self.device)


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_config(model_path: Path) -> dict:
    """config.json of a model directory; a clear error when ``model_path`` is not one."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_path}: not a model directory (expected {path})")
    return json.loads(path.read_text())


def check_data(data: DataDir, tasks: Sequence[str]) -> None:
    """Fail before any model is loaded when a file a task needs is missing (MissingDataError names it)."""
    if "ppl" in tasks or "kl" in tasks:
        data.path(WIKITEXT_TEST)
    if "gsm8k" in tasks:
        data.path(GSM8K.format(split="train"))
        data.path(GSM8K.format(split="test"))
    if "mmlu" in tasks:
        for subject in data.mmlu_subjects("test"):
            data.path(MMLU.format(split="dev", subject=subject))


def default_reference(model_path: Path) -> Path | None:
    """The reference of ``kl`` when none is given: the source of an ingot conversion (its manifest's
    ``source.path``), or None when the model is itself unquantized (it is its own BF16 form)."""
    model_path = Path(model_path)
    manifest = model_path / MANIFEST_NAME
    if manifest.exists():
        source = Path(json.loads(manifest.read_text())["source"]["path"])
        if not (source / "config.json").exists():
            raise ValueError(f"kl: the reference named by {manifest} (source.path) is gone: {source}; pass --ref")
        return source
    if read_config(model_path).get("quantization_config") is None:
        return None
    raise ValueError(f"kl: {model_path} is quantized and has no {MANIFEST_NAME} naming its BF16 source; pass --ref")


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends one to plain text (llama.cpp's add_bos), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bos if bos is not None and ids and ids[0] == bos else None


def evaluate(model_path: Path | str, options: EvalOptions, data: DataDir, *, ref: Path | str | None = None,
             model: EvalModel | None = None, ref_model: EvalModel | None = None, out: Path | None = None) -> dict:
    """Run ``options.tasks`` on the model at ``model_path``; returns the results dict, written to ``out`` if given.

    ``ref``: the kl reference (default: ``default_reference``). ``model`` / ``ref_model``: already built models
    (``ingot compare`` shares one reference across schemes; tests pass stand-ins); built from the paths when None.
    Results: {"metrics": {task: {...}}, "predictions": {task: [per-item dicts]}, "config", "model", "ref",
    "data" (relative path -> sha256), "git", "device", "software", "timing" (seconds: load, per task, total)}.
    Per-item predictions are keyed so that two runs (e.g. two schemes) can be compared item by item.
    """
    t_start = time.perf_counter()
    model_path = Path(model_path)
    check_data(data, options.tasks)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    own = model is None
    if model is None:
        model = IngotModel(model_path, options.device, options.dtype, options.fp8_fallback)
    ref_path = None
    own_ref = False
    if "kl" in options.tasks:
        ref_path = Path(ref) if ref is not None else default_reference(model_path)
        if ref_model is None:
            if ref_path is None or ref_path.resolve() == model_path.resolve():
                ref_model = model  # its own reference: KL 0 by construction, one forward per window
            else:
                ref_model = IngotModel(ref_path, options.device, options.dtype, options.fp8_fallback)
                own_ref = True
    timing["setup"] = time.perf_counter() - t0

    if any(t in options.tasks for t in ("ppl", "kl", "mmlu")):
        t0 = time.perf_counter()
        model.load()
        if ref_model is not None and ref_model is not model:
            ref_model.load()
        timing["load"] = time.perf_counter() - t0
    metrics: dict[str, dict] = {}
    predictions: dict[str, list] = {}
    extra_config: dict = {}
    scoring = [t for t in ("ppl", "kl") if t in options.tasks]
    if scoring:
        text = data.wikitext_test()
        t0 = time.perf_counter()
        tokens = model.tokenizer.encode(text, add_special_tokens=False)
        all_windows = make_windows(tokens, options.windows, bos_id(model.tokenizer))
        extra_config["wikitext"] = {"tokens": len(tokens), "windows_total": all_windows.shape[0],
                                    "first_scored": options.windows.first, "bos_id": bos_id(model.tokenizer)}
        timing["tokenize"] = time.perf_counter() - t0
        shared = "ppl" in scoring and "kl" in scoring and options.limit_of("ppl") == options.limit_of("kl")
        for task in scoring:
            if task == "ppl" and shared:
                continue  # comes out of the kl pass: the same windows through the same model
            t0 = time.perf_counter()
            ids = seeded_subset(all_windows.shape[0], options.limit_of(task), options.seed)
            windows = all_windows[ids]
            score: Score = model.score  # one bound method: kl_divergence recognises a model that is its own reference
            if task == "ppl":
                metrics["ppl"], predictions["ppl"] = perplexity(score, windows, options.windows,
                                                                options.batch_tokens, ids)
            else:
                ref_score = score if ref_model is model else ref_model.score
                kl_m, kl_items, ppl_m = kl_divergence(score, ref_score, windows, options.windows,
                                                      options.batch_tokens, ids)
                metrics["kl"], predictions["kl"] = kl_m, kl_items
                if shared:
                    metrics["ppl"] = ppl_m
                    keys = ("window", "start", "nll_sum", "tokens")
                    predictions["ppl"] = [{k: it[k] for k in keys} for it in kl_items]
            timing[task] = time.perf_counter() - t0
        if own_ref:
            ref_model.release()
    if "mmlu" in options.tasks:
        t0 = time.perf_counter()
        pad = getattr(model.tokenizer, "pad_token_id", None)
        metrics["mmlu"], predictions["mmlu"] = mmlu_task.evaluate_mmlu(
            model.score, model.tokenizer, data, limit=options.limit_of("mmlu"), seed=options.seed,
            shots=options.mmlu_shots, max_len=model.max_len, batch_tokens=options.batch_tokens,
            pad_id=pad if pad is not None else 0)
        timing["mmlu"] = time.perf_counter() - t0
    if "gsm8k" in options.tasks:
        t0 = time.perf_counter()
        metrics["gsm8k"], predictions["gsm8k"] = gsm8k_task.evaluate_gsm8k(
            model.generate, data, limit=options.limit_of("gsm8k"), seed=options.seed,
            shots=options.gsm8k_shots, max_tokens=options.gsm8k_max_tokens)
        timing["gsm8k"] = time.perf_counter() - t0
    if own:
        model.release()
    timing["total"] = time.perf_counter() - t_start

    results = {
        "kind": "ingot-eval",
        "model": str(model_path),
        "ref": str(ref_path) if ref_path is not None else (str(model_path) if "kl" in options.tasks else None),
        "config": {**asdict(options), **extra_config},
        "data": dict(sorted(data.hashes.items())),
        "metrics": metrics,
        "predictions": predictions,
        "timing": timing,
        **run_info(options.device, options.git_sha),
    }
    results = _finite(results)
    if out is not None:
        write_results(Path(out), results)
    return results


def run_info(device: str, git_sha: str | None = None) -> dict:
    """git sha (``git_sha`` when given: a tree copied without .git), device, software versions and the time: what
    every ingot result records (DESIGN rule 12)."""
    from ingot.bench.common import device_info, git_info, load_average, software_info, timestamp

    git = {"sha": git_sha, "dirty": None, "note": "given with --git-sha"} if git_sha else git_info()
    return {"git": git, "device": device_info([device]), "software": software_info(),
            "load_average": load_average(), "timestamp": timestamp()}


def write_results(path: Path, results: dict) -> Path:
    from ingot.bench.common import write_results as write

    return write(path, results)


def _finite(x):
    """NaN/inf -> None: JSON has no NaN (a 1-token run has no standard error)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def format_summary(results: dict) -> str:
    """A few lines for the terminal: one per task with its headline numbers."""
    m = results["metrics"]
    lines = [f"{results['model']}:"]
    if "ppl" in m:
        p = m["ppl"]
        lines.append(f"  ppl    {p['ppl']:.4f} +/- {p['ppl_stderr'] or 0:.4f} over {p['tokens']} tokens "
                     f"({p['windows']} windows)")
    if "kl" in m:
        k = m["kl"]
        lines.append(f"  kl     mean {k['kl_mean']:.6f} (p99 {k['kl_p99']:.6f}), top-1 {100 * k['top1']:.2f}%, "
                     f"dPPL {k['dppl_pct']:+.3f}% vs {results['ref']}")
    if "mmlu" in m:
        q = m["mmlu"]
        lines.append(f"  mmlu   {100 * q['accuracy']:.2f}% (macro {100 * q['macro_accuracy']:.2f}%) of {q['n']} "
                     f"questions, {q['subjects']} subjects")
    if "gsm8k" in m:
        g = m["gsm8k"]
        lines.append(f"  gsm8k  {100 * g['accuracy']:.2f}% of {g['n']} questions ({g['no_answer']} without a number)")
    for task in ("ppl", "kl"):
        bad = m.get(task, {}).get("nonfinite_windows")
        if bad:
            lines.append(f"  WARNING {task}: non-finite log-probabilities in windows {bad} (a numerics bug in the "
                         "model; its ppl/KL are null)")
    lines.append(f"  {results['timing']['total']:.1f}s")
    return "\n".join(lines)
