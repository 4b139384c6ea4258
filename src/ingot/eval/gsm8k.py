"""GSM8K: 8-shot chain of thought, greedy decoding, exact match of the final number.

Prompt: 8 worked solutions from train.jsonl (a fixed draw, the same for every run and model), each as

    Question: {question}
    Answer: {solution steps}
    #### {number}

separated by blank lines, then "Question: {test question}\\nAnswer:". The calculator annotations of the
released solutions (``<<48/2=24>>``) are removed from the exemplars: they are tool-call markup, not text a model
should imitate. Generation is greedy, at most 256 new tokens, and stops at a blank line or "Question:" (the
exemplars' own separators), so the model writes one solution.

Answer extraction: the number after the first "####", else the last number in the text. Numbers may carry a
sign, a dollar sign, thousands commas and decimals ("-$1,234.50"); they are compared as decimals, so
"18.00" == "18".
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from ingot.eval.data import DataDir, seeded_subset

DEFAULT_SHOTS = 8
# train.jsonl solutions (annotations removed) in SmolLM2 tokens: median 84, 99th percentile 221, max 342.
DEFAULT_MAX_TOKENS = 256
FEWSHOT_SEED = 1234  # the exemplar draw; fixed, so --seed changes only which test questions are evaluated
STOP = ("\n\n", "Question:")

_CALC = re.compile(r"<<[^<>]*>>")
# A number: optional sign (only where it cannot be a minus between two operands, e.g. not in "5-3"), optional
# dollar sign, digits with well-formed thousands commas (else plain digits), optional decimals.
_NUMBER = re.compile(r"(?:(?<![\w.])(?P<sign>[-\u2212]))?\$?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?")


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # generated tokens


# generate(prompts, max_tokens, stop) -> one Generation per prompt, greedy (temperature 0).
Generate = Callable[[list[str], int, Sequence[str]], list[Generation]]


def clean_solution(answer: str) -> str:
    """A train.jsonl answer without its calculator annotations: 'half = <<48/2=24>>24' -> 'half = 24'."""
    return _CALC.sub("", answer)


def canonical(number: str) -> str | None:
    """'-1,234.50' -> '-1234.5', '18.00' -> '18', '$5' -> '5'; None when ``number`` holds no number."""
    m = _NUMBER.search(number)
    if m is None:
        return None
    try:
        value = Decimal(m.group("int").replace(",", "") + (m.group("frac") or ""))
    except InvalidOperation:
        return None
    if m.group("sign"):
        value = -value
    value = value.normalize()
    if value == value.to_integral_value():
        return str(int(value))  # also turns -0 into 0 and 1E+2 into 100
    return format(value, "f")


def extract_answer(text: str) -> str | None:
    """The canonical number after the first '####' in ``text``, else its last number; None if it has none."""
    if "####" in text:
        found = canonical(text.split("####", 1)[1])
        if found is not None:
            return found
    numbers = list(_NUMBER.finditer(text))
    return canonical(numbers[-1].group(0)) if numbers else None


def target_answer(answer: str) -> str:
    """The reference number of a GSM8K row's 'answer' (after '####')."""
    if "####" not in answer:
        raise ValueError(f"gsm8k answer without '####': {answer[-80:]!r}")
    found = canonical(answer.split("####")[-1])
    if found is None:
        raise ValueError(f"gsm8k answer without a number after '####': {answer[-80:]!r}")
    return found


def fewshot_indices(n_train: int, shots: int = DEFAULT_SHOTS, seed: int = FEWSHOT_SEED) -> list[int]:
    """Which train rows are the exemplars (in prompt order)."""
    return random.Random(seed).sample(range(n_train), shots)


def build_prompt(exemplars: Sequence[dict], question: str) -> str:
    shots = "".join(f"Question: {e['question']}\nAnswer: {clean_solution(e['answer'])}\n\n" for e in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


def cut_at_stop(text: str, stop: Sequence[str] = STOP) -> str:
    """The text before the first stop string (engines may or may not include it)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def evaluate_gsm8k(generate: Generate, data: DataDir, *, limit: int | None = None, seed: int = 0,
                   shots: int = DEFAULT_SHOTS, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[dict, list[dict]]:
    """Exact-match accuracy on GSM8K test (all 1319 questions, or a seeded subset of ``limit``).

    ``generate`` gets every prompt at once (the engine batches them). Returns (metrics, items). metrics:
    accuracy, accuracy_stderr, n, shots, exemplars (train row indices), no_answer (outputs without a number),
    generated_tokens, gen_seconds, gen_tokens_per_s. items: {index, target, pred, correct, output}.
    """
    train, test = data.gsm8k("train"), data.gsm8k("test")
    exemplar_ids = fewshot_indices(len(train), shots)
    exemplars = [train[i] for i in exemplar_ids]
    chosen = seeded_subset(len(test), limit, seed)
    prompts = [build_prompt(exemplars, test[i]["question"]) for i in chosen]
    t0 = time.perf_counter()
    outputs = generate(prompts, max_tokens, STOP)
    seconds = time.perf_counter() - t0
    if len(outputs) != len(prompts):
        raise ValueError(f"gsm8k: generate returned {len(outputs)} outputs for {len(prompts)} prompts")
    items = []
    for i, out in zip(chosen, outputs):
        text = cut_at_stop(out.text)
        pred, target = extract_answer(text), target_answer(test[i]["answer"])
        items.append({"index": i, "target": target, "pred": pred, "correct": pred == target, "output": text})
    n = len(items)
    acc = sum(it["correct"] for it in items) / n
    generated = sum(out.tokens for out in outputs)
    return {
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n),
        "n": n,
        "shots": shots,
        "exemplars": exemplar_ids,
        "no_answer": sum(it["pred"] is None for it in items),
        "generated_tokens": generated,
        "gen_seconds": seconds,
        "gen_tokens_per_s": generated / seconds if seconds > 0 else None,
    }, items
