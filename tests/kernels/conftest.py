"""Shared set-up of the kernel tests: Triton's interpreter on CPU, and a fix for it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # read by triton.jit when a kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array_of_shape_(1,))``, which NumPy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every loop with a run-time bound
    (the K loop here) fails. Fixed upstream (triton-lang/triton#9171, PR #9172); until then, re-patch ``__index__``
    with ``.item()`` inside the interpreter's own patch scope (restored with it after each launch)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "ingot_index_fix", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch.ingot_index_fix = True
    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()
