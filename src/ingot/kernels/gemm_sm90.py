"""W8A8 int8 GEMMs for Hopper (sm_90), written in Gluon (triton's explicit-layout dialect): at prefill sizes the
block-scaled one (``int8_block_gemm_sm90``) and the per-channel one (``int8_channel_gemm_sm90``); at decode sizes
one swap-AB kernel for both scale layouts (``int8_skinny_gemm_sm90``, end of file). The prefill ones are
persistent - one program per SM (at most), each running its tiles one after another with one TMA ring across them, so
the next tile's first loads are in flight while a tile finishes its last steps and stores - and share the tile order
(``_tile_offsets``). Loads: TMA (tensor descriptors, zero fill past M, N and K), a STAGES-deep ring of shared-memory
slots, one mbarrier per slot. Outputs go through shared memory (``convert_layout``) to 16-byte stores: storing
straight from the wgmma layout (4-byte stores) ran the channel kernel's 128x256 tile 2-61% slower on 27 of 27 rows
(session 11, kernels/NOTES.md).

Block-scaled: ``int8_gemm._block_gemm_kernel`` must promote every 128-K step's int32 dot to fp32 (the scales change
per K block). Triton's pipeliner only keeps a wgmma in flight when its accumulator is carried to the next dot; the
block kernel's dot result feeds the promotion instead, so every step waits for its own MMA to drain before scaling
it, and the tensor cores idle during the promotion (the H100 ran it at 0.77-0.97x BF16 at M >= 1024, where the
channel kernel, with no promotion, runs 1.2-1.6x; kernels/NOTES.md). Here the kernel is warp-specialized, as
DeepGEMM's: a producer warp streams every tile's K steps through the TMA ring (``_block_load_partition``), and two
consumer warpgroups each own half of every 128-row tile (``_block_mma_partition``), so one's promotion and epilogue
run while the other's MMAs do. Within a consumer, step i's wgmma is issued before step i - 1's result is waited for
and promoted. The math is the same as the Triton kernel's, step by step: an exact int32 dot per 128-K block,
converted to fp32, times x_s[m, kb] * w_s[n // 128, kb], added to an fp32 accumulator in K order; so the two kernels
give the same bits. The tile's N range is one 128-row weight block (BLOCK_N = 128), so the weight scale of a step is
one scalar. History (kernels/NOTES.md): one warpgroup pair in lockstep, refilling the ring itself, ran 1.11-1.33x
BF16 at M >= 1024 in the kernel bench (sessions 9-10, db5eb03); warp-specialized, 1.21-1.43x (session 13, 3e4c839).

Per-channel: one int32 accumulator carried through all of K (each wgmma adds to the previous one's result, one left
in flight), the scales and bias applied once in the epilogue, as ``int8_gemm._int8_gemm_channel_kernel`` does, so
again the same bits. The ring is refilled by the same warps (``_start_ring``, ``_load_step``): a slot after the wait
that retires the MMA that read it. Two tiles, 128x256 and 128x128, chosen per call by ``channel_config`` (waves of
tiles over the SMs). At M = 1024 / 4096 it ran 1.05-1.31x faster than the Triton kernel on the 9 bench shapes
(1.51-2.12x BF16), at M = 512 1.04-1.48x faster (session 11).

Decode (M <= 64): the weight rows take the wgmma's 64-row side and the tokens its narrow side (16-64), a TMA ring
streams the K steps, and split-K reuses the Triton kernels' partial tiles and counters. It runs where a tuned table
entry says so (``GemmConfig.kernel`` "sm90": ``ingot tune`` sweeps it beside the Triton tiles on sm_90). Block-scaled,
it stages the split's scale products in shared memory before the first MMA, takes K steps of one or two 128-K blocks
(each dot promoted on its own) and keeps one wgmma in flight within groups of SKINNY_GROUP_K blocks. On the H100 it
holds 16 of 18 int8-channel rows at M 16 / 64 and 24 of 27 int8-block rows at M 1 / 16 / 64 (session 15,
kernels/NOTES.md); the per-channel sums are exact, so it gives the Triton kernel's bits.

Compiled only for CUDA sm_90 (wgmma and TMA); ``supported`` says when the wrappers may use them. Everything else -
other GPUs, CPU, the interpreter, ragged strides - stays on the Triton kernels.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ingot.kernels.checks import cdiv
from ingot.kernels.tuning import GemmConfig, num_sms, skinny_block_steps_ok, skinny_group_k, sm90_decode_scale_steps

# int8-block (H100, session 13, `ws-block-*-715faf8.json`, 9 bench shapes at M 256-4096): 128x128x128 tiles, two
# consumer warpgroups of 64 rows (num_warps 4 is the default partition's one; the worker adds 4 + 1 warps), 5 stages
# (160 KB of shared memory; geometric mean over the 9 shapes 1.391x BF16 at M = 1024 against 1.382x for 4 stages and
# 1.384x for 6); K steps in groups of 4 per drain of a consumer's wgmma pipeline (1: 1.13-1.37x; 2: 1.23-1.50x; 4:
# 1.23-1.54x at M 1024 / 4096; 8 spilled and serialized the wgmmas). Registers: 168 per thread at launch (12 warps
# on one SM), redistributed by setmaxnreg: 24 for the producer warp's warpgroup, 240 for each consumer.
BLOCK_CONFIG = GemmConfig(128, 128, 128, group_m=8, num_warps=4, num_stages=5)
GROUP_K = 4
BLOCK_MAXNREG = 168
BLOCK_CONSUMER_REGS = 240
# Where it runs (``block_wanted``): from M = 512 on every bench shape (it beat the Triton tables on 9 of 9 at M =
# 512, 0.99-1.49x BF16 against 0.71-1.05x), and from M = 256 where its tiles give at least half the SMs one each: at
# M = 256 it won on 7 of 9 shapes, lost on 4096x4096 (0.98x against Triton's 1.13x) and 2048x7168 (0.72x against
# 0.95x), and was 1% ahead on 4096x14336; the rule leaves all three, 32-64 tiles each, to Triton.
BLOCK_FULL_M = 512
BLOCK_MIN_M = 256

# int8-channel: the two tiles ``channel_config`` picks from, with the time of one tile relative to the 128x128 tile
# when SMs have tiles to spare (M = 4096: 0.80-0.94x of two 128x128 tiles on 9 of 9 bench shapes, median 0.88, so
# 1.76). 4 stages (224 KB of shared memory with the store buffer, at 128x256) beat 3 on 18 of 18 rows at M 1024 /
# 4096; a 256x128 tile was slower than 128x256 on 17 of 18 (both storing from the wgmma layout); triton 3.6's wgmma
# lowering refuses an int8 instruction 256 wide, so the 128x256 tile runs two 128-wide ones per K step. Smallest M:
# at M = 512 the best of the two tiles beat the Triton kernel on 9 of 9 bench shapes (1.04-1.48x), at M = 256 on 4
# of 9 and at M = 128 on 0 of 9, where the Triton tables' 64-row tiles win (session 11).
CHANNEL_TILES = ((GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=4), 1.76),
                 (GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4), 1.0))
CHANNEL_MIN_M = 512


@gluon.jit
def _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Grouped tile order (GROUP_M row tiles share a weight column slab in L2), as int8_gemm._tile_ids."""
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _load_step(x_desc, w_desc, a_bufs, b_bufs, ready, g, total, s, steps, off_m, off_n, next_m, next_n,
               BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the program's ``g``-th K step - step ``s`` of the current tile at (off_m, off_n), or, from
    ``steps`` on, step s - steps of the next tile at (next_m, next_n) - into its ring slot (predicated off from
    ``total`` on). So the refills near the end of a tile load the next tile's first steps while this one finishes
    and stores."""
    slot = g % STAGES
    pred = g < total
    wrap = (s >= steps).to(gl.int32)
    m0 = off_m + wrap * (next_m - off_m)
    n0 = off_n + wrap * (next_n - off_n)
    k = (s - wrap * steps) * BLOCK_K
    mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [m0, k], ready.index(slot), a_bufs.index(slot), pred=pred)
    tma.async_copy_global_to_shared(w_desc, [n0, k], ready.index(slot), b_bufs.index(slot), pred=pred)


@gluon.jit
def _start_ring(x_desc, w_desc, total, steps, off_m, off_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The STAGES shared-memory slots of x and w tiles with one mbarrier each, filled with the program's first
    steps (its first tile at (off_m, off_n))."""
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    for s in gl.static_range(STAGES):
        _load_step(x_desc, w_desc, a_bufs, b_bufs, ready, s, total, s, steps, off_m, off_n, off_m, off_n,
                   BLOCK_K, STAGES)
    return a_bufs, b_bufs, ready


@gluon.jit
def _step_scale(xs_ptrs, ws_ptr_tile, step, last, stride_xsk, stride_wsk):
    """(BLOCK_M,) x_s * w_s of K step ``step`` (a padding step past K takes the last block's: its dot is zero)."""
    kb = gl.minimum(step, last)
    return gl.load(xs_ptrs + kb * stride_xsk) * gl.load(ws_ptr_tile + kb * stride_wsk)


@gluon.jit
def _block_load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, num_pid_m, num_pid_n, steps,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                          STAGES: gl.constexpr):
    """The producer warp of the warp-specialized block kernel: the program's tiles' K steps, in order, into the ring;
    a slot is refilled once both consumers have released it (``empty``)."""
    g = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        for s in range(steps):
            slot = g % STAGES
            # a fresh mbarrier counts as having completed the phase before its first: the first lap does not wait
            mbarrier.wait(empty.index(slot), ((g // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [off_m, s * BLOCK_K], ready.index(slot), a_bufs.index(slot))
            tma.async_copy_global_to_shared(w_desc, [off_n, s * BLOCK_K], ready.index(slot), b_bufs.index(slot))
            g += 1


@gluon.jit
def _block_issue(a_bufs, b_bufs, ready, acc, g, HALF: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr):
    """Waits for the program's K step ``g`` and issues this consumer's int32 wgmma on it (its ROWS rows of the x
    tile). The register operand is a bit copy of the fp32 accumulator ``acc`` as it stands: its values are not read
    (use_acc=False), but the copy makes the issue depend on every promotion before it, so the compiler cannot sink a
    promotion below a later issue (it did in session 9, which kept a third int32 tile live: spills, and ptxas
    serialized every wgmma)."""
    slot = g % STAGES
    mbarrier.wait(ready.index(slot), (g // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(slot).slice(HALF * ROWS, ROWS), b_bufs.index(slot).permute((1, 0)),
                         acc.to(gl.int32, bitcast=True), use_acc=False, is_async=True)


@gluon.jit
def _block_mma_partition(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, num_pid_m, num_pid_n,
                         steps, last, stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_ym, stride_yn,
                         HALF: gl.constexpr, SCALE_N: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, GROUP_K: gl.constexpr):
    """One consumer warpgroup of the warp-specialized block kernel: rows HALF * BLOCK_M / 2 .. of every tile. The
    other consumer runs the same loop on the other half of the tile, so one's promotion and epilogue overlap the
    other's MMAs (DeepGEMM's two math warpgroups). Within a consumer, K steps go in groups of GROUP_K: each wgmma is
    issued before the previous step's is waited for (one left in flight) and promoted; the group drains at its end
    (a wgmma in flight across the loop's back edge made LLVM copy its registers at the latch, and ptxas serializes
    every wgmma of a kernel where any instruction reads the registers of one in flight: C7514, session 9). A slot is
    released (``empty``) once this consumer's wgmma on it has retired. Scales are loaded as their step is issued, a
    wait ahead of their use."""
    ROWS: gl.constexpr = BLOCK_M // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 32])
    THREADS_N: gl.constexpr = BLOCK_N // 8
    out: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // THREADS_N, THREADS_N],
                                         warps_per_cta=[4, 1], order=[1, 0])
    g = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        rows = off_m + HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
        xs_ptrs = xs_ptr + gl.minimum(rows, M - 1).to(gl.int64) * stride_xsm  # rows past M: never stored
        ws_ptr_tile = ws_ptr + (off_n // SCALE_N) * stride_wsn
        acc = gl.zeros((ROWS, BLOCK_N), gl.float32, layout=mma)
        for first in range(0, steps, GROUP_K):
            prev = _block_issue(a_bufs, b_bufs, ready, acc, g, HALF, ROWS, STAGES)
            prev_scale = _step_scale(xs_ptrs, ws_ptr_tile, first, last, stride_xsk, stride_wsk)
            for j in gl.static_range(1, GROUP_K):
                tok = _block_issue(a_bufs, b_bufs, ready, acc, g + j, HALF, ROWS, STAGES)
                scale = _step_scale(xs_ptrs, ws_ptr_tile, first + j, last, stride_xsk, stride_wsk)
                done = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))
                mbarrier.arrive(empty.index((g + j - 1) % STAGES), count=1)
                acc += done.to(gl.float32) * prev_scale[:, None]  # |done| <= 128 * 2^14 = 2^21: exact in fp32
                prev = tok
                prev_scale = scale
            done = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            mbarrier.arrive(empty.index((g + GROUP_K - 1) % STAGES), count=1)
            acc += done.to(gl.float32) * prev_scale[:, None]
            g += GROUP_K
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        if HAS_BIAS:
            acc += gl.load(bias_ptr + gl.minimum(cols, N - 1)).to(gl.float32)[None, :]
        y = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), out)
        out_rows = off_m + HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out))
        out_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out))
        y_ptrs = y_ptr + out_rows.to(gl.int64)[:, None] * stride_ym + out_cols[None, :] * stride_yn
        gl.store(y_ptrs, y, mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


@gluon.jit
def _int8_block_gemm_sm90_kernel(
    x_desc, w_desc,  # TMA descriptors: int8 x [M, K] in [BLOCK_M, BLOCK_K] boxes, int8 w [N, K] in [BLOCK_N, BLOCK_K]
    xs_ptr, ws_ptr, bias_ptr, y_ptr,  # fp32 [M, KB], fp32 [NB, KB], [N] or unused, [M, N]
    M, N, K,
    stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_ym, stride_yn,
    SCALE_N: gl.constexpr,  # weight block rows (128); BLOCK_N divides it
    HAS_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP_K: gl.constexpr,  # K steps per drain of a consumer's wgmma pipeline (1: none in flight while promoting)
    CONSUMER_REGS: gl.constexpr,  # registers per thread of the worker consumer warpgroup (setmaxnreg)
    num_warps: gl.constexpr,  # 4: the default partition is one consumer warpgroup
):
    # Warp-specialized and persistent: a producer warp streams every tile's K steps through the TMA ring; two
    # consumer warpgroups (the default partition and one worker) each take half the tile's rows
    gl.static_assert(SCALE_N % BLOCK_N == 0, "a tile's N range must lie in one weight block (one scale per K step)")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # released by both consumers
    # The tile grid and the K step count, once for all partitions: the producer and the consumers must walk the same
    # steps. Steps run in groups of GROUP_K; a count that is not a multiple gets steps past K, which the TMA fills
    # with zeros (zero dots, promoted with the last block's scales, index ``last``).
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    steps = gl.cdiv(k_tiles, GROUP_K) * GROUP_K
    gl.warp_specialize([
        (_block_mma_partition, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, num_pid_m,
                                num_pid_n, steps, k_tiles - 1, stride_xsm, stride_xsk, stride_wsn, stride_wsk,
                                stride_ym, stride_yn, 0, SCALE_N, HAS_BIAS, BLOCK_M, BLOCK_N, GROUP_M, STAGES,
                                GROUP_K)),
        (_block_mma_partition, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, num_pid_m,
                                num_pid_n, steps, k_tiles - 1, stride_xsm, stride_xsk, stride_wsn, stride_wsk,
                                stride_ym, stride_yn, 1, SCALE_N, HAS_BIAS, BLOCK_M, BLOCK_N, GROUP_M, STAGES,
                                GROUP_K)),
        (_block_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, num_pid_m, num_pid_n, steps, BLOCK_M,
                                 BLOCK_N, BLOCK_K, GROUP_M, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


@gluon.jit
def _int8_channel_gemm_sm90_kernel(
    x_desc, w_desc,  # TMA descriptors: int8 x [M, K] in [BLOCK_M, BLOCK_K] boxes, int8 w [N, K] in [BLOCK_N, BLOCK_K]
    xs_ptr, ws_ptr, bias_ptr, y_ptr,  # fp32 [M, 1], fp32 [N, 1], [N] or unused, [M, N]
    M, N, K,
    stride_xsm, stride_wsn, stride_ym, stride_yn,
    HAS_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    # Persistent over tiles as the block kernel (one TMA ring across a program's tiles); K steps past K (when K is
    # shorter than the ring) are zero-filled by the TMA and add nothing
    pid = gl.program_id(0)
    num_progs = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    my_tiles = gl.cdiv(num_tiles - pid, num_progs)
    steps = gl.maximum(gl.cdiv(K, BLOCK_K), STAGES)  # >= STAGES: the refills reach one tile ahead
    total = my_tiles * steps

    # wgmma accumulator layout: warps stacked along M (16 rows each); a 128-wide int8 instruction (repeated along N
    # for BLOCK_N = 256). The output goes through shared memory to rows of BLOCK_N // 8 threads x 8 columns.
    INSTR_N: gl.constexpr = 128 if BLOCK_N > 128 else BLOCK_N
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, INSTR_N, 32])
    THREADS_N: gl.constexpr = BLOCK_N // 8
    out: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // THREADS_N, THREADS_N],
                                         warps_per_cta=[num_warps, 1], order=[1, 0])

    off_m, off_n = _tile_offsets(pid, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
    a_bufs, b_bufs, ready = _start_ring(x_desc, w_desc, total, steps, off_m, off_n, BLOCK_M, BLOCK_N, BLOCK_K,
                                        STAGES)

    for t in range(my_tiles):
        next_m, next_n = _tile_offsets(gl.minimum(pid + (t + 1) * num_progs, num_tiles - 1), num_pid_m, num_pid_n,
                                       BLOCK_M, BLOCK_N, GROUP_M)
        # step 0 starts a fresh sum; every later step adds to the one before it, which stays in flight until the
        # next is issued; the slot of the step just retired is refilled (the last step's after the final wait)
        g0 = t * steps
        slot = g0 % STAGES
        mbarrier.wait(ready.index(slot), (g0 // STAGES) & 1)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, layout=mma)
        acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, use_acc=False,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        for j in range(1, steps):
            g = g0 + j
            slot = g % STAGES
            mbarrier.wait(ready.index(slot), (g // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            _load_step(x_desc, w_desc, a_bufs, b_bufs, ready, g - 1 + STAGES, total, j - 1 + STAGES, steps,
                       off_m, off_n, next_m, next_n, BLOCK_K, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, ready, g0 + steps - 1 + STAGES, total, steps - 1 + STAGES, steps,
                   off_m, off_n, next_m, next_n, BLOCK_K, STAGES)

        # epilogue in the store layout: y = (acc * x_s) * w_s (+ bias), as the Triton kernel and the reference
        acc_out = gl.convert_layout(acc, out)
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out))
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out))
        xs = gl.load(xs_ptr + gl.minimum(rows, M - 1).to(gl.int64) * stride_xsm)  # rows past M: never stored
        ws = gl.load(ws_ptr + gl.minimum(cols, N - 1) * stride_wsn)
        y = acc_out.to(gl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += gl.load(bias_ptr + gl.minimum(cols, N - 1)).to(gl.float32)[None, :]
        y_ptrs = y_ptr + rows.to(gl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        gl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))
        off_m = next_m
        off_n = next_n

    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def supported(x_q: torch.Tensor, w_q: torch.Tensor, block_size: tuple[int, int] | None = None) -> str | None:
    """None when the sm_90 kernels can run these (already checked) operands - block-scaled with ``block_size``,
    per-channel without - else why not."""
    if x_q.device.type != "cuda" or torch.version.hip is not None:
        return "not a CUDA device"
    if torch.cuda.get_device_capability(x_q.device) != (9, 0):
        return "not sm_90 (wgmma)"
    if x_q.dtype != torch.int8:
        return "not int8 operands"
    if block_size is not None and tuple(block_size) != (128, 128):
        return f"block size {tuple(block_size)}, not (128, 128)"
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            return f"{name} is not a row-major tensor with 16-byte aligned rows (TMA)"
    return None


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)


