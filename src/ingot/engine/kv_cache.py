"""The paged KV cache: per-layer cache tensors, a block allocator over them, and how many blocks fit.

A block holds ``block_size`` consecutive tokens of one sequence in every layer. Layer i's cache is
k [num_blocks, block_size, Hkv, Dk] and v [num_blocks, block_size, Hkv, Dv] (or None for MLA's shared latent cache),
as ingot.layers.attention.KVSpec describes.
"""

from __future__ import annotations

import math
from collections import deque

import torch

# On CUDA, memory the engine keeps out of the KV pool for what the forward pass allocates on top of the weights:
# per batched token, activations of the widest layer (Llama-3-8B's MLP: 2 x 14336 bf16 gate/up = 57 KB, plus the
# residual stream and attention scratch) with room for the allocator's fragmentation, ~256 KB; per sequence, the
# float32 logits and their sampling copies (128K vocab x 4 B x 3 = 1.5 MB); plus CUDA graph pools and cuBLAS
# workspaces, a fixed 512 MiB.
ACTIVATION_BYTES_PER_TOKEN = 256 * 1024
LOGIT_COPIES = 3
FIXED_RESERVE_BYTES = 512 * 2**20


def kv_bytes_per_token(specs, dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all layers: sum of Hkv * (Dk + Dv) elements (Dk alone when shared_kv).

    SmolLM2-135M: 30 layers x 3 x (64 + 64) x 2 B = 23 KB; Llama-3-8B: 32 x 8 x 256 x 2 B = 128 KB;
    DeepSeek-V3 MLA: 61 x 1 x 576 x 2 B = 70 KB.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(s.num_kv_heads * (s.head_dim_k + (0 if s.shared_kv else s.head_dim_v)) for s in specs) * itemsize


def reserve_bytes(max_num_batched_tokens: int, max_num_seqs: int, vocab_size: int) -> int:
    """What the forward pass needs beside the weights and the KV pool (see ACTIVATION_BYTES_PER_TOKEN)."""
    return (
        max_num_batched_tokens * ACTIVATION_BYTES_PER_TOKEN
        + max_num_seqs * vocab_size * 4 * LOGIT_COPIES
        + FIXED_RESERVE_BYTES
    )


def cuda_num_blocks(
    specs, block_size: int, dtype: torch.dtype, device: torch.device, mem_fraction: float, reserve: int
) -> int:
    """Blocks that fit in ``mem_fraction`` of the GPU's memory after what is allocated now (the model) and
    ``reserve`` bytes (activations), never more than is free on the device (other processes)."""
    free, total = torch.cuda.mem_get_info(device)
    used = torch.cuda.memory_allocated(device)
    budget = min(mem_fraction * total - used, free) - reserve
    per_block = kv_bytes_per_token(specs, dtype) * block_size
    return max(0, int(budget // per_block))


class BlockAllocator:
    """Hands out cache block ids; freed blocks are reused first-in first-out."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"BlockAllocator: {n} blocks asked, {len(self._free)} free of {self.num_blocks}")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise RuntimeError(f"BlockAllocator: block {i} freed but not allocated")
            self._used.remove(i)
            self._free.append(i)


class KVCache:
    """The cache tensors of every attention layer and the allocator of their blocks.

    specs: model.kv_cache_spec() (one KVSpec per attention layer). Tensors are zero-filled: a padded decode row
    reads nothing, but a fresh pool holding NaN garbage would still poison a masked-out dot on some kernels.
    """

    def __init__(self, specs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str):
        if block_size < 1:
            raise ValueError(f"KVCache: block_size must be >= 1, got {block_size}")
        self.specs = list(specs)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.allocator = BlockAllocator(num_blocks)
        self.caches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for s in self.specs:
            k = torch.zeros((num_blocks, block_size, s.num_kv_heads, s.head_dim_k), dtype=dtype, device=device)
            v = None if s.shared_kv else torch.zeros(
                (num_blocks, block_size, s.num_kv_heads, s.head_dim_v), dtype=dtype, device=device
            )
            self.caches.append((k, v))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + (0 if v is None else v.nbytes) for k, v in self.caches)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)
