"""evaluate(): tasks on stand-in models, the results JSON (config, data hashes, git, device, timing, items)."""

from __future__ import annotations

import json

import pytest

from ingot.eval import EvalOptions, evaluate, format_summary
from ingot.eval.runner import default_reference

from eval_standins import StandInModel


def test_all_tasks_on_a_stand_in(data, tmp_path):
    model = StandInModel(answers=lambda p: " 2 + 2 = 4\n#### 4")
    ref = StandInModel(name="ref", noise=0.05)  # the same weights plus noise: small but nonzero KL
    options = EvalOptions(tasks=("ppl", "kl", "mmlu", "gsm8k"), limit=6, task_limits={"gsm8k": 4}, n_ctx=128, seed=2)
    out = tmp_path / "r.json"
    results = evaluate(tmp_path / "m", options, data, ref=tmp_path / "ref", model=model, ref_model=ref, out=out)
    m = results["metrics"]
    assert m["ppl"]["windows"] == 6 and m["ppl"]["tokens"] == 6 * 63
    assert m["ppl"]["ppl"] == pytest.approx(m["kl"]["ppl"])  # one pass serves both
    assert 1e-4 < m["kl"]["kl_mean"] < 1 and 0.5 < m["kl"]["top1"] < 1
    assert m["mmlu"]["n"] == 6 and m["gsm8k"]["n"] == 4
    assert m["gsm8k"]["accuracy"] == sum(it["target"] == "4" for it in results["predictions"]["gsm8k"]) / 4
    assert model.released is False  # a model passed in belongs to the caller

    saved = json.loads(out.read_text())
    assert saved["metrics"] == json.loads(json.dumps(m))
    chosen = {it["subject"] for it in saved["predictions"]["mmlu"]}
    assert set(saved["data"]) == {"wikitext-2/wiki.test.raw", "gsm8k/train.jsonl", "gsm8k/test.jsonl",
                                  *{f"mmlu/dev/{s}_dev.csv" for s in chosen},  # dev files: chosen subjects only
                                  *{f"mmlu/test/{s}_test.csv" for s in data.mmlu_subjects("test")}}
    assert all(len(h) == 64 for h in saved["data"].values())
    assert saved["git"]["sha"] and saved["device"]["cpu"]["cores"] and saved["software"]["torch"]
    assert saved["software"]["transformers"] and saved["software"]["tokenizers"]  # tokenization depends on them
    assert {"setup", "load", "tokenize", "kl", "mmlu", "gsm8k", "total"} <= set(saved["timing"])
    assert saved["config"]["tasks"] == ["ppl", "kl", "mmlu", "gsm8k"] and saved["config"]["task_limits"] == {"gsm8k": 4}
    assert saved["config"]["wikitext"]["windows_total"] > 6 and saved["ref"] == str(tmp_path / "ref")
    # per-item predictions, keyed for item-by-item comparison of two runs
    assert [it["window"] for it in saved["predictions"]["ppl"]] == [it["window"] for it in saved["predictions"]["kl"]]
    assert {"subject", "index", "pred", "answer", "correct", "logprobs"} <= set(saved["predictions"]["mmlu"][0])
    assert {"index", "target", "pred", "correct", "output"} <= set(saved["predictions"]["gsm8k"][0])
    text = format_summary(results)
    assert "ppl" in text and "top-1" in text and "mmlu" in text and "gsm8k" in text


def test_same_seed_same_items_other_seed_other_items(data):
    model = StandInModel()
    a = evaluate("m", EvalOptions(tasks=("ppl",), limit=4, n_ctx=64), data, model=model)
    b = evaluate("m", EvalOptions(tasks=("ppl",), limit=4, n_ctx=64), data, model=model)
    c = evaluate("m", EvalOptions(tasks=("ppl",), limit=4, n_ctx=64, seed=9), data, model=model)
    assert a["predictions"] == b["predictions"] and a["metrics"]["ppl"]["ppl"] == b["metrics"]["ppl"]["ppl"]
    assert [i["window"] for i in c["predictions"]["ppl"]] != [i["window"] for i in a["predictions"]["ppl"]]


def test_git_sha_given_for_a_copied_tree(data):
    r = evaluate("m", EvalOptions(tasks=("ppl",), limit=1, n_ctx=64, git_sha="abc123"), data, model=StandInModel())
    assert r["git"] == {"sha": "abc123", "dirty": None, "note": "given with --git-sha"}


def test_ppl_and_kl_with_different_limits_run_separately(data):
    model, ref = StandInModel(), StandInModel(seed=1)
    r = evaluate("m", EvalOptions(tasks=("ppl", "kl"), task_limits={"ppl": 3, "kl": 2}, n_ctx=64), data,
                 ref="r", model=model, ref_model=ref)
    assert r["metrics"]["ppl"]["windows"] == 3 and r["metrics"]["kl"]["windows"] == 2


def test_default_reference(tmp_path):
    src, dst, quant = tmp_path / "src", tmp_path / "dst", tmp_path / "q"
    for d in (src, dst, quant):
        d.mkdir()
    (src / "config.json").write_text("{}")
    (dst / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    (dst / "ingot_manifest.json").write_text(json.dumps({"source": {"path": str(src)}}))
    (quant / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    assert default_reference(dst) == src
    assert default_reference(src) is None  # unquantized: its own reference
    with pytest.raises(ValueError, match="no ingot_manifest.json naming its BF16 source; pass --ref"):
        default_reference(quant)
    (src / "config.json").unlink()
    with pytest.raises(ValueError, match="source.path\\) is gone"):
        default_reference(dst)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown task 'ppx'"):
        EvalOptions(tasks=("ppx",))
    with pytest.raises(ValueError, match="limit 0"):
        EvalOptions(tasks=("ppl",), task_limits={"ppl": 0})
    with pytest.raises(ValueError, match="unknown task 'mmlux'"):
        EvalOptions(tasks=("ppl",), task_limits={"mmlux": 3})