def _descriptors_and_grid(x_q: torch.Tensor, w_q: torch.Tensor, config: GemmConfig):
    """TMA descriptors of x [M, K] and w [N, K] in the config's tiles, and the persistent grid (one program per
    tile, at most one per SM)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    x_desc = TensorDescriptor(x_q, [m, k], [x_q.stride(0), 1], [bm, bk], _smem_layout(bm, bk))
    w_desc = TensorDescriptor(w_q, [n, k], [w_q.stride(0), 1], [bn, bk], _smem_layout(bn, bk))
    return x_desc, w_desc, (min(cdiv(m, bm) * cdiv(n, bn), num_sms(x_q.device)),)


def int8_block_gemm_sm90(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    config: GemmConfig = BLOCK_CONFIG,
) -> torch.Tensor:
    """int8_gemm_block(x_q, x_s, w_q, w_s, (128, 128), bias, out_dtype, out=out) on operands that
    ``int8_gemm.check_block_operands`` and ``supported`` passed."""
    m, k = x_q.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    x_desc, w_desc, grid = _descriptors_and_grid(x_q, w_q, config)
    with torch.cuda.device(x_q.device):
        _int8_block_gemm_sm90_kernel[grid](
            x_desc, w_desc, x_s, w_s, x_s if bias is None else bias, y,
            m, n, k,
            x_s.stride(0), x_s.stride(1), w_s.stride(0), w_s.stride(1), y.stride(0), y.stride(1),
            SCALE_N=128, HAS_BIAS=bias is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            STAGES=config.num_stages, GROUP_K=GROUP_K, CONSUMER_REGS=BLOCK_CONSUMER_REGS,
            num_warps=config.num_warps, maxnreg=BLOCK_MAXNREG,
        )
    return y


def block_wanted(m: int, n: int, device: torch.device) -> bool:
    """Whether ``int8_gemm_block(backend="auto")`` takes the sm_90 kernel at this M and N (operands supported):
    from M = BLOCK_FULL_M always, and from BLOCK_MIN_M where its 128x128 tiles give at least half of the device's SMs
    one each (below that the Triton tables' smaller tiles and split-K win; session 13). The SM count is read only
    in that middle range."""
    if m < BLOCK_MIN_M:
        return False
    if m >= BLOCK_FULL_M:
        return True
    return 2 * cdiv(m, BLOCK_CONFIG.block_m) * cdiv(n, BLOCK_CONFIG.block_n) >= num_sms(device)


def channel_config(m: int, n: int, sms: int) -> GemmConfig:
    """The tile of ``CHANNEL_TILES`` that finishes M x N first: waves of tiles over the SMs (a partly filled wave
    costs a whole one) times the tile's relative time. At M = 512-4096 on the 9 bench shapes it picked the faster
    tile on 25 of 27 rows; the two misses were 1-5% slower (session 11)."""
    def cost(tile: tuple[GemmConfig, float]) -> float:
        config, time = tile
        tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
        return cdiv(tiles, sms) * time

    return min(CHANNEL_TILES, key=cost)[0]


def int8_channel_gemm_sm90(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """int8_gemm_channel(x_q, x_s, w_q, w_s, bias, out_dtype, out=out) on operands that ``int8_gemm``'s checks and
    ``supported`` passed; ``config`` (a tile, block_k 128) overrides ``channel_config``."""
    m, k = x_q.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device) if out is None else out
    if m == 0:
        return y
    if config is None:
        config = channel_config(m, n, num_sms(x_q.device))
    x_desc, w_desc, grid = _descriptors_and_grid(x_q, w_q, config)
    with torch.cuda.device(x_q.device):
        _int8_channel_gemm_sm90_kernel[grid](
            x_desc, w_desc, x_s, w_s, x_s if bias is None else bias, y,
            m, n, k,
            x_s.stride(0), w_s.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            STAGES=config.num_stages,
            num_warps=config.num_warps,
        )
    return y


# ----------------------------------------------------------------------------------------- decode sizes (swap-AB)


@gluon.jit
def _skinny_load(w_desc, x_desc, a_bufs, b_bufs, ready, j, steps, loaded, first, k_tiles, off_n, off_m,
                 BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the program's K step ``j`` (K tile first + j) into its ring slot; none from ``loaded`` on. A K
    tile past K (the last split's surplus) is zero-filled by the TMA and adds nothing; so are the steps from ``steps``
    to ``loaded`` (a block program's last group of steps rounded up), which load from past K, not from the next
    split's range."""
    slot = j % STAGES
    pred = j < loaded
    k = gl.where(j < steps, first + j, k_tiles) * BLOCK_K
    mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(w_desc, [off_n, k], ready.index(slot), a_bufs.index(slot), pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, k], ready.index(slot), b_bufs.index(slot), pred=pred)


