"""Weight-only GEMVs (M = 1) in Gluon, triton's explicit-layout dialect: the decode step of int4-group (W4A16) and
int8-weight (W8A16) linears on CUDA.

Why not the Triton GEMVs (``weight_only._w4a16_gemv_kernel`` / ``_w8a16_gemv_kernel``): at M = 1 a weight is one
multiply-add per 4 or 8 bits, so the unpack must cost ~3 instructions per weight for the FMA units to keep up with
HBM. Compiled for sm_90, the Triton W4A16 kernel's K loop spends 8.8 SASS instructions per weight (session 17,
kernels/NOTES.md): triton places the packed tile with its rows across lanes (4-byte loads), converts x through shared
memory every step, reduces across lanes every step, and its `(v & mask) | exponent` becomes two LOP3s (two
immediates). It streamed 1.0-2.1 TB/s on the H100 (W4A16 2.5x BF16 on 3 of 9 bench shapes).

Here every layout is chosen (one 4-D blocked layout): a thread owns R rows x VEC = 4 consecutive 32-bit words (16-byte
loads) and their 32 / BITS values each - a chunk of 32 int4 or 16 int8 weights - and the matching x (16-byte loads,
replicated over the rows' lanes from L1). Value i of a word is rotated to the top BITS mantissa bits and OR-ed under
the exponent of 1.0, giving f = 1 + u / 2^BITS for the offset value u = q + 2^(BITS - 1) (int4 stores u; int8 stores
q, so its words are XOR-ed with 0x80808080 first, one op per 4 weights), by one funnel shift and one LOP3 (the
exponent is a kernel argument, so it sits in a register); f . x accumulates with FFMA in the thread, and
q . x = 2^BITS (f . x) - (2^BITS + 2^(BITS - 1)) sum(x) per thread and step. W4A16 scales that by the row's group
scale per chunk (a chunk lies in one group); W8A16 applies its per-channel scale once, after the sums. The lanes'
and warps' sums meet in one reduction after the K loop. The next step's words, x and scales are loaded before the
current step's math (registers double-buffered).

Tiles (``tile_shape``): rows per thread R, lanes along a row C, warps along K WK (``GemmConfig.warps_k``; the other
num_warps / WK take more rows), chunks per thread and row per step S (``num_stages``). On small weights a step
covering the whole K with warps along it keeps the whole weight in flight at once (session 18: 2048x7168 W4A16 8.0 ->
5.9 us). A last step may pass K: its chunks past K read the last chunk again against x = 0. SASS: 3.9 / 4.2 / 5.3
instructions per weight in the W4A16 loop at R 8 / 4 / 2.

Split-K as the Triton kernels (one launch: each split stores an fp32 partial row block, bumps the tile's counter,
the last split sums the partials in split order), so results are deterministic. Precision: fp32 throughout; the
offset form loses a few bits to the 1 + u / 2^BITS sums (W4A16 relative error vs the fp32 reference ~2e-7 on the
bench shapes).

Runs where ``unsupported`` is None: CUDA (not the interpreter), M = 1, K a multiple of a chunk, 16-byte aligned
contiguous operands. Everything else stays on the Triton kernels (``weight_only`` decides).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ingot.kernels.checks import cdiv
from ingot.kernels.tuning import GLUON_VEC as VEC, GemmConfig, gluon_chunk as chunk

EXP_ONE = 0x3F800000  # fp32 1.0's bits; passed as an argument so ptxas keeps it in a register (one LOP3 per weight)


def tile_shape(config: GemmConfig, bits: int = 4) -> tuple[int, int, int, int]:
    """(R, C, WK, S) of a "gluon" GEMV config over ``bits``-bit weights: rows per thread, lanes along a row in a
    warp, warps along K (the other num_warps / WK take more rows), chunks per thread and row in a K step
    (config.num_stages). block_k = chunk(bits) x S x C x WK; block_n = R x (32 / C) row lanes x num_warps / WK. C is 0
    where block_k does not split that way (``unsupported`` says why)."""
    wk, s, per = config.warps_k, config.num_stages, chunk(bits)
    c = config.block_k // (per * s * wk) if config.block_k % (per * s * wk) == 0 else 0
    rows_per_pass = (32 // c) * (config.num_warps // wk) if c and 32 % c == 0 and config.num_warps % wk == 0 else 0
    return (config.block_n // rows_per_pass if rows_per_pass else 0), c, wk, s


def unsupported(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, k: int, group_size: int | None,
                config: GemmConfig, bits: int = 4) -> str | None:
    """Why this GEMV cannot run this call (None: it can). w: int4 words [N, K / 8] or int8 [N, K]; group_size None
    for per-channel scales (int8)."""
    if x.device.type != "cuda" or torch.version.hip is not None:
        return "not a CUDA device"
    if x.shape[0] != 1:
        return f"M = {x.shape[0]} (the GEMV takes M = 1)"
    r, c, wk, s = tile_shape(config, bits)
    if config.num_warps % wk:
        return f"warps_k {wk} does not divide num_warps {config.num_warps}"
    if not c or 32 % c or s not in (1, 2):
        return (f"block_k {config.block_k} is not {chunk(bits)} x num_stages {s} (1 or 2) x C x warps_k {wk} for C "
                f"lanes dividing 32")
    if r < 1 or config.block_n != r * (32 // c) * (config.num_warps // wk):
        return f"block_n {config.block_n} is not R x {32 // c} lanes x {config.num_warps // wk} warps"
    if k % chunk(bits) or (group_size is not None and group_size % chunk(bits)):
        return (f"K = {k}, group_size {group_size}: both must be multiples of {chunk(bits)} (a thread's chunk, in one "
                f"group)")
    if not (x.is_contiguous() and w.is_contiguous() and w_s.stride(-1) == 1):
        return "non-contiguous operands"
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return "operands not 16-byte aligned"
    return None


@gluon.jit
def _load_step(w_rows, x_ptr, x_in, ws_rows, kw, kx, ks, last_chunk, VEC: gl.constexpr, CHUNK: gl.constexpr,
               GROUP_SIZE: gl.constexpr, EVEN_K: gl.constexpr):
    """One K step's words (BLOCK_N, KC, VEC), x (KC, VEC, 32 / BITS) and, with groups (GROUP_SIZE > 0), scales
    (BLOCK_N, KC), for the chunk indices kw / kx / ks (the same chunks in each operand's layout; 0 stands in for the
    scales without groups). Past K (EVEN_K false) the weight and scale loads read the last chunk again and x reads 0,
    so those chunks add nothing."""
    if not EVEN_K:
        x_ok = (kx <= last_chunk)[:, None, None]
        kw = gl.minimum(kw, last_chunk)
        ks = gl.minimum(ks, last_chunk)
    p = gl.load(w_rows + (kw * VEC)[None, :, None])
    if EVEN_K:
        a = gl.load(x_ptr + (kx * CHUNK)[:, None, None] + x_in)
    else:
        a = gl.load(x_ptr + (kx * CHUNK)[:, None, None] + x_in, mask=x_ok, other=0.0)
    s = 0
    if GROUP_SIZE > 0:
        s = gl.load(ws_rows + ((ks * CHUNK) // GROUP_SIZE)[None, :])
    return p, a, s


@gluon.jit
def _dot_step(p, a, s, rot_l, rot_r, exp_one, DL: gl.constexpr, BITS: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """(q . x) per thread, row and chunk (BLOCK_N, KC) of one K step, x the group scale with groups: value -> 1 + u /
    2^BITS by a funnel shift and one LOP3, f . x with FFMA, then q . x = 2^BITS (f . x) - (2^BITS + 2^(BITS - 1))
    sum(x) for q = u - 2^(BITS - 1)."""
    p = p.to(gl.uint32, bitcast=True)
    if BITS == 8:  # two's complement -> offset binary, u = q + 128, for the 4 bytes at once
        p = p ^ 0x80808080
    p4 = p[:, :, :, None]
    a = a.to(gl.float32)
    MASK: gl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    f = ((((p4 << rot_l) | (p4 >> rot_r)) & MASK) | exp_one).to(gl.float32, bitcast=True)  # 1 + u / 2^BITS
    dots = gl.sum(gl.sum(f * a[None, :, :, :], axis=3), axis=2)
    xs = gl.convert_layout(gl.sum(gl.sum(a, axis=2), axis=1), gl.SliceLayout(0, DL))
    qx = dots * float(1 << BITS) - (xs * float((1 << BITS) + (1 << (BITS - 1))))[None, :]
    if GROUP_SIZE > 0:
        qx = qx * s.to(gl.float32)
    return qx


@gluon.jit
def _gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,  # x [1, K], w 32-bit words [N, K * BITS / 32], ...
    N, K, K_TILES_PER_SPLIT, K_TILES,
    stride_wn, stride_wsn,
    exp_one,  # EXP_ONE
    BITS: gl.constexpr,  # 4: int4-group (w_s [N, groups]), 8: int8 per channel (w_s [N, 1])
    GROUP_SIZE: gl.constexpr,  # int4's group; 0: one scale per row, applied after the sums
    HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
    R: gl.constexpr, C: gl.constexpr, WK: gl.constexpr, KC: gl.constexpr, VEC: gl.constexpr, EVEN_K: gl.constexpr,
):
    W: gl.constexpr = gl.num_warps()
    PER_WORD: gl.constexpr = 32 // BITS
    CHUNK: gl.constexpr = VEC * PER_WORD  # weights per thread-chunk
    BLOCK_N: gl.constexpr = R * (32 // C) * (W // WK)
    # (rows, chunks along K, VEC words, PER_WORD values): a thread owns R rows x VEC words x PER_WORD values of
    # KC / (C x WK) chunks; a row's chunks lie across C lanes and WK warps
    L4: gl.constexpr = gl.BlockedLayout(size_per_thread=[R, 1, VEC, PER_WORD], threads_per_warp=[32 // C, C, 1, 1],
                                        warps_per_cta=[W // WK, WK, 1, 1], order=[3, 2, 1, 0])
    PL: gl.constexpr = gl.SliceLayout(3, L4)  # (BLOCK_N, KC, VEC) words
    XL: gl.constexpr = gl.SliceLayout(0, L4)  # (KC, VEC, PER_WORD) x
    DL: gl.constexpr = gl.SliceLayout(2, PL)  # (BLOCK_N, KC) one sum per thread, row and chunk
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    kt0 = pid_k * K_TILES_PER_SPLIT
    kt1 = gl.minimum(kt0 + K_TILES_PER_SPLIT, K_TILES)  # > kt0: the host launches no empty split
    last_chunk = K // CHUNK - 1

    # rows past N read row N - 1 (never stored); chunks past K (EVEN_K false) read the last chunk against x = 0
    rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, PL))), N - 1)
    pc = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(2, PL)))
    pv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, PL)))
    w_rows = w_ptr + rows.to(gl.int64)[:, None, None] * stride_wn + pv[None, None, :]
    xc = gl.arange(0, KC, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    xv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    xi = gl.arange(0, PER_WORD, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    x_in = (xv * PER_WORD)[None, :, None] + xi[None, None, :]
    dc = gl.arange(0, KC, layout=gl.SliceLayout(0, DL))
    drows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, DL)), N - 1)
    ws_rows = ws_ptr + drows.to(gl.int64)[:, None] * stride_wsn
    # value i (bits BITS i ..) rotated to the top BITS mantissa bits (23 - BITS ..): by (23 - BITS - BITS i) mod 32,
    # a left and a right shift (one funnel shift)
    val = gl.arange(0, PER_WORD, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    rot_l = ((55 - BITS - BITS * val) % 32).to(gl.uint32)[None, None, None, :]
    rot_r = (32 - rot_l) % 32

    kw = kt0 * KC + pc  # this step's chunks, as weight / x / scale indices
    kx = kt0 * KC + xc
    ks = kt0 * KC + dc
    p, a, s = _load_step(w_rows, x_ptr, x_in, ws_rows, kw, kx, ks, last_chunk, VEC, CHUNK, GROUP_SIZE, EVEN_K)
    # the epilogue's row scales and bias, loaded before the K loop (after it, their HBM latency followed the last
    # step in every program: a serial round trip at the end of each launch)
    offs = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, DL))
    cols = pid_n * BLOCK_N + offs
    if GROUP_SIZE == 0:
        row_scale = gl.load(ws_ptr + gl.minimum(cols, N - 1).to(gl.int64) * stride_wsn).to(gl.float32)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + gl.minimum(cols, N - 1)).to(gl.float32)
    acc = gl.zeros((BLOCK_N, KC), gl.float32, layout=DL)
    for kt in range(kt0, kt1):
        # the next step's loads before this step's math; the last step reloads its own tile (an L2 hit), no masks.
        # A split of one step reloads too: without the loop-carried reload ptxas sank x loads below the math (one
        # L2 round trip each, in series), 5.9 -> 7.1 us on 7168x2048 (kernels/NOTES.md, session 18)
        more = (kt + 1 < kt1).to(gl.int32) * KC
        kw += more
        kx += more
        ks += more
        p_next, a_next, s_next = _load_step(w_rows, x_ptr, x_in, ws_rows, kw, kx, ks, last_chunk, VEC, CHUNK,
                                            GROUP_SIZE, EVEN_K)
        acc += _dot_step(p, a, s, rot_l, rot_r, exp_one, DL, BITS, GROUP_SIZE)
        p, a, s = p_next, a_next, s_next
    out = gl.sum(acc, axis=1)

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
        if GROUP_SIZE == 0:  # the row's scale, once
            out = out * row_scale
        if HAS_BIAS:
            out += bias
        gl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=cols < N)


def _launch(x, w_words, w_s, k, bits, group_size, bias, y, config, part, locks) -> None:
    n = w_words.shape[0]
    r, c, wk, _ = tile_shape(config, bits)
    k_tiles = cdiv(k, config.block_k)
    with torch.cuda.device(x.device):
        _gemv_kernel[(cdiv(n, config.block_n), config.split_k)](
            x, w_words, w_s, w_s if bias is None else bias, y, part, locks,
            n, k, cdiv(k_tiles, config.split_k), k_tiles, w_words.stride(0), w_s.stride(0), EXP_ONE,
            BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=config.split_k, R=r, C=c, WK=wk,
            KC=config.block_k // chunk(bits), VEC=VEC, EVEN_K=k % config.block_k == 0, num_warps=config.num_warps,
        )


def w4a16_gemv(x: torch.Tensor, w_packed: torch.Tensor, w_s: torch.Tensor, k: int, group_size: int,
               bias: torch.Tensor | None, y: torch.Tensor, config: GemmConfig, part: torch.Tensor,
               locks: torch.Tensor) -> None:
    """y [1, N] = x [1, K] @ dequant(w_packed).T (+ bias), operands as ``weight_only.w4a16_gemm`` takes them and
    ``unsupported`` passed; split-K config.split_k K ranges, none empty (``weight_only.effective_split_k``), with
    ``part`` (fp32, >= split x tiles x block_n) and ``locks`` (int32 counters, >= tiles, zero)."""
    _launch(x, w_packed, w_s, k, 4, group_size, bias, y, config, part, locks)


def w8a16_gemv(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
               config: GemmConfig, part: torch.Tensor, locks: torch.Tensor) -> None:
    """y [1, N] = x [1, K] @ (w_q * w_s).T (+ bias), operands as ``weight_only.w8a16_gemm`` takes them and
    ``unsupported`` (bits 8, no groups) passed; split-K and scratch as ``w4a16_gemv``. w_q's bytes are read as 32-bit
    words, 4 consecutive int8 each."""
    _launch(x, w_q.view(torch.int32), w_s, x.shape[1], 8, 0, bias, y, config, part, locks)
