"""Evaluation data: locating files under the data directory, reading them, and hashing every file used.

Layout (the data directory's README.md): ``wikitext-2/wiki.test.raw``, ``gsm8k/{train,test}.jsonl``,
``mmlu/{dev,test}/{subject}_{split}.csv``. The directory comes from the caller (``ingot eval --data-dir``, else
the CLI reads ``INGOT_DATA_DIR``); nothing here reads the environment or downloads anything.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

WIKITEXT_TEST = "wikitext-2/wiki.test.raw"
GSM8K = "gsm8k/{split}.jsonl"
MMLU_DIR = "mmlu/{split}"
MMLU = "mmlu/{split}/{subject}_{split}.csv"
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def seeded_subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of a fixed subset of ``range(n)``: all of them when ``limit`` is None or >= n, else
    ``limit`` drawn without replacement by ``random.Random(seed)`` (the same subset on every machine)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"limit {limit}: must be positive")
    return sorted(random.Random(seed).sample(range(n), limit))


class MissingDataError(FileNotFoundError):
    """An evaluation file (or the data directory itself) is not where it is expected."""


class DataFormatError(ValueError):
    """An evaluation file exists but does not hold what its layout promises (names the file, line and field)."""


@dataclass(frozen=True)
class MmluItem:
    subject: str  # file stem without the split: "abstract_algebra"
    index: int  # row in its csv (0-based, header excluded)
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-3


@dataclass
class DataDir:
    """The data directory; every file read through it is recorded in ``hashes`` (relative path -> sha256)."""

    root: Path | None
    hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.root is None:
            raise MissingDataError(
                "no evaluation data directory: pass --data-dir DIR or set INGOT_DATA_DIR (expected layout: "
                f"DIR/{WIKITEXT_TEST}, DIR/gsm8k/*.jsonl, DIR/mmlu/{{dev,test}}/*.csv)"
            )
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise MissingDataError(
                f"evaluation data directory {self.root} does not exist (from --data-dir / INGOT_DATA_DIR)")

    def path(self, rel: str) -> Path:
        """The absolute path of ``rel``; MissingDataError naming the expected path when it is not a file."""
        p = self.root / rel
        if not p.is_file():
            raise MissingDataError(
                f"evaluation data file not found: expected {p} ({rel} under the data directory {self.root})")
        return p

    def read_bytes(self, rel: str) -> bytes:
        data = self.path(rel).read_bytes()
        self.hashes[rel] = hashlib.sha256(data).hexdigest()
        return data

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    # --- the datasets -------------------------------------------------------------------------------------------

    def wikitext_test(self) -> str:
        """WikiText-2 raw test split as one string (1,290,547 bytes in the shipped file).

        Byte-exact: no newline translation (the shipped file ends its 2,891 lines with CRLF; llama.cpp reads the
        bytes as they are too). SmolLM2's tokenizer makes 304,839 tokens of it (301,948 with LF line ends).
        """
        return self.read_text(WIKITEXT_TEST)

    def gsm8k(self, split: str) -> list[dict]:
        """GSM8K rows ``{"question", "answer"}`` of ``split`` ("train" or "test"), in file order."""
        rel = GSM8K.format(split=split)
        rows = []
        for n, line in enumerate(self.read_text(rel).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{self.root / rel} line {n}: not JSON ({e})") from None
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("question", "answer"))):
                raise DataFormatError(
                    f"{self.root / rel} line {n}: expected an object with string 'question' and 'answer'")
            rows.append(row)
        if not rows:
            raise DataFormatError(f"{self.root / rel}: no rows")
        return rows

    def mmlu_subjects(self, split: str = "test") -> list[str]:
        """Sorted subject names that have a ``{subject}_{split}.csv`` under ``mmlu/{split}`` (57 in MMLU)."""
        d = self.root / MMLU_DIR.format(split=split)
        if not d.is_dir():
            raise MissingDataError(
                f"evaluation data folder not found: expected {d} (mmlu/{split} under the data directory {self.root})")
        suffix = f"_{split}.csv"
        subjects = sorted(p.name[: -len(suffix)] for p in d.iterdir() if p.name.endswith(suffix))
        if not subjects:
            raise MissingDataError(f"{d}: no *{suffix} files")
        return subjects

    def mmlu(self, split: str, subject: str) -> list[MmluItem]:
        """The questions of one subject and split, in file order."""
        rel = MMLU.format(split=split, subject=subject)
        reader = csv.reader(io.StringIO(self.read_text(rel), newline=""))
        header = next(reader, None)
        if header != MMLU_HEADER:
            raise DataFormatError(f"{self.root / rel}: header {header}, expected {MMLU_HEADER}")
        items = []
        for i, row in enumerate(reader):
            if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
                raise DataFormatError(f"{self.root / rel} row {i + 1}: expected 6 fields with answer 0-3, got {row}")
            items.append(MmluItem(subject, i, row[0], (row[1], row[2], row[3], row[4]), int(row[5])))
        return items
