"""Operand checks the GEMM wrappers share (DESIGN rule 4: every refusal names the operand and the offending value)."""

from __future__ import annotations

import functools
import logging

import torch

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...], dim: int, contiguous: bool = True) -> None:
    """``t`` is a tensor of one of ``dtypes``, ``dim``-D, and (unless told otherwise) contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = dtypes[0] if len(dtypes) == 1 else f"one of {dtypes}"
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")


def check_epilogue(m: int, n: int, bias, out: torch.Tensor | None, out_dtype: torch.dtype) -> None:
    """The output dtype, a bias [N] and a caller's ``out`` [M, N] (unit stride along N) of an [M, N] GEMM."""
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in BIAS_DTYPES:
            raise TypeError(f"bias must be one of {BIAS_DTYPES}, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
        if not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous, got strides {bias.stride()}")
    if out is not None:
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out must have shape (M, N) = ({m}, {n}), got {tuple(out.shape)}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must have unit stride along N, got strides {out.stride()}")


def check_device(tensors: dict[str, torch.Tensor | None], interpreted: bool) -> None:
    """All operands on one device, a CUDA one unless triton runs its interpreter (the first named leads the message)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all operands must be on one device, got {devices}")
    lead, device = next(iter(devices.items()))
    if not interpreted and device.type != "cuda":
        raise ValueError(
            f"{lead} must be on a CUDA device (or run triton's interpreter, TRITON_INTERPRET=1), got {device}"
        )


def backend_failed(failed: dict, device: torch.device, what: str, error: Exception) -> None:
    """Records that a faster backend raised on ``device`` (``failed[device]``: the error's first line, which the
    backend's "why unsupported" check reports from then on, so "auto" stays on Triton there) and logs it once."""
    first = str(error).splitlines()[0][:200] if str(error) else ""
    failed[device] = f"{type(error).__name__}: {first}"
    logging.getLogger("ingot").warning("%s on %s (%s); using the Triton kernel", what, device, failed[device])


# Host-side integer helpers for the wrappers' grid and tile arithmetic. Plain Python on purpose: triton.cdiv and
# triton.next_power_of_2 go through Triton's constexpr-function wrapper, a few microseconds a call, and the wrappers
# make ~110 such calls per prefill step of a 32-layer model (cProfile, session 4) - host time the GPU waits for.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def arrival_counters(device: torch.device, size: int, user: str) -> torch.Tensor:
    """int32 zeros on ``device``: one kernel family's arrival counters (split-K tiles, the decode attention's head
    groups), made once per device and user, before any CUDA graph capture (they must not live in a graph's memory
    pool). Every launch leaves the counters it used at zero; launches that share them must not overlap (one stream
    per device, as ingot's engine runs)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{user} first called during CUDA graph capture: run it once eagerly before capturing (its "
                           f"arrival counters must not live in the graph's memory pool)")
    return torch.zeros(size, dtype=torch.int32, device=device)
