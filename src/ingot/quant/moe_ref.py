"""References of the grouped MoE kernels (``ingot.kernels.moe_gemm``), in plain PyTorch with the same signatures.

``moe_align_ref``: the same alignment (stable sort by expert, runs padded to block_m) from torch ops; like the
kernel it never reads the device from the host. ``moe_gemm_ref``: each expert's rows through the single-GEMM
references of ``ingot.quant.ref`` (int8_gemm_channel_ref / int8_gemm_block_ref / fp8_gemm_block_ref, fp32 out), then
the routing weight in fp32 and one cast: the kernel's operation order, so under the interpreter the integer kinds
match it bit for bit. It loops over experts on the host (a yardstick, not a fast path).
"""

from __future__ import annotations

import torch

from ingot.kernels.moe_gemm import MoEAlignment, _check_moe_operands, _check_routing, max_aligned_blocks
from ingot.quant import ref


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Reference of ``ingot.kernels.moe_gemm.moe_align``: topk_ids [T, top_k] -> MoEAlignment. Slots past
    num_tokens_post_padded hold T * top_k (the kernel leaves them unwritten: no reader looks there)."""
    t, top_k = _check_routing(topk_ids, num_experts, block_m)
    numel = t * top_k
    max_blocks = max_aligned_blocks(numel, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within one
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    end = padded.cumsum(0)
    start = end - padded
    first_of = counts.cumsum(0) - counts  # each expert's first position in `order`
    sorted_e = flat[order]
    slot = start[sorted_e] + torch.arange(numel, device=device) - first_of[sorted_e]
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, slot, order.int())
    used = padded.sum()
    first = torch.arange(max_blocks, device=device) * block_m
    expert = torch.searchsorted(end, first, right=True)  # experts whose runs end at or before the block's first row
    expert_ids = torch.where(first < used, expert, -1).int()
    return MoEAlignment(sorted_ids, expert_ids, used.view(1).int(), block_m, t, top_k, num_experts)


def moe_gemm_ref(
    a: torch.Tensor,
    a_s: torch.Tensor | None,
    w: torch.Tensor,
    w_s: torch.Tensor | None,
    align: MoEAlignment,
    kind: str,
    block_size: tuple[int, int] = (128, 128),
    topk_weights: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``ingot.kernels.moe_gemm.moe_gemm`` (same arguments; ``config`` is ignored): for each used
    expert e, its assignments' rows of ``a`` times w[e].T with the single-GEMM reference of ``kind`` in fp32,
    times topk_weights (fp32), cast to ``out_dtype``. "bf16" multiplies in float32 (x.float() @ w.float().T)."""
    _, _, a_row_div = _check_moe_operands(a, a_s, w, w_s, align, kind, block_size, topk_weights, out_dtype, out)
    c = torch.empty((align.numel, w.shape[1]), dtype=out_dtype, device=a.device) if out is None else out
    used = int(align.num_tokens_post_padded.item())
    ids = align.sorted_token_ids[:used].long()
    experts = align.expert_ids[: used // align.block_m].long().repeat_interleave(align.block_m)
    real = ids < align.numel
    ids, experts = ids[real], experts[real]
    if not torch.equal(ids.sort().values, torch.arange(align.numel, device=ids.device)):
        raise ValueError("alignment: sorted_token_ids must hold every assignment exactly once below "
                         "num_tokens_post_padded")
    weights = topk_weights.reshape(-1) if topk_weights is not None else None
    for e in experts.unique().tolist():
        i = ids[experts == e]
        rows = i // a_row_div
        if kind == "bf16":
            y = a[rows].float() @ w[e].float().T
        elif kind == "int8-channel":
            y = ref.int8_gemm_channel_ref(a[rows], a_s[rows], w[e], w_s[e], out_dtype=torch.float32)
        elif kind == "int8-block":
            y = ref.int8_gemm_block_ref(a[rows], a_s[rows], w[e], w_s[e], block_size, out_dtype=torch.float32)
        else:
            y = ref.fp8_gemm_block_ref(a[rows], a_s[rows], w[e], w_s[e], block_size, out_dtype=torch.float32)
        if weights is not None:
            y = y * weights[i, None]
        c[i] = y.to(out_dtype)
    return c
