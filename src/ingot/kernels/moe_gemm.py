"""Grouped GEMMs of a MoE layer's routed experts, sync-free (CUDA-graph capturable): vLLM / SGLang's fused_moe layout.

A step routes T tokens to top_k experts each: T * top_k assignments, assignment i = (token i // top_k, slot
i % top_k) with expert ``topk_ids.flatten()[i]``.

1. ``moe_align`` sorts the assignments by expert (stable: token order within an expert) and pads each expert's run
   to a multiple of BLOCK_M, entirely on the device (two Triton launches, no host read):
   - sorted_token_ids int32 [max_blocks * BLOCK_M]: assignment ids, padding slots hold T * top_k (never a real id);
   - expert_ids int32 [max_blocks]: the expert of each BLOCK_M-row block (-1 past the used blocks);
   - num_tokens_post_padded int32 [1]: rows used (a multiple of BLOCK_M).
   Buffers are sized for the worst case of this T, so every shape depends on T alone (graph capture needs static
   shapes): at most min(E, T * top_k) experts receive assignments, each wastes < BLOCK_M padding rows, so
   max_rows = T * top_k + min(E, T * top_k) * (BLOCK_M - 1). Decode of one DeepSeek-V3 token (top_k 8, E 256,
   BLOCK_M 16): 128 rows, 8 blocks (the 256-expert bound alone would give 3848 rows, 241 blocks).
2. ``moe_gemm``: one program per (M block, N tile) multiplies BLOCK_M rows of A - gathered through
   sorted_token_ids, row ``id // top_k`` of a per-token A (the first GEMM reads x [T, K] once per token) or row
   ``id`` of a per-assignment A (the second GEMM) - by its block's expert weight W[e] [N, K], and writes each row to
   output row ``id`` of C [T * top_k, N], optionally times the routing weight of the assignment (fp32 epilogue).
   Programs whose block lies past num_tokens_post_padded return at once (the grid is the worst case).

Weight kinds (``ingot.layers.linear``'s, stacked over experts):

============  ======================================  ==========================================================
kind          w [E, N, K], w_s                        A operand (a, a_s) and math
============  ======================================  ==========================================================
bf16          model dtype, w_s None                   a in the same dtype; fp32 accumulation
int8-channel  int8, fp32 [E, N, 1]                    int8 a, fp32 a_s [rows, 1]; exact int32 K loop, then
                                                      acc * a_s * w_s (int8_gemm_channel's epilogue)
int8-block    int8, fp32 [E, cdiv(N, bn), cdiv(K,     int8 a, fp32 a_s [rows, cdiv(K, bk)]; per bk step an int32
              bk)]                                    dot promoted to fp32 times a_s * w_s (int8_gemm_block)
fp8-block     float8_e4m3fn, as int8-block            e4m3 a; fp32 dot per bk step, same promotion (fp8_gemm_block;
                                                      needs ``fp8_supported``)
============  ======================================  ==========================================================

The A scales come from ``ingot.kernels.act_quant`` (per_token_quant_int8 / per_token_group_quant) of the rows as
they are stored (x once per token for the first GEMM). References with the same signatures:
``ingot.quant.moe_ref.moe_align_ref`` / ``moe_gemm_ref``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ingot.kernels import tuning
from ingot.kernels.checks import cdiv, check_device, check_epilogue, check_tensor, next_pow2
from ingot.kernels.tuning import GemmConfig

KINDS = ("bf16", "int8-channel", "int8-block", "fp8-block")
_SCHEME = {"bf16": 0, "int8-channel": 1, "int8-block": 2, "fp8-block": 3}
_QDTYPE = {"int8-channel": torch.int8, "int8-block": torch.int8, "fp8-block": torch.float8_e4m3fn}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# int32 accumulation of int8 products (<= 2^14 each): K below 2^31 / 2^14 cannot overflow (int8_gemm.MAX_K_CHANNEL).
MAX_K_CHANNEL = 2**31 // (128 * 128)

# Alignment tiles: each program of the two alignment kernels owns ALIGN_CHUNK assignments, walked ALIGN_SUB at a
# time as a (SUB, E) one-hot tile (32 x 256 int32 = 32 KB of registers over 4 warps); at most MAX_ALIGN_PROGRAMS
# programs (their per-expert counts, [P, E], are read whole by every program of the second kernel).
ALIGN_SUB = 32
MIN_ALIGN_CHUNK = 256
MAX_ALIGN_PROGRAMS = 64
ALIGN_BLOCKS = 128  # expert_ids written BLOCKS at a time

# Default tiles by the average rows per expert (T * top_k / E), used where no tuned table has the shape (none yet:
# not measured). Decode (DeepSeek-V3 at batch <= 32: <= 1 row per expert) streams each chosen expert's weight once
# per N tile: BLOCK_M 16 (tl.dot's smallest), narrow N tiles for many programs. Prefill: 64 / 128-row tiles.
# BLOCK_K 128: the block kinds need one K quantization block per K step (the wrapper checks the tie).
_CONFIGS: tuple[tuple[int, GemmConfig], ...] = (
    (16, GemmConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (48, GemmConfig(32, 64, 128, group_m=4, num_warps=4, num_stages=4)),
    (96, GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=3)),
    (2**62, GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3)),
)


def default_config(num_tokens: int, top_k: int, num_experts: int) -> GemmConfig:
    """The untuned tiles of a grouped GEMM over ``num_tokens`` x ``top_k`` assignments to ``num_experts`` experts.
    Depends on the routing shape only, so the two GEMMs of a layer share BLOCK_M (and one alignment)."""
    rows = -(-num_tokens * top_k // num_experts)
    return next(cfg for bound, cfg in _CONFIGS if rows <= bound)


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _moe_count_kernel(
    ids_ptr, counts_ptr,  # topk_ids flattened [numel] (int32/int64), int32 [P, E]
    numel, E,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """counts[p, e] = assignments to expert e among program p's CHUNK."""
    p = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    count = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s in range(0, tl.minimum(numel - p * CHUNK, CHUNK), SUB):  # decode: 8 assignments, one step, not CHUNK / SUB
        offs = p * CHUNK + s + tl.arange(0, SUB)
        e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
        count += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + p * E + experts, count, mask=experts < E)


