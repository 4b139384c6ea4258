"""The real evaluation data directory for the eval tests (stand-in models live in eval_standins.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingot.eval.data import DataDir

DATA_ENV = "INGOT_DATA_DIR"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared evaluation data (the Makefile and CI export INGOT_DATA_DIR); tests skip without it."""
    root = os.environ.get(DATA_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(f"{DATA_ENV} is not set to the evaluation data directory")
    return Path(root)


@pytest.fixture
def data(data_root) -> DataDir:
    return DataDir(data_root)
