"""Data directory: clear errors naming the expected path, sha256 of each file read, format checks."""

from __future__ import annotations

import hashlib

import pytest

from ingot.cli import main
from ingot.eval.data import DataDir, DataFormatError, MissingDataError


def test_no_data_dir_is_a_clear_error():
    with pytest.raises(MissingDataError, match="pass --data-dir DIR or set INGOT_DATA_DIR"):
        DataDir(None)


def test_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(MissingDataError, match=f"{tmp_path / 'nope'} does not exist"):
        DataDir(tmp_path / "nope")
    data = DataDir(tmp_path)
    with pytest.raises(MissingDataError, match=f"expected {tmp_path}/wikitext-2/wiki.test.raw"):
        data.wikitext_test()
    with pytest.raises(MissingDataError, match=f"expected {tmp_path}/gsm8k/train.jsonl"):
        data.gsm8k("train")
    with pytest.raises(MissingDataError, match=f"expected {tmp_path}/mmlu/test "):
        data.mmlu_subjects("test")
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\n")
    assert data.mmlu_subjects("test") == ["anatomy"]
    with pytest.raises(MissingDataError, match=f"expected {tmp_path}/mmlu/dev/anatomy_dev.csv"):
        data.mmlu("dev", "anatomy")
    assert data.hashes == {}  # listing a folder reads nothing; failed reads record nothing


def test_malformed_rows_name_file_and_row(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": 3}\n')
    with pytest.raises(DataFormatError, match="test.jsonl line 2: expected an object with string 'question'"):
        DataDir(tmp_path).gsm8k("test")
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text(header + "q,a,b,c,d,4\n")
    with pytest.raises(DataFormatError, match="x_test.csv row 1: expected 6 fields with answer 0-3"):
        DataDir(tmp_path).mmlu("test", "x")


def test_files_read_are_hashed(data, data_root):
    text = data.wikitext_test()
    assert len(text.encode()) == 1_290_547  # the size the data README states
    data.mmlu("dev", "anatomy")
    files = ("wikitext-2/wiki.test.raw", "mmlu/dev/anatomy_dev.csv")
    assert data.hashes == {f: hashlib.sha256((data_root / f).read_bytes()).hexdigest() for f in files}
    assert len(data.mmlu_subjects("test")) == 57 == len(data.mmlu_subjects("dev"))


def test_cli_reports_missing_data_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INGOT_DATA_DIR", raising=False)
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "ppl"]) == 1
    assert "pass --data-dir DIR or set INGOT_DATA_DIR" in capsys.readouterr().err
    monkeypatch.setenv("INGOT_DATA_DIR", str(tmp_path))
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "ppl,kl"]) == 1
    assert f"expected {tmp_path}/wikitext-2/wiki.test.raw" in capsys.readouterr().err
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    assert main(["compare", str(tmp_path / "no-model"), "--tasks", "gsm8k", "--data-dir", str(tmp_path)]) == 1
    assert f"expected {tmp_path}/gsm8k/test.jsonl" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "bogus", "--data-dir", str(tmp_path)]) == 1
    assert "unknown task 'bogus'" in capsys.readouterr().err
