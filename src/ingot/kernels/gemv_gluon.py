"""W4A16 GEMV (M = 1) in Gluon, triton's explicit-layout dialect: the decode step of int4-group linears on CUDA.

Why not the Triton GEMV (``weight_only._w4a16_gemv_kernel``): at M = 1 an int4 weight is one multiply-add per half
byte, so the unpack must cost ~3 instructions per weight for the FMA units to keep up with HBM. Compiled for sm_90,
the Triton kernel's K loop spends 8.8 SASS instructions per weight (session 17, kernels/NOTES.md): triton places the
packed tile with its rows across lanes (4-byte loads), converts x through shared memory every step, reduces across
lanes every step, and its `(v & mask) | exponent` becomes two LOP3s (two immediates). It streamed 1.0-2.1 TB/s on
the H100 (W4A16 2.5x BF16 on 3 of 9 bench shapes).

Here every layout is chosen (one 4-D blocked layout, ``_layout``): a thread owns R rows x VEC = 4 consecutive packed
words (16-byte loads) and their 8 nibbles each, all in registers; x comes as the matching 32 bf16 (four 16-byte
loads, replicated over the rows' lanes from L1). Nibble i of a word is shifted to mantissa bits 19-22 and OR-ed
under the exponent of 1.0, giving f = 1 + u / 16 for the stored u = q + 8 (a shift and one LOP3: the exponent is a
kernel argument, so it sits in a register), and f . x accumulates with FFMA in the thread; then q . x = 16 (f . x) -
24 sum(x) per thread and step, scaled by the row's group scale (a thread's 4 words = 32 weights lie in one group of
>= 32). Lanes are reduced once, after the K loop. The next step's weight words, x and scales are loaded before the
current step's math (registers double-buffered). SASS: 3.9 / 4.4 / 5.4 instructions per weight in the
loop at R 8 / 4 / 2; the tables' tiles ran 2.04-3.12x BF16 on the 9 bench shapes (kernels/NOTES.md, session 17).

Split-K as the Triton kernels (one launch: each split stores an fp32 partial row block, bumps the tile's counter,
the last split sums the partials in split order), so results are deterministic. Precision: the same f = 1 + u / 16
sums as the Triton GEMV, fp32 throughout (relative error vs the fp32 reference ~2e-7 on the bench shapes).

Runs where ``unsupported`` is None: CUDA (not the interpreter), M = 1, K a multiple of the K step, 16-byte aligned
contiguous operands. Everything else stays on the Triton kernels (``weight_only.w4a16_gemm`` decides).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ingot.kernels.checks import cdiv
from ingot.kernels.tuning import GemmConfig

VEC = 4  # packed words per thread and row: one 16-byte load
EXP_ONE = 0x3F800000  # fp32 1.0's bits; passed as an argument so ptxas keeps it in a register (one LOP3 per weight)
BLOCK_KS = (256, 512, 1024)  # K steps: C = block_k / 32 lanes along a row, 8, 16 or 32


def tile_shape(config: GemmConfig) -> tuple[int, int]:
    """(R, C) of a "gluon" GEMV config: rows per thread, lanes along a row. block_k = C x VEC x 8; block_n = R x
    (32 / C) lanes x num_warps."""
    c = config.block_k // (VEC * 8)
    rows_per_pass = (32 // c) * config.num_warps
    return config.block_n // rows_per_pass, c


def unsupported(x: torch.Tensor, w_packed: torch.Tensor, w_s: torch.Tensor, k: int, group_size: int,
                config: GemmConfig) -> str | None:
    """Why this GEMV cannot run this call (None: it can)."""
    if x.device.type != "cuda" or torch.version.hip is not None:
        return "not a CUDA device"
    if x.shape[0] != 1:
        return f"M = {x.shape[0]} (the GEMV takes M = 1)"
    if config.block_k not in BLOCK_KS:
        return f"block_k {config.block_k} (one of {BLOCK_KS})"
    r, c = tile_shape(config)
    if r < 1 or config.block_n != r * (32 // c) * config.num_warps:
        return f"block_n {config.block_n} is not R x {32 // c} lanes x {config.num_warps} warps"
    if k % config.block_k:
        return f"K = {k} is not a multiple of the K step {config.block_k}"
    if group_size % (VEC * 8) or config.block_k % group_size:
        return f"group_size {group_size}: a thread's {VEC * 8} weights must lie in one group, a step in whole groups"
    if not (x.is_contiguous() and w_packed.is_contiguous() and w_s.stride(1) == 1):
        return "non-contiguous operands"
    if x.data_ptr() % 16 or w_packed.data_ptr() % 16 or (k // 8) % VEC:
        return "operands not 16-byte aligned"
    return None


@gluon.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # x [1, K], w int32 [N, K / 8], w_s [N, groups], ...
    N, K_TILES_PER_SPLIT, K_TILES,
    stride_wn, stride_wsn,
    exp_one,  # EXP_ONE
    GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
    R: gl.constexpr, C: gl.constexpr, VEC: gl.constexpr,
):
    W: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = R * (32 // C) * W
    BLOCK_P: gl.constexpr = C * VEC  # packed words per row per step
    BLOCK_K: gl.constexpr = BLOCK_P * 8
    # (rows, lanes along a row, VEC words, 8 nibbles): a thread owns R rows x VEC words x 8 nibbles
    L4: gl.constexpr = gl.BlockedLayout(size_per_thread=[R, 1, VEC, 8], threads_per_warp=[32 // C, C, 1, 1],
                                        warps_per_cta=[W, 1, 1, 1], order=[3, 2, 1, 0])
    PL: gl.constexpr = gl.SliceLayout(3, L4)  # (BLOCK_N, C, VEC) packed words
    XL: gl.constexpr = gl.SliceLayout(0, L4)  # (C, VEC, 8) x
    DL: gl.constexpr = gl.SliceLayout(2, PL)  # (BLOCK_N, C) one sum per thread and row
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    kt0 = pid_k * K_TILES_PER_SPLIT
    kt1 = gl.minimum(kt0 + K_TILES_PER_SPLIT, K_TILES)  # > kt0: the host launches no empty split

    # rows past N read row N - 1 (never stored)
    rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, PL))), N - 1)
    pc = gl.arange(0, C, layout=gl.SliceLayout(0, gl.SliceLayout(2, PL)))
    pv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, PL)))
    w_ptrs = (w_ptr + rows.to(gl.int64)[:, None, None] * stride_wn + kt0 * BLOCK_P
              + (pc * VEC)[None, :, None] + pv[None, None, :])
    xc = gl.arange(0, C, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    xv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    xi = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    x_ptrs = x_ptr + kt0 * BLOCK_K + (xc * (VEC * 8))[:, None, None] + (xv * 8)[None, :, None] + xi[None, None, :]
    dc = gl.arange(0, C, layout=gl.SliceLayout(0, DL))
    drows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, DL)), N - 1)
    ws_ptrs = (ws_ptr + drows.to(gl.int64)[:, None] * stride_wsn + kt0 * (BLOCK_K // GROUP_SIZE)
               + (dc * (VEC * 8) // GROUP_SIZE)[None, :])
    # nibble i (bits 4i .. 4i + 3) rotated to mantissa bits 19-22: by (19 - 4i) mod 32, as a left and a right shift
    nib = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    rot_l = ((51 - 4 * nib) % 32).to(gl.uint32)[None, None, None, :]
    rot_r = (32 - rot_l) % 32

    acc = gl.zeros((BLOCK_N, C), gl.float32, layout=DL)
    p_next = gl.load(w_ptrs)
    a_next = gl.load(x_ptrs)
    s_next = gl.load(ws_ptrs)
    for kt in range(kt0, kt1):
        p = p_next.to(gl.uint32, bitcast=True)
        a = a_next.to(gl.float32)
        s = s_next.to(gl.float32)
        # the next step's loads before this step's math; the last step reloads its own tile (an L2 hit), no masks
        more = (kt + 1 < kt1).to(gl.int32)
        w_ptrs += BLOCK_P * more
        x_ptrs += BLOCK_K * more
        ws_ptrs += (BLOCK_K // GROUP_SIZE) * more
        p_next = gl.load(w_ptrs)
        a_next = gl.load(x_ptrs)
        s_next = gl.load(ws_ptrs)
        p4 = p[:, :, :, None]
        f = ((((p4 << rot_l) | (p4 >> rot_r)) & 0x780000) | exp_one).to(gl.float32, bitcast=True)  # 1 + u / 16
        dots = gl.sum(gl.sum(f * a[None, :, :, :], axis=3), axis=2)  # (BLOCK_N, C): f . x per thread and row
        xs = gl.convert_layout(gl.sum(gl.sum(a, axis=2), axis=1), gl.SliceLayout(0, DL))
        acc += (dots * 16.0 - (xs * 24.0)[None, :]) * s  # (q . x) * scale, q = u - 8
    out = gl.sum(acc, axis=1)

    offs = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, DL))
    is_last = True
    if SPLIT_K > 1:  # as int8_gemm._split_k_sum, on (BLOCK_N,) fp32 partials
        num_tiles = gl.cdiv(N, BLOCK_N)
        gl.store(part_ptr + (pid_k * num_tiles + pid_n).to(gl.int64) * BLOCK_N + offs, out, cache_modifier=".cg")
        gl.thread_barrier()
        count = gl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            out = gl.zeros((BLOCK_N,), gl.float32, layout=gl.SliceLayout(1, DL))
            for q in range(SPLIT_K):
                out += gl.load(part_ptr + (q * num_tiles + pid_n).to(gl.int64) * BLOCK_N + offs, cache_modifier=".cg")
            gl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    if is_last:
        cols = pid_n * BLOCK_N + offs
        if HAS_BIAS:
            out += gl.load(bias_ptr + gl.minimum(cols, N - 1)).to(gl.float32)
        gl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=cols < N)


def w4a16_gemv(x: torch.Tensor, w_packed: torch.Tensor, w_s: torch.Tensor, k: int, group_size: int,
               bias: torch.Tensor | None, y: torch.Tensor, config: GemmConfig, part: torch.Tensor,
               locks: torch.Tensor) -> None:
    """y [1, N] = x [1, K] @ dequant(w_packed).T (+ bias), operands as ``weight_only.w4a16_gemm`` takes them and
    ``unsupported`` passed; split-K config.split_k K ranges, none empty (``weight_only.effective_split_k``), with
    ``part`` (fp32, >= split x tiles x block_n) and ``locks`` (int32 counters, >= tiles, zero)."""
    n = w_packed.shape[0]
    r, c = tile_shape(config)
    k_tiles = k // config.block_k
    with torch.cuda.device(x.device):
        _w4a16_gemv_kernel[(cdiv(n, config.block_n), config.split_k)](
            x, w_packed, w_s, w_s if bias is None else bias, y, part, locks,
            n, cdiv(k_tiles, config.split_k), k_tiles, w_packed.stride(0), w_s.stride(0), EXP_ONE,
            GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=config.split_k, R=r, C=c, VEC=VEC,
            num_warps=config.num_warps,
        )
