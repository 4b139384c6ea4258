"""MMLU prompt construction on real items, letter scoring, padding invariance, subsets and per-subject accuracy."""

from __future__ import annotations

import csv

import pytest
import torch

from ingot.eval import mmlu
from ingot.eval.data import MmluItem

from eval_standins import PrefixMeanLM, WordTokenizer

EXPECTED_ONE_SHOT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    "\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
)


def test_prompt_of_a_real_item(data):
    test = data.mmlu("test", "abstract_algebra")
    dev = data.mmlu("dev", "abstract_algebra")
    assert len(test) == 100 and len(dev) == 5
    assert test[0] == MmluItem("abstract_algebra", 0, test[0].question, ("0", "4", "2", "6"), 1)
    assert mmlu.build_prompt(test[0], dev[:1]) == EXPECTED_ONE_SHOT
    five = mmlu.build_prompt(test[0], dev)
    assert five.count("\nAnswer:") == 6 and five.endswith("D. 6\nAnswer:")
    # the dev answers, in order, are the letters after each shot's "Answer:"
    assert [chunk[1] for chunk in five.split("\nAnswer:")[1:-1]] == [mmlu.LETTERS[d.answer] for d in dev]
    # a quoted csv field with commas stays one choice
    bio = data.mmlu("dev", "high_school_biology")[0]
    assert bio.choices == ("Translation", "Conjugation", "Specialized transduction", "Transformation")
    assert bio.answer == 0


def test_letter_tokens_of_the_embedded_tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir), local_files_only=True)
    ids = mmlu.choice_token_ids(tok)
    assert len(set(ids)) == 4
    # the prompt + " B" tokenizes as the prompt's tokens + the letter's token: scoring the next token is exact
    prompt = tok.encode(EXPECTED_ONE_SHOT)
    assert tok.encode(EXPECTED_ONE_SHOT + " B") == prompt + [ids[1]]


def test_letter_tokens_must_be_single():
    class CharTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="splits ' A' into 2 tokens"):
        mmlu.choice_token_ids(CharTokenizer())


def test_shots_dropped_to_fit_context(data):
    tok = WordTokenizer()
    item, dev = data.mmlu("test", "abstract_algebra")[0], data.mmlu("dev", "abstract_algebra")
    full, k = mmlu.encode_prompt(tok, item, dev, 5, None)
    assert k == 5
    ids, k = mmlu.encode_prompt(tok, item, dev, 5, len(full) - 1)
    assert k == 4 and len(ids) < len(full)
    with pytest.raises(ValueError, match="longer than the model's context 3"):
        mmlu.encode_prompt(tok, item, dev, 5, 3)


def _prefers(letter_id: int, vocab: int = 512):
    def score(ids):
        out = torch.zeros(*ids.shape, vocab)
        out[..., letter_id] = 5.0
        return out

    return score


def test_constant_letter_scores_the_share_of_that_answer(data, data_root):
    tok = WordTokenizer()
    b = mmlu.choice_token_ids(tok)[1]
    metrics, items = mmlu.evaluate_mmlu(_prefers(b), tok, data, subjects=["abstract_algebra", "anatomy"])
    answers = {}
    for subject in ("abstract_algebra", "anatomy"):
        with open(data_root / "mmlu" / "test" / f"{subject}_test.csv", newline="") as f:
            answers[subject] = [int(r["answer"]) for r in csv.DictReader(f)]
    share = {s: sum(a == 1 for a in v) / len(v) for s, v in answers.items()}
    n = sum(len(v) for v in answers.values())
    assert metrics["n"] == n == len(items) and metrics["subjects"] == 2
    assert all(it["pred"] == "B" for it in items)
    assert metrics["per_subject"]["abstract_algebra"]["accuracy"] == pytest.approx(share["abstract_algebra"]) == 0.26
    assert metrics["accuracy"] == pytest.approx(sum(sum(a == 1 for a in v) for v in answers.values()) / n)
    assert metrics["macro_accuracy"] == pytest.approx(sum(share.values()) / 2)
    assert metrics["macro_accuracy"] != pytest.approx(metrics["accuracy"])  # 100 vs 135 questions: they differ


def test_batched_padded_scoring_equals_one_question_at_a_time(data):
    tok, lm = WordTokenizer(), PrefixMeanLM()
    kwargs = dict(limit=12, seed=3, subjects=["abstract_algebra", "anatomy", "astronomy"])
    batched, items = mmlu.evaluate_mmlu(lm.score, tok, data, batch_tokens=100_000, **kwargs)
    calls = lm.calls
    single, items1 = mmlu.evaluate_mmlu(lm.score, tok, data, batch_tokens=1, **kwargs)
    assert calls == 1 and lm.calls - calls == 12  # all 12 in one padded batch, then 12 forwards
    for a, b in zip(items, items1):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5) and a["pred"] == b["pred"]
    assert batched["accuracy"] == single["accuracy"]
    # the seeded subset is fixed and spread over the subjects
    again, items2 = mmlu.evaluate_mmlu(lm.score, tok, data, **kwargs)
    assert [(i["subject"], i["index"]) for i in items2] == [(i["subject"], i["index"]) for i in items]
    assert len({i["subject"] for i in items}) > 1


def test_batches_respect_the_token_budget():
    lengths = [5, 30, 7, 30, 12, 1]
    groups = mmlu.batches(lengths, 60)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * max(lengths[i] for i in g) <= 60 for g in groups)
    assert mmlu.batches([100], 10) == [[0]]  # too long for the budget: alone