@triton.jit
def _moe_align_kernel(
    ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, post_ptr,
    numel, E, num_programs, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCKS: tl.constexpr,
):
    """Program p places its CHUNK of assignments: the padded start of each expert (exclusive cumsum over experts of
    the padded totals) + the expert's assignments in earlier programs + the rank among earlier ones of its own chunk
    (an exclusive cumsum of the one-hot tile down the chunk). Program 0 also writes the padding slots, the total and
    every block's expert."""
    p = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    progs = tl.arange(0, BLOCK_P)
    counts = tl.load(counts_ptr + progs[:, None] * E + experts[None, :],
                     mask=(progs[:, None] < num_programs) & e_ok[None, :], other=0)  # (BLOCK_P, BLOCK_E)
    total = tl.sum(counts, axis=0)  # (BLOCK_E,)
    before = tl.sum(tl.where(progs[:, None] < p, counts, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded

    base = start + before  # this program's next slot of each expert
    for s in range(0, tl.minimum(numel - p * CHUNK, CHUNK), SUB):
        offs = p * CHUNK + s + tl.arange(0, SUB)
        valid = offs < numel
        e = tl.load(ids_ptr + offs, mask=valid, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # (SUB, BLOCK_E)
        rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        slot = tl.sum(onehot * base[None, :], axis=1) + rank
        tl.store(sorted_ptr + slot, offs, mask=valid)
        base += tl.sum(onehot, axis=0)

    if p == 0:
        used = tl.sum(padded, axis=0)
        tl.store(post_ptr, used)
        pad = (start + total)[:, None] + tl.arange(0, BLOCK_M)[None, :]  # (BLOCK_E, BLOCK_M): each run's padding
        tl.store(sorted_ptr + pad, numel, mask=(pad < end[:, None]) & e_ok[:, None])
        # while, not a for over a run-time bound: triton 3.6's interpreter cannot take one (see act_quant.py)
        b0 = 0
        while b0 < max_blocks:
            blocks = b0 + tl.arange(0, BLOCKS)
            first = blocks * BLOCK_M
            # the block's expert = how many experts' runs end at or before its first row (empty runs included)
            expert = tl.sum(((end[None, :] <= first[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
            tl.store(expert_ids_ptr + blocks, tl.where(first < used, expert, -1), mask=blocks < max_blocks)
            b0 += BLOCKS


@triton.jit
def _moe_tile_ids(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M consecutive M blocks (often one expert's) sweep N together, so the
    expert's weight tile is re-read from L2."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_m_blocks - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _moe_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, topk_w_ptr,  # A [rows, K], A scales, W [E, N, K], W scales, C [numel, N]
    sorted_ptr, expert_ids_ptr, post_ptr,  # the alignment
    N, K, numel, a_row_div, num_m_blocks,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_cm, stride_cn,
    SCHEME: tl.constexpr,  # 0 bf16 (float operands), 1 int8-channel, 2 int8-block, 3 fp8-block
    SCALE_N: tl.constexpr,  # weight block rows (block kinds)
    WS_PER_COLUMN: tl.constexpr,  # the N tile spans several weight block rows
    MUL_ROUTED_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,
    F32_DOT: tl.constexpr,  # float operands multiplied in fp32 IEEE: fp32 models (no TF32) and the interpreter (bf16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _moe_tile_ids(num_m_blocks, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(post_ptr):
        return  # past the used blocks (the grid is sized for the worst case)
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,) assignments
    row_ok = ids < numel
    a_rows = tl.where(row_ok, ids // a_row_div, 0)  # padding rows read row 0 (no load mask); never stored
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = (cols % N).to(tl.int64)  # wrapped: no N mask on loads
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    if SCHEME >= 2:
        as_ptrs = as_ptr + a_rows * stride_asm  # (BLOCK_M,): scale column 0 of each row
        if WS_PER_COLUMN:
            ws_ptrs = ws_ptr + expert * stride_wse + (offs_n // SCALE_N) * stride_wsn
        else:
            ws_ptrs = ws_ptr + expert * stride_wse + ((pid_n * BLOCK_N) // SCALE_N) * stride_wsn

    if SCHEME == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            if SCHEME == 1 or SCHEME == 2:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
            else:  # float / fp8 operands take a float zero (an int 0 does not cast to fp8)
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if SCHEME == 0:
            if F32_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        elif SCHEME == 1:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            if SCHEME == 3:
                dot = tl.dot(a, b, out_dtype=tl.float32)
            else:
                dot = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)  # |dot| <= 2^21: exact in fp32
            xs = tl.load(as_ptrs + kt * stride_ask)  # (BLOCK_M,)
            ws = tl.load(ws_ptrs + kt * stride_wsk)  # (BLOCK_N,) or scalar
            if WS_PER_COLUMN:
                acc += dot * (xs[:, None] * ws[None, :])
            else:
                acc += dot * (xs[:, None] * ws)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if SCHEME == 1:
        xs = tl.load(as_ptr + a_rows * stride_asm)  # (BLOCK_M,)
        ws = tl.load(ws_ptr + expert * stride_wse + offs_n * stride_wsn)  # (BLOCK_N,)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    else:
        y = acc
    if MUL_ROUTED_WEIGHT:
        y = y * tl.load(topk_w_ptr + ids, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + ids[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


# Under TRITON_INTERPRET=1 (read by triton when the kernels above were decorated) triton.jit makes interpreted
# functions that run on any device (numpy); compiled ones need CUDA tensors.
INTERPRETED = not isinstance(_moe_gemm_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------------- wrappers


@dataclass(frozen=True)
class MoEAlignment:
    """Assignments sorted by expert and padded per expert to ``block_m`` rows (see the module docstring).

    sorted_token_ids int32 [max_blocks * block_m], expert_ids int32 [max_blocks], num_tokens_post_padded int32 [1];
    num_tokens T, top_k, num_experts E: the routing they came from (assignment ids are < T * top_k).
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    block_m: int
    num_tokens: int
    top_k: int
    num_experts: int

    @property
    def numel(self) -> int:
        """T * top_k: the assignments, the rows of a per-assignment operand or output."""
        return self.num_tokens * self.top_k

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.shape[0]


def max_aligned_blocks(numel: int, num_experts: int, block_m: int) -> int:
    """Worst-case BLOCK_M blocks of ``numel`` assignments to ``num_experts`` experts (each used expert pads < block_m
    rows, and at most min(E, numel) experts are used)."""
    rows = numel + min(num_experts, numel) * (block_m - 1)
    return cdiv(rows, block_m)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_routing(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[int, int]:
    check_tensor("topk_ids", topk_ids, (torch.int32, torch.int64), 2)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (the GEMM's BLOCK_M), got {block_m!r}")
    t, top_k = topk_ids.shape
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"topk_ids [T, top_k] = {tuple(topk_ids.shape)}: top_k must be in [1, num_experts={num_experts}]")
    return t, top_k


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Sort the assignments of ``topk_ids`` int32/int64 [T, top_k] (values in [0, num_experts); not checked: a read
    would sync) by expert, stable, each expert's run padded to ``block_m`` rows. Two launches, no host sync; output
    shapes depend on (T, top_k, E, block_m) only. Reference: ``ingot.quant.moe_ref.moe_align_ref``."""
    t, top_k = _check_routing(topk_ids, num_experts, block_m)
    check_device({"topk_ids": topk_ids}, INTERPRETED)
    numel = t * top_k
    max_blocks = max_aligned_blocks(numel, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    post = torch.empty(1, dtype=torch.int32, device=device)
    if numel == 0:
        return MoEAlignment(sorted_ids, expert_ids, post.zero_(), block_m, t, top_k, num_experts)
    chunk = max(MIN_ALIGN_CHUNK, next_pow2(cdiv(numel, MAX_ALIGN_PROGRAMS)))
    programs = cdiv(numel, chunk)
    if programs > MAX_ALIGN_PROGRAMS or chunk % ALIGN_SUB:
        raise ValueError(f"alignment of {numel} assignments: {programs} programs of {chunk} (at most "
                         f"{MAX_ALIGN_PROGRAMS}, chunks a multiple of {ALIGN_SUB})")
    counts = torch.empty((programs, num_experts), dtype=torch.int32, device=device)
    flat = topk_ids.view(-1)
    block_e = max(2, next_pow2(num_experts))  # tiles of at least 2: no 1-wide aranges to compile
    with _device_ctx(topk_ids):
        _moe_count_kernel[(programs,)](flat, counts, numel, num_experts, CHUNK=chunk, SUB=ALIGN_SUB, BLOCK_E=block_e)
        _moe_align_kernel[(programs,)](
            flat, counts, sorted_ids, expert_ids, post,
            numel, num_experts, programs, max_blocks,
            BLOCK_M=block_m, CHUNK=chunk, SUB=ALIGN_SUB, BLOCK_E=block_e,
            BLOCK_P=max(2, next_pow2(programs)), BLOCKS=ALIGN_BLOCKS,
        )
    return MoEAlignment(sorted_ids, expert_ids, post, block_m, t, top_k, num_experts)


def _check_moe_operands(
    a: torch.Tensor,
    a_s: torch.Tensor | None,
    w: torch.Tensor,
    w_s: torch.Tensor | None,
    align: MoEAlignment,
    kind: str,
    block_size: tuple[int, int],
    topk_weights: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Shapes, dtypes and ties of ``moe_gemm`` (shared with its reference); returns (N, K, a_row_div)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(align, MoEAlignment):
        raise TypeError(f"align must be a MoEAlignment (from moe_align), got {type(align).__name__}")
    if kind == "bf16":
        check_tensor("a", a, FLOAT_DTYPES, 2)
        check_tensor("w", w, (a.dtype,), 3)
        if a_s is not None or w_s is not None:
            raise ValueError("a bf16 (unquantized) grouped GEMM takes no scales: a_s and w_s must be None")
    else:
        check_tensor("a", a, (_QDTYPE[kind],), 2)
        check_tensor("w", w, (_QDTYPE[kind],), 3)
        check_tensor("a_s", a_s, (torch.float32,), 2, contiguous=False)
        check_tensor("w_s", w_s, (torch.float32,), 3)
    e, n, k = w.shape
    if e != align.num_experts:
        raise ValueError(f"w [E, N, K] = {tuple(w.shape)} has {e} experts, the alignment routes to {align.num_experts}")
    if a.shape[1] != k:
        raise ValueError(f"a [rows, K] = {tuple(a.shape)} and w [E, N, K] = {tuple(w.shape)} disagree on K: {a.shape[1]} != {k}")
    if n == 0 or k == 0:
        raise ValueError(f"empty GEMM: N = {n}, K = {k} (w {tuple(w.shape)})")
    if a.shape[0] == align.numel:
        a_row_div = 1  # one row per assignment (the second GEMM)
    elif a.shape[0] == align.num_tokens:
        a_row_div = align.top_k  # one row per token, read by each of its top_k assignments (the first GEMM)
    else:
        raise ValueError(f"a has {a.shape[0]} rows: expected T = {align.num_tokens} (one per token) or "
                         f"T * top_k = {align.numel} (one per assignment)")
    rows = a.shape[0]
    if kind == "int8-channel":
        if tuple(a_s.shape) != (rows, 1):
            raise ValueError(f"a_s must be per row, shape ({rows}, 1), got {tuple(a_s.shape)}")
        if tuple(w_s.shape) != (e, n, 1):
            raise ValueError(f"w_s must be per expert per output channel, shape ({e}, {n}, 1), got {tuple(w_s.shape)}")
        if k >= MAX_K_CHANNEL:
            raise ValueError(f"K = {k} may overflow the int32 accumulator; K must be < {MAX_K_CHANNEL}")
    elif kind != "bf16":
        bn, bk = block_size
        if bn < 1 or bk < 16 or bk & (bk - 1):
            raise ValueError(f"block_size (bn, bk) needs bn >= 1 and bk a power of two >= 16, got {tuple(block_size)}")
        kb = cdiv(k, bk)
        if tuple(a_s.shape) != (rows, kb):
            raise ValueError(f"a_s must be per row per {bk}-group, shape ({rows}, {kb}), got {tuple(a_s.shape)}")
        if tuple(w_s.shape) != (e, cdiv(n, bn), kb):
            raise ValueError(f"w_s must be per expert per {bn}x{bk} block, shape ({e}, {cdiv(n, bn)}, {kb}), "
                             f"got {tuple(w_s.shape)}")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, (torch.float32,), 2)
        if tuple(topk_weights.shape) != (align.num_tokens, align.top_k):
            raise ValueError(f"topk_weights must be [T, top_k] = ({align.num_tokens}, {align.top_k}), "
                             f"got {tuple(topk_weights.shape)}")
    check_epilogue(align.numel, n, None, out, out_dtype)
    if out is not None and not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    return n, k, a_row_div


def moe_gemm(
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
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped GEMM over experts: C[i] = (A[row(i)] @ W[expert(i)].T) (* topk_weights[i]) for every assignment i.

    a: [T, K] (one row per token: row(i) = i // top_k) or [T * top_k, K] (one per assignment: row(i) = i);
       ``kind``'s activation dtype (the model dtype for "bf16", int8 / float8_e4m3fn otherwise), contiguous.
    a_s: None ("bf16"), fp32 [rows, 1] ("int8-channel"), fp32 [rows, cdiv(K, bk)] (block kinds; row- or column-major).
    w: [E, N, K] stacked expert weights; w_s: None, fp32 [E, N, 1], or fp32 [E, cdiv(N, bn), cdiv(K, bk)].
    align: ``moe_align(topk_ids, E, block_m)`` with block_m == the config's BLOCK_M.
    topk_weights: fp32 [T, top_k] routing weights multiplied in the fp32 epilogue, or None.
    Returns C [T * top_k, N] in ``out_dtype`` (written into ``out`` when given); every row is written.
    fp8-block needs ``ingot.kernels.fp8_gemm.fp8_supported``. Reference: ``ingot.quant.moe_ref.moe_gemm_ref``.
    """
    n, k, a_row_div = _check_moe_operands(a, a_s, w, w_s, align, kind, block_size, topk_weights, out_dtype, out)
    check_device({"a": a, "a_s": a_s, "w": w, "w_s": w_s, "topk_weights": topk_weights, "out": out,
                  "sorted_token_ids": align.sorted_token_ids}, INTERPRETED)
    if kind == "fp8-block" and not INTERPRETED:
        from ingot.kernels.fp8_gemm import fp8_supported

        if not fp8_supported(a.device):
            raise RuntimeError(f"fp8-block grouped GEMM needs FP8 tensor cores (compute capability >= 8.9) on {a.device}")
    c = torch.empty((align.numel, n), dtype=out_dtype, device=a.device) if out is None else out
    if align.numel == 0:
        return c
    bn, bk = block_size
    if config is None:
        config = tuning.lookup(f"moe_gemm_{kind.replace('-', '_')}", n, k, align.num_tokens, a.device) or \
            default_config(align.num_tokens, align.top_k, align.num_experts)
        if config.block_m != align.block_m:  # a tuned table's tiles, bent to the alignment's blocks
            config = replace(config, block_m=align.block_m)
        if kind in ("int8-block", "fp8-block") and config.block_k != bk:
            config = replace(config, block_k=bk)
    if not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, got {type(config).__name__}")
    if config.block_m != align.block_m:
        raise ValueError(f"config.block_m = {config.block_m} must equal the alignment's block_m = {align.block_m}: "
                         "each M block holds one expert's rows")
    if config.split_k != 1:
        raise ValueError(f"moe_gemm does not split K, got config.split_k = {config.split_k}")
    block = kind in ("int8-block", "fp8-block")
    if block and config.block_k != bk:
        raise ValueError(f"config.block_k = {config.block_k} must equal the K quantization block {bk}: one scale per K step")
    a_s_ = a_s if a_s is not None else a
    w_s_ = w_s if w_s is not None else w
    grid = (align.max_blocks * cdiv(n, config.block_n),)
    with _device_ctx(a):
        _moe_gemm_kernel[grid](
            a, a_s_, w, w_s_, c, topk_weights if topk_weights is not None else c,
            align.sorted_token_ids, align.expert_ids, align.num_tokens_post_padded,
            n, k, align.numel, a_row_div, align.max_blocks,
            a.stride(0), a.stride(1), a_s_.stride(0), a_s_.stride(1),
            w.stride(0), w.stride(1), w.stride(2), w_s_.stride(0), w_s_.stride(1), w_s_.stride(2) if w_s_.dim() == 3 else 0,
            c.stride(0), c.stride(1),
            SCHEME=_SCHEME[kind], SCALE_N=bn if block else 1,
            WS_PER_COLUMN=block and bn % config.block_n != 0,
            MUL_ROUTED_WEIGHT=topk_weights is not None, EVEN_K=k % config.block_k == 0,
            F32_DOT=kind == "bf16" and (INTERPRETED or a.dtype == torch.float32),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return c
