"""Small copies between pinned host memory and the GPU in one kernel launch, without the copy engine.

A decode step's boundary is a handful of tiny copies: the sampled ids to the host (8 bytes a sequence), the next
step's positions, slots and block-table columns from pinned host staging to the device (a few KB), the pending ids
device to device. ``torch`` issues each as a cudaMemcpyAsync, which the copy engine serves: each hand-over between a
kernel and the copy engine, or between two copies, left the GPU idle for ~3-9 us (H100, engine/NOTES.md, session 23:
argmax -> ids to the host -> inputs to the device spent ~19 us idle a step). A kernel reads and writes pinned host
memory directly over PCIe (it is mapped into the device's address space), so the same bytes move inside kernels
that follow each other like any other launch (~1 us apart).

``mapped_copy(pairs)``: dst.copy_(src) for up to MAX_PAIRS (dst, src) pairs in one launch. Every tensor is 1-D and
contiguous; a pair shares dtype and length; host tensors must be pinned where a GPU is involved. The bytes move as
32-bit words (int64 ids as two words each), so every tensor's size must be a multiple of 4 bytes. Where no GPU is
involved (CPU tensors, compiled Triton) the pairs are plain ``copy_``; under TRITON_INTERPRET=1 the kernel itself runs
on CPU tensors (tests). Destinations must not overlap one another or any source: the pairs run in parallel.
Reference: ``ingot.quant.ref.mapped_copy_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PAIRS = 3
BLOCK = 1024  # 32-bit words a program moves: 4 KB; a decode step's largest pair (the block table) is a few programs


@triton.jit
def _mapped_copy_kernel(
    dst0, src0, n0, dst1, src1, n1, dst2, src2, n2,  # int32 words; a pair of length 0 is skipped
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if pair == 0:
        tl.store(dst0 + offs, tl.load(src0 + offs, mask=offs < n0), mask=offs < n0)
    elif pair == 1:
        tl.store(dst1 + offs, tl.load(src1 + offs, mask=offs < n1), mask=offs < n1)
    else:
        tl.store(dst2 + offs, tl.load(src2 + offs, mask=offs < n2), mask=offs < n2)


INTERPRETED = not isinstance(_mapped_copy_kernel, triton.runtime.JITFunction)


def _words(name: str, t: torch.Tensor) -> torch.Tensor:
    """t's bytes as int32 words (a view)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mapped_copy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"mapped_copy: {name} must be 1-D and contiguous, got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")
    if (t.numel() * t.element_size()) % 4:
        raise ValueError(f"mapped_copy: {name} holds {t.numel() * t.element_size()} bytes ({t.dtype} x {t.numel()}); "
                         "the kernel moves 32-bit words, so the size must be a multiple of 4")
    return t.view(torch.uint8).view(torch.int32)


def mapped_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for each (dst, src) in ``pairs`` (at most MAX_PAIRS), in one kernel launch where a GPU is
    involved: 1-D contiguous tensors, each pair of one dtype and length, on one CUDA device or in pinned host memory
    (the kernel reads / writes those through the mapping). Queued on the current stream; nothing waits."""
    if not 1 <= len(pairs) <= MAX_PAIRS:
        raise ValueError(f"mapped_copy: 1 to {MAX_PAIRS} (dst, src) pairs, got {len(pairs)}")
    words, devices = [], set()
    for i, (dst, src) in enumerate(pairs):
        d, s = _words(f"dst{i}", dst), _words(f"src{i}", src)
        if dst.dtype != src.dtype or dst.numel() != src.numel():
            raise ValueError(f"mapped_copy: pair {i} has dst {dst.dtype} x {dst.numel()} and src {src.dtype} x "
                             f"{src.numel()}: a pair shares dtype and length")
        words.append((d, s))
        devices.update(t.device for t in (dst, src) if t.device.type == "cuda")
    if len(devices) > 1:
        raise ValueError(f"mapped_copy: tensors on several devices {sorted(map(str, devices))}")
    if not devices and not INTERPRETED:
        for dst, src in pairs:  # host to host: nothing for a kernel to do
            dst.copy_(src)
        return
    if devices:
        for i, (dst, src) in enumerate(pairs):
            for name, t in (("dst", dst), ("src", src)):
                if t.device.type != "cuda" and not t.is_pinned():
                    raise ValueError(f"mapped_copy: {name}{i} is host memory that is not pinned: the GPU can only "
                                     "reach page-locked host memory (torch.empty(..., pin_memory=True))")
    while len(words) < MAX_PAIRS:
        words.append((words[0][0], words[0][1][:0]))  # length 0: no program of it loads or stores
    lengths = [s.numel() for _, s in words]
    grid = (triton.cdiv(max(max(lengths), 1), BLOCK), MAX_PAIRS)
    args = []
    for (d, s), n in zip(words, lengths):
        args += [d, s, n]
    if devices:
        with torch.cuda.device(devices.pop()):
            _mapped_copy_kernel[grid](*args, BLOCK=BLOCK)
    else:
        _mapped_copy_kernel[grid](*args, BLOCK=BLOCK)
