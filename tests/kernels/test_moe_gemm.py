"""Grouped MoE kernels (ingot.kernels.moe_gemm) against their references (ingot.quant.moe_ref).

CPU: Triton's interpreter on small shapes (E = 8, top_k = 2, T in 1, 5, 33; H = 256, I = 128 and a ragged 200 / 96):
the alignment equals the reference exactly, the integer kinds bit for bit (their dots are exact and the float
epilogue runs in the reference's order), bf16 / fp8 within fp32 summation-order bounds. GPU (marked ``gpu``):
DeepSeek-V3 sizes (E = 256, top_k = 8, H = 7168, I = 2048, T in 1, 16, 256) into NaN-poisoned outputs.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():  # read by triton.jit when the kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from ingot.kernels import moe_gemm as mg  # noqa: E402
from ingot.kernels.moe_gemm import GemmConfig, moe_align, moe_gemm  # noqa: E402
from ingot.quant import ref  # noqa: E402
from ingot.quant.moe_ref import moe_align_ref, moe_gemm_ref  # noqa: E402
from ingot.quant.schemes import Scheme  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and not mg.INTERPRETED:
    pytest.skip("ingot.kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
KINDS = ("bf16", "int8-channel", "int8-block", "fp8-block")
FP32_TOL = 1e-5  # max |y - ref| / max |ref|: fp32 summation order (bf16 kind on fp32, fp8 per-block dots)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _routing(t: int, e: int, top_k: int, seed: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids int64 [T, top_k] (distinct experts per token, as a router gives) and fp32 weights [T, top_k].
    skew: most tokens pick from the first few experts (long runs, many experts without tokens)."""
    g = _gen(seed)
    scores = torch.rand(t, e, generator=g, device=DEVICE)
    if skew:
        scores[:, : max(top_k, e // 8)] += 1.0
    ids = scores.topk(top_k, dim=-1).indices
    return ids, torch.rand(t, top_k, generator=g, device=DEVICE)


def _check_alignment_structure(al, ids: torch.Tensor) -> None:
    """Every assignment once, each run one expert's and padded to block_m, blocks past the used rows marked -1."""
    used = int(al.num_tokens_post_padded.item())
    bm, numel = al.block_m, ids.numel()
    assert used % bm == 0 and used <= al.max_blocks * bm
    sorted_ids = al.sorted_token_ids[:used].long().cpu()
    experts = al.expert_ids.long().cpu()
    real = sorted_ids < numel
    assert torch.equal(sorted_ids[real].sort().values, torch.arange(numel))
    flat = ids.flatten().cpu()
    block_of = torch.arange(used) // bm
    assert torch.equal(flat[sorted_ids[real]], experts[block_of[real]]), "a row sits in another expert's block"
    assert (experts[: used // bm] >= 0).all() and (experts[used // bm :] == -1).all()
    assert (experts[: used // bm].diff() >= 0).all(), "blocks in expert order"
    counts = torch.bincount(flat, minlength=al.num_experts)
    assert used == int(((counts + bm - 1) // bm * bm).sum())


@pytest.mark.parametrize("t, e, top_k, block_m, skew", [
    (1, 8, 2, 16, False), (5, 8, 2, 16, False), (33, 8, 2, 16, False), (33, 8, 2, 64, True),
    (40, 256, 8, 16, False),  # 320 assignments: two programs, 256 experts, most empty
    (700, 64, 6, 32, True),  # 4200 assignments: 17 programs of 256
    pytest.param(8192, 256, 8, 64, True, marks=pytest.mark.gpu),  # prefill: 65536 assignments, 64 programs of 1024
])
def test_align_matches_ref(t, e, top_k, block_m, skew):
    ids, _ = _routing(t, e, top_k, seed=t + e, skew=skew)
    al, expected = moe_align(ids, e, block_m), moe_align_ref(ids, e, block_m)
    used = int(expected.num_tokens_post_padded.item())
    assert al.max_blocks == expected.max_blocks == mg.max_aligned_blocks(t * top_k, e, block_m)
    assert int(al.num_tokens_post_padded.item()) == used
    assert torch.equal(al.sorted_token_ids[:used], expected.sorted_token_ids[:used])  # stable: token order
    assert torch.equal(al.expert_ids, expected.expert_ids)
    _check_alignment_structure(al, ids)
    al32 = moe_align(ids.int(), e, block_m)  # int32 ids read the same
    assert torch.equal(al32.sorted_token_ids[:used], al.sorted_token_ids[:used])


def test_align_worst_case_bound():
    """Decode of one DeepSeek-V3 token: 8 experts of 256, 16-row blocks: 8 blocks, not 241."""
    assert mg.max_aligned_blocks(8, 256, 16) == 8
    assert mg.max_aligned_blocks(256 * 8, 256, 16) == -(-(2048 + 256 * 15) // 16)
    ids = torch.arange(8, device=DEVICE).view(1, 8) * 32  # every expert alone: 8 runs of 1 row, 8 blocks
    al = moe_align(ids, 256, 16)
    assert int(al.num_tokens_post_padded.item()) == 128 and al.max_blocks == 8


def _weights(kind: str, e: int, n: int, k: int, seed: int, dtype=torch.float32, block_size=(128, 128)):
    """Stacked expert weights [E, N, K] of ``kind`` (quantized per expert by ref.quantize_weight) and their scales."""
    g = _gen(seed)
    scheme = Scheme.from_name(kind)
    if kind in ("int8-block", "fp8-block"):
        scheme = replace(scheme, block_size=block_size, act_group_size=block_size[1])
    stack = scales = None
    for i in range(e):  # one expert's fp32 weight at a time (all of DeepSeek-V3's gate_up would be 30 GB)
        w = torch.randn(n, k, generator=g, device=DEVICE) * 0.05
        w[: min(n, 3)] *= 20  # loud rows: scales must differ between blocks / channels
        q = w.to(dtype) if kind == "bf16" else ref.quantize_weight(w, scheme)
        q, s = (q, None) if kind == "bf16" else (q.qweight, q.scale)
        if stack is None:
            stack = torch.empty((e, *q.shape), dtype=q.dtype, device=DEVICE)
            scales = None if s is None else torch.empty((e, *s.shape), dtype=s.dtype, device=DEVICE)
        stack[i] = q
        if s is not None:
            scales[i] = s
    return stack, scales


def _acts(kind: str, x: torch.Tensor, group: int = 128):
    """The A operand as the layer makes it (the reference quantizers equal the act_quant kernels bit for bit)."""
    if kind == "bf16":
        return x, None
    if kind == "int8-channel":
        return ref.quantize_act_token(x)
    return ref.quantize_act_group(x, "int8" if kind == "int8-block" else "fp8_e4m3", group)


def _close(y: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs (rows not written?)"
    err = (y.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:.1e} * {scale:.3g}"


def _exact_or_close(kind: str, y, expected, what: str) -> None:
    if kind in ("int8-channel", "int8-block") and not CUDA:
        assert torch.equal(y, expected), what
    else:
        _close(y, expected, GPU_TOL.get(kind, FP32_TOL) if CUDA else FP32_TOL, what)


GPU_TOL = {"bf16": 1e-3, "fp8-block": 2e-3, "int8-channel": 1e-5, "int8-block": 1e-5}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("h, inter", [(256, 128), (200, 96)])
def test_gemm_matches_ref(kind, h, inter):
    """Both GEMMs of a layer: gate_up ([E, 2I, H], A one row per token, no weights) and down ([E, H, I], A one row
    per assignment, times the routing weights), fp32 out, T in 1, 5, 33."""
    e, top_k = 8, 2
    w13, s13 = _weights(kind, e, 2 * inter, h, seed=1)
    w2, s2 = _weights(kind, e, h, inter, seed=2)
    for t in (1, 5, 33):
        ids, tw = _routing(t, e, top_k, seed=t)
        al = moe_align(ids, e, mg.default_config(t, top_k, e).block_m)
        x = torch.randn(t, h, generator=_gen(t), device=DEVICE)
        a, a_s = _acts(kind, x)
        y = moe_gemm(a, a_s, w13, s13, al, kind, out_dtype=torch.float32)
        _exact_or_close(kind, y, moe_gemm_ref(a, a_s, w13, s13, al, kind, out_dtype=torch.float32), f"gate_up T={t}")
        act = torch.randn(t * top_k, inter, generator=_gen(t + 1), device=DEVICE)
        a, a_s = _acts(kind, act)
        y = moe_gemm(a, a_s, w2, s2, al, kind, topk_weights=tw, out_dtype=torch.float32)
        _exact_or_close(kind, y, moe_gemm_ref(a, a_s, w2, s2, al, kind, topk_weights=tw, out_dtype=torch.float32),
                        f"down T={t}")


def test_bf16_operands_and_outputs():
    """bf16 activations and weights (the interpreter multiplies them in fp32), bf16 output: within one bf16 ulp of
    the reference (the interpreter truncates fp32 -> bf16 casts; the GPU rounds)."""
    e, top_k, t = 8, 2, 33
    w, _ = _weights("bf16", e, 192, 256, seed=3, dtype=torch.bfloat16)
    ids, tw = _routing(t, e, top_k, seed=4)
    al = moe_align(ids, e, 16)
    x = torch.randn(t, 256, generator=_gen(5), device=DEVICE).bfloat16()
    y = moe_gemm(x, None, w, None, al, "bf16", topk_weights=tw, out_dtype=torch.bfloat16)
    expected = moe_gemm_ref(x, None, w, None, al, "bf16", topk_weights=tw, out_dtype=torch.float32)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8-block", "fp8-block"])
def test_block_sizes_and_tiles(kind):
    """64 x 64 weight blocks (N tiles of 128 span two block rows: per-column scales) and a caller's config whose
    BLOCK_M is the alignment's; a skewed routing (long runs over several blocks, empty experts)."""
    e, top_k, t, n, k = 8, 2, 33, 160, 192
    w, s = _weights(kind, e, n, k, seed=6, block_size=(64, 64))
    ids, tw = _routing(t, e, top_k, seed=7, skew=True)
    x = torch.randn(t, k, generator=_gen(8), device=DEVICE)
    a, a_s = _acts(kind, x, group=64)
    for config in (GemmConfig(16, 128, 64, group_m=4), GemmConfig(32, 32, 64, group_m=1)):
        al = moe_align(ids, e, config.block_m)
        y = moe_gemm(a, a_s, w, s, al, kind, (64, 64), topk_weights=tw, out_dtype=torch.float32, config=config)
        expected = moe_gemm_ref(a, a_s, w, s, al, kind, (64, 64), topk_weights=tw, out_dtype=torch.float32)
        _exact_or_close(kind, y, expected, f"{config}")


def test_refusals():
    e, top_k, t = 8, 2, 5
    w, s = _weights("int8-block", e, 256, 256, seed=9)
    ids, tw = _routing(t, e, top_k, seed=10)
    al = moe_align(ids, e, 16)
    a, a_s = _acts("int8-block", torch.randn(t, 256, device=DEVICE))
    with pytest.raises(ValueError, match="block_m = 16"):
        moe_gemm(a, a_s, w, s, al, "int8-block", config=GemmConfig(32, 64, 128))
    with pytest.raises(ValueError, match="block_k = 64 must equal the K quantization block 128"):
        moe_gemm(a, a_s, w, s, al, "int8-block", config=GemmConfig(16, 64, 64))
    with pytest.raises(ValueError, match="a has 4 rows: expected T = 5"):
        moe_gemm(a[:4], a_s[:4], w, s, al, "int8-block")
    with pytest.raises(ValueError, match=r"w_s must be per expert per 128x128 block, shape \(8, 2, 2\)"):
        moe_gemm(a, a_s, w, s[:, :1].contiguous(), al, "int8-block")
    with pytest.raises(ValueError, match="has 8 experts, the alignment routes to 16"):
        moe_gemm(a, a_s, w, s, moe_align(ids, 16, 16), "int8-block")
    with pytest.raises(TypeError, match="w must be torch.int8"):
        moe_gemm(a, a_s, w.float(), s, al, "int8-block")
    with pytest.raises(ValueError, match="topk_weights must be"):
        moe_gemm(a, a_s, w, s, al, "int8-block", topk_weights=tw[:, :1].contiguous())
    with pytest.raises(ValueError, match="kind must be one of"):
        moe_gemm(a, a_s, w, s, al, "int4-group")
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        moe_align(ids, e, 8)
    with pytest.raises(ValueError, match="top_k must be in"):
        moe_align(ids, 1, 16)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.fixture(scope="module")
def v3_weights():
    """DeepSeek-V3 expert stacks per kind, made once: gate_up [256, 4096, 7168], down [256, 7168, 2048]."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache.clear()  # one kind at a time: int8 stacks are 11 GB, bf16 22 GB
            torch.cuda.empty_cache()
            cache[kind] = (_weights(kind, 256, 4096, 7168, seed=11, dtype=torch.bfloat16),
                           _weights(kind, 256, 7168, 2048, seed=12, dtype=torch.bfloat16))
        return cache[kind]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [1, 16, 256])
def test_gpu_v3_sizes(kind, t, v3_weights):
    from ingot.kernels.fp8_gemm import fp8_supported

    if kind == "fp8-block" and not fp8_supported(DEVICE):
        pytest.skip("no FP8 tensor cores on this GPU")
    e, top_k = 256, 8
    (w13, s13), (w2, s2) = v3_weights(kind)
    ids, tw = _routing(t, e, top_k, seed=t)
    al = moe_align(ids, e, mg.default_config(t, top_k, e).block_m)
    _check_alignment_structure(al, ids)
    x = torch.randn(t, 7168, generator=_gen(t), device=DEVICE)
    a, a_s = _acts(kind, x.bfloat16() if kind == "bf16" else x)
    out = torch.full((t * top_k, 4096), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # poisoned
    moe_gemm(a, a_s, w13, s13, al, kind, out=out)
    expected = moe_gemm_ref(a, a_s, w13, s13, al, kind, out_dtype=torch.float32)
    _close(out, expected, 2.0**-8 + GPU_TOL[kind], f"{kind} gate_up T={t}")
    act = torch.randn(t * top_k, 2048, generator=_gen(t + 1), device=DEVICE)
    a, a_s = _acts(kind, act.bfloat16() if kind == "bf16" else act)
    out = torch.full((t * top_k, 7168), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    moe_gemm(a, a_s, w2, s2, al, kind, topk_weights=tw, out=out)
    expected = moe_gemm_ref(a, a_s, w2, s2, al, kind, topk_weights=tw, out_dtype=torch.float32)
    _close(out, expected, 2.0**-8 + GPU_TOL[kind], f"{kind} down T={t}")


@pytest.mark.gpu
def test_gpu_align_in_a_cuda_graph():
    """moe_align and moe_gemm captured once, replayed with other routings: each replay equals the eager result."""
    e, top_k, t = 256, 8, 16
    w, s = _weights("int8-block", e, 512, 1024, seed=13)
    ids, tw = _routing(t, e, top_k, seed=14)
    x = torch.randn(t, 1024, device=DEVICE)
    static_ids, static_x = ids.clone(), x.clone()

    def step():  # the act_quant kernel, not the reference quantizer (its finiteness check reads the device)
        from ingot.kernels.act_quant import per_token_group_quant

        al = moe_align(static_ids, e, 16)
        a, a_s = per_token_group_quant(static_x, "int8", 128)
        return moe_gemm(a, a_s, w, s, al, "int8-block", out_dtype=torch.float32)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in range(3):
        ids, _ = _routing(t, e, top_k, seed=20 + seed, skew=seed == 1)
        static_ids.copy_(ids)
        static_x.copy_(torch.randn(t, 1024, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, step()), f"replay {seed}"
