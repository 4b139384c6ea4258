"""The wrappers' shared helpers: plain-Python grid helpers that agree with Triton's own (which they replace on the
host), and the record of a backend that failed on a device."""

from __future__ import annotations

import torch
import triton
from hypothesis import given
from hypothesis import strategies as st

from ingot.kernels.checks import cdiv, next_pow2


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 20))
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)


@given(st.integers(0, 1 << 40))
def test_next_pow2_matches_triton(n):
    assert next_pow2(n) == triton.next_power_of_2(n)


def test_backend_failed_records_the_first_line_and_logs(caplog):
    from ingot.kernels.checks import backend_failed

    failed: dict = {}
    device = torch.device("cpu")
    with caplog.at_level("WARNING", logger="ingot"):
        backend_failed(failed, device, "op: the fast kernel failed", RuntimeError("no such instruction\nat line 3"))
    assert failed == {device: "RuntimeError: no such instruction"}
    assert "op: the fast kernel failed on cpu (RuntimeError: no such instruction); using the Triton kernel" in caplog.text
