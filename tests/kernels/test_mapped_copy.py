"""kernels.mapped_copy: the kernel under the interpreter on CPU tensors (CPU CI), pinned host <-> GPU on CUDA (marker
gpu), the refusals."""

import pytest
import torch

from ingot.kernels.mapped_copy import MAX_PAIRS, mapped_copy
from ingot.quant.ref import mapped_copy_ref

DTYPES = [torch.int64, torch.int32, torch.float32, torch.bfloat16]


def _pairs(sizes, dtypes, gen, src_device="cpu", dst_device="cpu", pin=False):
    pairs = []
    for n, dt in zip(sizes, dtypes):
        src = torch.randint(-2**30, 2**30, (n,), generator=gen).to(dt)
        dst = torch.full((n,), -7, dtype=dt)
        src, dst = src.to(src_device), dst.to(dst_device)
        if pin:
            src = src.pin_memory() if src.device.type == "cpu" else src
            dst = dst.pin_memory() if dst.device.type == "cpu" else dst
        pairs.append((dst, src))
    return pairs


@pytest.mark.parametrize("sizes", [[1], [2, 3000], [2050, 4, 1], [0, 6]])
def test_matches_reference(sizes):
    # odd lengths (one bfloat16 pair of 2 elements = one word), a pair over two programs (3000 int32 = 3 programs)
    gen = torch.Generator().manual_seed(len(sizes))
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(sizes))]
    sizes = [n + (n % 2 if dt == torch.bfloat16 else 0) for n, dt in zip(sizes, dtypes)]  # whole words
    pairs = _pairs(sizes, dtypes, gen)
    expected = [(d.clone(), s) for d, s in pairs]
    mapped_copy_ref(expected)
    mapped_copy(pairs)
    for (d, _), (e, _) in zip(pairs, expected):
        assert torch.equal(d, e)


def test_slices_at_odd_offsets():
    # the engine's steady step copies host_i64[p:] next to input_ids[:p]: views that start mid-buffer
    src = torch.arange(30, dtype=torch.int64)
    dst = torch.zeros(30, dtype=torch.int64)
    tokens = torch.tensor([101, 102, 103], dtype=torch.int64)
    mapped_copy([(dst[3:], src[3:]), (dst[:3], tokens)])
    assert dst.tolist() == [101, 102, 103] + list(range(3, 30))


def test_refusals():
    a32, b32 = torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="1 to 3"):
        mapped_copy([])
    with pytest.raises(ValueError, match="1 to 3"):
        mapped_copy([(a32, b32)] * (MAX_PAIRS + 1))
    with pytest.raises(ValueError, match="shares dtype and length"):
        mapped_copy([(a32, torch.zeros(4, dtype=torch.float32))])
    with pytest.raises(ValueError, match="shares dtype and length"):
        mapped_copy([(a32, torch.zeros(5, dtype=torch.int32))])
    with pytest.raises(ValueError, match="multiple of 4"):
        mapped_copy([(torch.zeros(3, dtype=torch.int8), torch.zeros(3, dtype=torch.int8))])
    with pytest.raises(ValueError, match="1-D and contiguous"):
        mapped_copy([(torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32))])
    with pytest.raises(ValueError, match="1-D and contiguous"):
        mapped_copy([(torch.zeros(8, dtype=torch.int32)[::2], b32)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        mapped_copy([(a32, [0, 0, 0, 0])])


def test_host_to_host():
    # compiled Triton with no GPU involved: plain copies (under the interpreter, the kernel on CPU tensors)
    a, b = torch.zeros(6, dtype=torch.int64), torch.arange(6, dtype=torch.int64)
    mapped_copy([(a, b)])
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d", "mixed"])
def test_gpu_pinned_host_and_device(direction):
    gen = torch.Generator().manual_seed(3)
    sizes, dtypes = [1, 4099, 24], [torch.int64, torch.int32, torch.float32]
    if direction == "h2d":
        pairs = _pairs(sizes, dtypes, gen, "cpu", "cuda", pin=True)
    elif direction == "d2h":
        pairs = _pairs(sizes, dtypes, gen, "cuda", "cpu", pin=True)
    elif direction == "d2d":
        pairs = _pairs(sizes, dtypes, gen, "cuda", "cuda")
    else:  # the engine's step: host staging -> device, and device ids -> device
        pairs = _pairs(sizes[:2], dtypes[:2], gen, "cpu", "cuda", pin=True) + _pairs(sizes[2:], dtypes[2:], gen,
                                                                                    "cuda", "cuda")
    expected = [(d.clone(), s) for d, s in pairs]
    mapped_copy_ref(expected)
    mapped_copy(pairs)
    torch.cuda.synchronize()
    for (d, _), (e, _) in zip(pairs, expected):
        assert torch.equal(d.cpu(), e.cpu())


@pytest.mark.gpu
def test_gpu_refuses_pageable_host_memory():
    with pytest.raises(ValueError, match="not pinned"):
        mapped_copy([(torch.zeros(4, dtype=torch.int32, device="cuda"), torch.zeros(4, dtype=torch.int32))])
