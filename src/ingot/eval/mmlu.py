"""MMLU: 5-shot multiple choice, answered by the log-probability of " A" / " B" / " C" / " D" after "Answer:".

Prompt (Hendrycks et al.'s evaluate.py, with lm-evaluation-harness's single space after "about"): a header
naming the subject, the subject's dev questions with their answers, then the test question without one:

    The following are multiple choice questions (with answers) about high school biology.

    {question}
    A. {choice0}
    B. {choice1}
    C. {choice2}
    D. {choice3}
    Answer: B

    ... (5 dev examples) ...
    {test question}
    A. ...
    Answer:

One forward per question (rows of a batch right-padded: causal attention makes padding after the last prompt
token invisible to it); the prediction is the choice whose letter token has the highest log-probability at the
last position. When a prompt is longer than the model's context, shots are dropped from the end until it fits
(the original code's rule).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Protocol, Sequence

import torch

from ingot.eval.data import DataDir, MmluItem, seeded_subset
from ingot.eval.perplexity import Score

LETTERS = ("A", "B", "C", "D")
DEFAULT_SHOTS = 5


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def subject_name(subject: str) -> str:
    """'high_school_biology' -> 'high school biology'."""
    return subject.replace("_", " ")


def format_question(item: MmluItem, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))
    text = item.question + options + "\nAnswer:"
    return text + f" {LETTERS[item.answer]}\n\n" if with_answer else text


def build_prompt(item: MmluItem, shots: Sequence[MmluItem]) -> str:
    """The k-shot prompt for ``item`` (k = len(shots)), ending in "Answer:"."""
    header = f"The following are multiple choice questions (with answers) about {subject_name(item.subject)}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(item, False)


def choice_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids of " A", " B", " C", " D"; each must be one token (true of Llama, Qwen, SmolLM2 tokenizers)."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"mmlu: the tokenizer splits {' ' + letter!r} into {len(toks)} tokens {toks}; "
                             "scoring by the answer letter needs one token per letter")
        ids.append(toks[0])
    if len(set(ids)) != 4:
        raise ValueError(f"mmlu: the answer letters map to repeated token ids {ids}")
    return ids


def encode_prompt(tokenizer: Tokenizer, item: MmluItem, dev: Sequence[MmluItem], shots: int,
                  max_len: int | None) -> tuple[list[int], int]:
    """(token ids, shots used): drops shots from the end while the prompt is longer than ``max_len``."""
    for k in range(min(shots, len(dev)), -1, -1):
        ids = tokenizer.encode(build_prompt(item, dev[:k]))
        if max_len is None or len(ids) <= max_len:
            return ids, k
    raise ValueError(f"mmlu {item.subject} #{item.index}: the question alone is {len(ids)} tokens, longer than the "
                     f"model's context {max_len}")


def batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_tokens`` padded tokens (rows sorted by length, longest
    first, so padding stays small; a row longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def evaluate_mmlu(score: Score, tokenizer: Tokenizer, data: DataDir, *, limit: int | None = None, seed: int = 0,
                  shots: int = DEFAULT_SHOTS, max_len: int | None = None, batch_tokens: int = 4096,
                  pad_id: int = 0, subjects: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy on MMLU test (all subjects, or a seeded subset of ``limit`` questions drawn over all of them).

    Returns (metrics, items). metrics: accuracy (micro: over questions), macro_accuracy (mean of per-subject
    accuracies), per_subject {subject: {accuracy, n}}, n, model_seconds. items: one per question
    {subject, index, answer, pred, correct, logprobs [4] (full-vocabulary log-probabilities of " A".." D"),
    shots, prompt_tokens}, in subject / file order.
    """
    subjects = list(subjects) if subjects is not None else data.mmlu_subjects("test")
    letters = choice_token_ids(tokenizer)
    pool = [item for s in subjects for item in data.mmlu("test", s)]
    chosen = [pool[i] for i in seeded_subset(len(pool), limit, seed)]
    dev = {s: data.mmlu("dev", s) for s in sorted({item.subject for item in chosen})}
    encoded = [encode_prompt(tokenizer, item, dev[item.subject], shots, max_len) for item in chosen]

    logprobs: list[list[float] | None] = [None] * len(chosen)
    model_seconds = 0.0
    for group in batches([len(ids) for ids, _ in encoded], batch_tokens):
        width = max(len(encoded[i][0]) for i in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.int64)
        for row, i in enumerate(group):
            ids = encoded[i][0]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        t0 = time.perf_counter()
        logits = score(input_ids)
        last = torch.tensor([len(encoded[i][0]) - 1 for i in group], device=logits.device)
        final = logits[torch.arange(len(group), device=logits.device), last]  # (b, vocab)
        lp = torch.log_softmax(final.double(), dim=-1)[:, letters].cpu()  # .cpu() waits for the device
        model_seconds += time.perf_counter() - t0
        for row, i in enumerate(group):
            logprobs[i] = lp[row].tolist()

    items = []
    per_subject: dict[str, list[int]] = defaultdict(list)
    for item, (ids, k), lp in zip(chosen, encoded, logprobs):
        pred = max(range(4), key=lambda c: lp[c])
        correct = pred == item.answer
        per_subject[item.subject].append(int(correct))
        items.append({"subject": item.subject, "index": item.index, "answer": LETTERS[item.answer],
                      "pred": LETTERS[pred], "correct": correct, "logprobs": lp, "shots": k, "prompt_tokens": len(ids)})
    n = len(items)
    accs = {s: sum(v) / len(v) for s, v in per_subject.items()}
    acc = sum(it["correct"] for it in items) / n
    metrics = {
        "accuracy": acc,
        "accuracy_stderr": math.sqrt(acc * (1 - acc) / n),
        "macro_accuracy": sum(accs.values()) / len(accs),
        "n": n,
        "subjects": len(accs),
        "per_subject": {s: {"accuracy": accs[s], "n": len(per_subject[s])} for s in sorted(accs)},
        "model_seconds": model_seconds,
    }
    return metrics, items
