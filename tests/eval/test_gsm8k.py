"""GSM8K answer extraction (real solutions and hand-made outputs), prompt building, scoring with a stand-in."""

from __future__ import annotations

import pytest

from ingot.eval import gsm8k
from ingot.eval.gsm8k import Generation, canonical, extract_answer


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,450,000", "1450000"),
    ("The answer is $1,234.50.", "1234.5"),
    ("so she is left with -10 dollars", "-10"),
    ("The temperature fell to \u22125 degrees", "-5"),  # unicode minus
    ("5-3=2", "2"),  # a minus between operands is not a sign
    ("It takes 2-3 hours", "3"),
    ("That is 18.00 in total", "18"),
    ("She bought 0.50 pounds", "0.5"),
    ("items 1,2,3", "3"),  # not a thousands separator
    ("#### 7\nbut then 9 more", "7"),  # '####' wins over the last number
    ("#### \nThe answer is 12", "12"),  # an empty '####' falls back to the last number
    ("The answer is 100.", "100"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_canonical_numbers_compare_as_decimals():
    assert canonical("18.00") == canonical("18") == "18"
    assert canonical("$1,000") == "1000" and canonical("-0") == "0"
    assert canonical("-$3.250") == "-3.25"


def test_every_real_test_solution_extracts_its_own_answer(data):
    rows = data.gsm8k("test")
    assert len(rows) == 1319
    targets = [gsm8k.target_answer(r["answer"]) for r in rows]
    assert [extract_answer(r["answer"]) for r in rows] == targets
    assert targets[:2] == ["18", "3"]
    assert "-10" in targets and "1450000" in targets  # signs and thousands commas occur in the real answers
    # without the '####' line, the last number of the worked solution is the answer for the two first rows
    assert [extract_answer(r["answer"].rsplit("####", 1)[0]) for r in rows[:2]] == ["18", "3"]


def test_prompt_from_train_exemplars(data):
    train = data.gsm8k("train")
    ids = gsm8k.fewshot_indices(len(train))
    assert len(train) == 7473 and len(ids) == 8 == len(set(ids))
    assert ids == gsm8k.fewshot_indices(len(train))  # fixed: FEWSHOT_SEED, not the run's seed
    prompt = gsm8k.build_prompt([train[i] for i in ids], "How many legs do 3 cats have?")
    assert prompt.count("Question: ") == 9 and prompt.count("\n#### ") == 8
    assert prompt.endswith("\n\nQuestion: How many legs do 3 cats have?\nAnswer:")
    assert "<<" not in prompt and ">>" not in prompt  # calculator annotations removed
    assert gsm8k.clean_solution("half = <<48/2=24>>24 clips") == "half = 24 clips"
    assert train[ids[0]]["question"] in prompt


def test_evaluate_with_a_stand_in_engine(data):
    test = data.gsm8k("test")

    def generate(prompts, max_tokens, stop):
        assert max_tokens == 256 and "\n\n" in stop and "Question:" in stop
        outs = []
        for p in prompts:
            question = p.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            row = next(r for r in test if r["question"] == question)
            right = gsm8k.clean_solution(row["answer"])
            # every other question right; the rest trail off into a new question whose number must not count
            text = f" {right}\n\nQuestion: what is 99?" if len(outs) % 2 == 0 else " I am not sure."
            outs.append(Generation(text, 11))
        return outs

    metrics, items = gsm8k.evaluate_gsm8k(generate, data, limit=10, seed=1)
    assert metrics["n"] == 10 and metrics["accuracy"] == 0.5 and metrics["no_answer"] == 5
    assert metrics["generated_tokens"] == 110 and metrics["shots"] == 8
    assert [it["correct"] for it in items] == [True, False] * 5
    assert all("Question:" not in it["output"] for it in items)
    again, items2 = gsm8k.evaluate_gsm8k(generate, data, limit=10, seed=1)
    assert [it["index"] for it in items2] == [it["index"] for it in items]
    other, items3 = gsm8k.evaluate_gsm8k(generate, data, limit=10, seed=2)
    assert [it["index"] for it in items3] != [it["index"] for it in items]


def test_generate_must_answer_every_prompt(data):
    with pytest.raises(ValueError, match="returned 0 outputs for 3 prompts"):
        gsm8k.evaluate_gsm8k(lambda p, m, s: [], data, limit=3)