@gluon.jit
def _skinny_block_issue(a_bufs, b_bufs, ready, acc, sub, HALF: gl.constexpr, HALVES: gl.constexpr,
                        STAGES: gl.constexpr):
    """Waits for the ring slot of the decode kernel's 128-K sub-step ``sub`` (step sub // HALVES, of HALVES
    sub-steps) and issues its int32 wgmma on K columns HALF * 128 .. of the slot; ``acc`` as in _block_issue."""
    step = sub // HALVES
    slot = step % STAGES
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    a = a_bufs.index(slot)
    b = b_bufs.index(slot)
    if HALVES > 1:
        a = a.slice(HALF * 128, 128, dim=1)
        b = b.slice(HALF * 128, 128, dim=1)
    return warpgroup_mma(a, b.permute((1, 0)), acc.to(gl.int32, bitcast=True), use_acc=False, is_async=True)


@gluon.jit
def _int8_skinny_gemm_sm90_kernel(
    w_desc, x_desc,  # TMA descriptors: int8 w [N, K] in [BLOCK_N, BLOCK_K] boxes, int8 x [M, K] in [BLOCK_M, BLOCK_K]
    xs_ptr, ws_ptr, bias_ptr, y_ptr,  # channel: fp32 [M, 1], fp32 [N, 1]; block: fp32 [M, KB], fp32 [NB, KB]
    part_ptr, lock_ptr,  # split-K: partial tiles [SPLIT_K, tiles, BLOCK_N * BLOCK_M] (int32 / fp32), counters [tiles]
    M, N, K,
    stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_ym, stride_yn,
    BLOCKED: gl.constexpr,  # block scales (fp32 promotion per K step) instead of per-channel ones
    SCALE_N: gl.constexpr,  # weight block rows (128; BLOCK_N divides it) when BLOCKED
    HAS_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr, SPLIT_K: gl.constexpr,
    GROUP_K: gl.constexpr,  # BLOCKED: 128-K sub-steps per drain of the wgmma pipeline (1: each waited for alone)
    SCALE_STEPS: gl.constexpr,  # BLOCKED: a power of two >= the split's sub-steps rounded up to whole groups
    num_warps: gl.constexpr,  # 4: one warpgroup
):
    # Swap-AB: y^T [N, M] = w [N, K] @ x^T, so the weight rows fill the wgmma's 64-row side and the few tokens its
    # narrow side (BLOCK_M 16-64): no padding of x to 64 rows, and one program's x tile is read once per
    # BLOCK_N weight rows. One program = one (N tile, M tile, K split); a STAGES-deep TMA ring streams its K steps.
    gl.static_assert(num_warps == 4, "one warpgroup")
    gl.static_assert(not BLOCKED or SCALE_N % BLOCK_N == 0, "a tile's weight rows must lie in one scale block")
    pid = gl.program_id(0)
    tile = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    num_pid_m = gl.cdiv(M, BLOCK_M)
    off_n = (tile // num_pid_m) * BLOCK_N  # consecutive tiles share an N tile (its weight rows stay in L2)
    off_m = (tile % num_pid_m) * BLOCK_M
    k_tiles = gl.cdiv(K, BLOCK_K)
    steps = gl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * steps
    loaded = steps
    if BLOCKED:
        HALVES: gl.constexpr = BLOCK_K // 128  # 128-K sub-steps (one scale block each) per step
        gl.static_assert(BLOCK_K % 128 == 0 and GROUP_K % HALVES == 0, "K steps of whole scale blocks")
        loaded = gl.cdiv(steps, GROUP_K // HALVES) * (GROUP_K // HALVES)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_M, 32])
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    if BLOCKED:
        # the split's scale products x_s[m, kb] * w_s[n // SCALE_N, kb] for its 128-K blocks, staged in shared
        # memory below. Loaded per step from global memory, their latency sat on every step's path (session 14: the
        # block op's M = 64 rows stayed on Triton); loaded after the ring's first TMA loads, they queued behind them
        # (4096x4096 at M = 64 on the H100, session 15: 11.5 us staged after the ring's loads, 10.9 us before them,
        # 10.3 us with no scale loads at all)
        last = gl.cdiv(K, 128) - 1
        staging: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                                 warps_per_cta=[1, 4], order=[0, 1])
        kb = gl.minimum(first * HALVES + gl.arange(0, SCALE_STEPS, layout=gl.SliceLayout(1, staging)), last)
        tokens = gl.minimum(off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, staging)), M - 1)  # never stored
        xs = gl.load(xs_ptr + tokens.to(gl.int64)[None, :] * stride_xsm + kb[:, None] * stride_xsk)
        ws = gl.load(ws_ptr + (off_n // SCALE_N) * stride_wsn + kb * stride_wsk)

    # the output tile in a layout whose threads own 8 consecutive weight rows (= 8 consecutive columns of y: 16-byte
    # bf16 stores); split-K partials go through the same layout. The epilogue's per-channel scales and bias are
    # loaded here, before the ring: after the K loop their latency (the weight scales come from HBM) came after the
    # last wgmma in every program, a serial round trip at the end of each launch.
    THREADS_N: gl.constexpr = BLOCK_N // 8  # BLOCK_N 64 or 128
    out: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[THREADS_N, 32 // THREADS_N],
                                         warps_per_cta=[1, 4], order=[0, 1])
    n_offs = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out))
    m_offs = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out))
    rows = off_n + n_offs  # weight rows = columns of y
    cols = off_m + m_offs  # tokens = rows of y
    if not BLOCKED:
        xs_out = gl.load(xs_ptr + gl.minimum(cols, M - 1).to(gl.int64) * stride_xsm)
        ws_out = gl.load(ws_ptr + gl.minimum(rows, N - 1) * stride_wsn)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + gl.minimum(rows, N - 1)).to(gl.float32)
    for s in gl.static_range(STAGES):
        _skinny_load(w_desc, x_desc, a_bufs, b_bufs, ready, s, steps, loaded, first, k_tiles, off_n, off_m,
                     BLOCK_K, STAGES)

    if BLOCKED:
        # each step's exact int32 dot, promoted: acc += dot * scales[step], as the Triton kernel. As the prefill
        # block kernel's consumers (_block_mma_partition), steps go in groups of GROUP_K: each wgmma is issued before
        # the previous step's is waited for, its slot refilled and its dot promoted; the group drains at its end.
        # The products: row-major, unswizzled, viewed as SCALE_STEPS rows of a rank-1 layout to index a step's row.
        scales = gl.allocate_shared_memory(gl.float32, [SCALE_STEPS, BLOCK_M],
                                           gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]), xs * ws[:, None])
        scales = scales._reinterpret(gl.float32, [SCALE_STEPS, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        gl.thread_barrier()
        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
        for g in range(0, loaded * HALVES, GROUP_K):
            # sub-steps g .. g + GROUP_K - 1; a step past the split's range is a zero tile (_skinny_load) and has
            # some block's scales: adds 0. A slot is refilled once its last sub-step's wgmma has retired.
            prev = _skinny_block_issue(a_bufs, b_bufs, ready, acc, g, 0, HALVES, STAGES)
            prev_scale = scales.index(g).load(gl.SliceLayout(0, mma))
            for i in gl.static_range(1, GROUP_K):
                tok = _skinny_block_issue(a_bufs, b_bufs, ready, acc, g + i, i % HALVES, HALVES, STAGES)
                scale = scales.index(g + i).load(gl.SliceLayout(0, mma))
                done = warpgroup_mma_wait(num_outstanding=1, deps=(prev,))
                if (i - 1) % HALVES == HALVES - 1:
                    _skinny_load(w_desc, x_desc, a_bufs, b_bufs, ready, (g + i - 1) // HALVES + STAGES, steps, loaded,
                                 first, k_tiles, off_n, off_m, BLOCK_K, STAGES)
                acc += done.to(gl.float32) * prev_scale[None, :]  # |done| <= 128 * 2^14 = 2^21: exact in fp32
                prev = tok
                prev_scale = scale
            done = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            _skinny_load(w_desc, x_desc, a_bufs, b_bufs, ready, (g + GROUP_K - 1) // HALVES + STAGES, steps, loaded,
                         first, k_tiles, off_n, off_m, BLOCK_K, STAGES)
            acc += done.to(gl.float32) * prev_scale[None, :]
    else:
        # one int32 sum over the split's K range; each wgmma adds to the one before, which stays in flight until
        # the next is issued; the slot of the step just retired is refilled
        mbarrier.wait(ready.index(0), 0)
        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.int32, layout=mma)
        acc = warpgroup_mma(a_bufs.index(0), b_bufs.index(0).permute((1, 0)), acc, use_acc=False, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        for j in range(1, steps):
            slot = j % STAGES
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            _skinny_load(w_desc, x_desc, a_bufs, b_bufs, ready, j - 1 + STAGES, steps, loaded, first, k_tiles,
                         off_n, off_m, BLOCK_K, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    acc = gl.convert_layout(acc, out)
    is_last = True
    if SPLIT_K > 1:
        # as int8_gemm._split_k_sum: every split stores its partial, then bumps the tile's counter (acq_rel, GPU
        # scope, after a barrier); the last to arrive sums the partials in split order and resets the counter
        num_tiles = gl.cdiv(N, BLOCK_N) * num_pid_m
        offs = m_offs[None, :] * BLOCK_N + n_offs[:, None]  # a thread's 8 weight rows: 32 contiguous bytes
        gl.store(part_ptr + (pid_k * num_tiles + tile).to(gl.int64) * (BLOCK_N * BLOCK_M) + offs, acc,
                 cache_modifier=".cg")
        gl.thread_barrier()
        count = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        is_last = count == SPLIT_K - 1
        if is_last:
            acc = gl.zeros((BLOCK_N, BLOCK_M), acc.dtype, layout=out)
            for p in range(SPLIT_K):  # a loop, not unrolled: SPLIT_K tiles of loads in flight spilled at 128x64
                acc += gl.load(part_ptr + (p * num_tiles + tile).to(gl.int64) * (BLOCK_N * BLOCK_M) + offs,
                               cache_modifier=".cg")
            gl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    if is_last:
        if BLOCKED:
            y = acc
        else:  # (acc * x_s) * w_s, in the reference's order
            y = acc.to(gl.float32) * xs_out[None, :] * ws_out[:, None]
        if HAS_BIAS:
            y += bias[:, None]
        y_ptrs = y_ptr + cols.to(gl.int64)[None, :] * stride_ym + rows[:, None] * stride_yn
        gl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (cols[None, :] < M))


def int8_skinny_gemm_sm90(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                          bias: torch.Tensor | None, y: torch.Tensor, config: GemmConfig, blocked: bool,
                          part: torch.Tensor, locks: torch.Tensor) -> None:
    """y [M, N] = int8_gemm_channel (``blocked`` False) or int8_gemm_block with (128, 128) blocks (True) at decode
    sizes, on operands that ``supported`` passed: swap-AB tiles of config.block_n weight rows x config.block_m tokens,
    split-K config.split_k (``part`` and ``locks``: its scratch and tile counters, from
    ``int8_gemm._split_k_scratch``)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if blocked and not skinny_block_steps_ok(config):
        raise ValueError(f"block-scaled decode tiles take K steps of whole 128-K scale blocks that one GROUP_K "
                         f"({skinny_group_k(config)} sub-steps) holds: got {bm}x{bn}x{bk}")
    w_desc = TensorDescriptor(w_q, [n, k], [w_q.stride(0), 1], [bn, bk], _smem_layout(bn, bk))
    x_desc = TensorDescriptor(x_q, [m, k], [x_q.stride(0), 1], [bm, bk], _smem_layout(bm, bk))
    tiles = cdiv(n, bn) * cdiv(m, bm)
    with torch.cuda.device(x_q.device):
        _int8_skinny_gemm_sm90_kernel[(tiles * config.split_k,)](
            w_desc, x_desc, x_s, w_s, x_s if bias is None else bias, y,
            part, locks,
            m, n, k,
            x_s.stride(0), x_s.stride(1), w_s.stride(0), w_s.stride(1), y.stride(0), y.stride(1),
            BLOCKED=blocked, SCALE_N=128, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=config.num_stages, SPLIT_K=config.split_k,
            GROUP_K=skinny_group_k(config), SCALE_STEPS=sm90_decode_scale_steps(config, k), num_warps=4,
        )
