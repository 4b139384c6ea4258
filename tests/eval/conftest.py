"""The real evaluation data directory for the eval tests (stand-in models live in eval_standins.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingot.eval.data import DataDir

DATA_ENV = "INGOT_DATA_DIR"


# The Makefile's default for INGOT_DATA_DIR: ../shared/data beside the checkout.
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared evaluation data: $INGOT_DATA_DIR (the Makefile and CI export it), else ../shared/data beside the
    checkout; tests that need it skip when neither exists."""
    root = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not root.is_dir():
        pytest.skip(f"no evaluation data: {DATA_ENV} is not set and {DEFAULT_DATA} does not exist")
    return root


@pytest.fixture
def data(data_root) -> DataDir:
    return DataDir(data_root)
