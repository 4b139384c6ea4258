"""Pull the first bytes of a tensor into the GPU's L2 cache without waiting for them (sm_90+).

``l2_prefetch(t, nbytes)`` launches a few programs whose threads each issue one ``cp.async.bulk.prefetch.L2`` (Hopper's
bulk prefetch: one instruction asks for up to CHUNK contiguous bytes, nothing is returned to registers) with an
evict-last L2 policy, then exit; the copy engine keeps fetching after the kernel ends. Nothing is written, so no
result depends on it and the reference is doing nothing: on devices without the instruction (CPU, the interpreter,
GPUs before sm_90) ``supported`` is False and the call is a no-op.

Why: a batch-1 decode step alternates linears that stream their weight from HBM and chains of small latency-bound
kernels (norms, rotary, attention, quantization) during which HBM idles. The engine launches this on a side stream
after each linear, for the next linear's weight (ingot.engine.weight_prefetch), so that weight is partly in L2 when
its GEMM starts. Decode-like chain on the H100 (32 Llama-3-8B layers, int8-channel, one CUDA graph; kernels NOTES
session 16): 101.3 -> 97.3 us per layer at batch 1, 110.7 -> 106.7 at batch 16. Programs and CHUNK are what that
chain measured best: more programs (each issuing fewer prefetches) and fewer (each issuing more) were both slower.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ingot.kernels.checks import cdiv

CHUNK = 16384  # bytes per bulk prefetch (a multiple of 16, the instruction's granule)
PER_PROG = 128  # prefetches per program: one per thread of 4 warps


@triton.jit
def _l2_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr):
    pid = tl.program_id(0)
    off = (pid * PER_PROG + tl.arange(0, PER_PROG)).to(tl.int64) * CHUNK
    size = tl.maximum(tl.minimum(nbytes - off, CHUNK), 0).to(tl.int32)  # the last chunk is short; past the end: 0
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + off, size], dtype=tl.int32, is_pure=False, pack=1)


INTERPRETED = not isinstance(_l2_prefetch_kernel, triton.runtime.JITFunction)


def supported(device: torch.device) -> bool:
    """Whether ``l2_prefetch`` does anything on ``device``: a CUDA GPU of compute capability 9.0 or newer, compiled."""
    device = torch.device(device)
    return device.type == "cuda" and not INTERPRETED and torch.cuda.get_device_capability(device) >= (9, 0)


def l2_prefetch(t: torch.Tensor, nbytes: int | None = None) -> None:
    """Ask L2 for the first ``nbytes`` (default: all) bytes of ``t``'s storage, on the current stream; no-op where not
    ``supported``. t must be contiguous (its bytes are one range); nbytes is rounded down to whole 16-byte granules."""
    if not supported(t.device):
        return
    if not t.is_contiguous():
        raise ValueError(f"l2_prefetch: tensor of shape {tuple(t.shape)} is not contiguous")
    size = t.numel() * t.element_size()
    n = size if nbytes is None else min(int(nbytes), size)
    n -= n % 16
    if n <= 0:
        return
    if t.data_ptr() % 16:
        raise ValueError(f"l2_prefetch: data pointer {t.data_ptr():#x} is not 16-byte aligned")
    grid = (cdiv(cdiv(n, CHUNK), PER_PROG),)
    with torch.cuda.device(t.device):
        _l2_prefetch_kernel[grid](t.view(-1).view(torch.uint8), n, CHUNK=CHUNK, PER_PROG=PER_PROG, num_warps=4)
