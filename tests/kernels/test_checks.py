"""The wrappers' plain-Python grid helpers agree with Triton's own (which they replace on the host)."""

from __future__ import annotations

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
