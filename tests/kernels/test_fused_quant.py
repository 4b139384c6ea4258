"""The ops that produce a quantized activation in one launch - ``fused_add_rms_norm`` / ``rms_norm_quant``
(ingot.kernels.norm_rope) and ``silu_mul`` / ``silu_mul_quant`` (ingot.kernels.silu_mul) - against the unfused
kernels they replace, bit for bit, and against their references in ingot.quant.ref.

What is bit-exact where:
- x + residual: always (one float32 sum rounded once, as torch's bf16/fp16 add; the interpreter's truncating bf16
  cast is replaced by an exact round-to-nearest-even on the bits).
- the normed / silu * up value: identical to ``rms_norm`` / ``silu_mul`` (the same kernel body); against torch,
  within one ulp (the norm sums squares in another order; under the interpreter silu uses numpy's exp, on the GPU
  libdevice's expf, which the `gpu` test holds to torch's bit for bit).
- x_q and x_s: bit for bit what ``per_token_quant_int8`` / ``per_token_group_quant`` (and the reference quantizers)
  give on that value.
Without CUDA the kernels run in Triton's interpreter on small shapes; the `gpu` tests add real sizes with poisoned
output memory (every element must be written).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ingot.kernels import norm_rope  # noqa: E402
from ingot.kernels.act_quant import per_token_group_quant, per_token_quant_int8, quantize_row_chunks  # noqa: E402
from ingot.kernels.norm_rope import fused_add_rms_norm, rms_norm, rms_norm_quant  # noqa: E402
from ingot.kernels.silu_mul import silu_mul, silu_mul_quant  # noqa: E402
from ingot.quant import ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16]
# (dtype, group_size, scale_fmt): int8-channel, int8-block, fp8-block, fp8-block ue8m0, and a smaller group
QUANTS = [("int8", None, "float"), ("int8", 128, "float"), ("fp8_e4m3", 128, "float"), ("fp8_e4m3", 128, "ue8m0"),
          ("int8", 64, "float")]
QUANT_IDS = ["token", "int8-g128", "fp8-g128", "fp8-ue8m0", "int8-g64"]
EPS = 1e-5
# silu of a large negative gate: exp(-gate) overflows to inf (and gate / inf = -0.0, as torch); numpy says so
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

if not CUDA and not norm_rope.INTERPRETED:
    pytest.skip("ingot.kernels was imported before TRITON_INTERPRET=1 was set: its kernels are compiled for CUDA",
                allow_module_level=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width) if t.dtype.is_floating_point else t


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _bits(got.cpu()), _bits(want.cpu())
    bad = (g != w).nonzero()
    if len(bad):
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: {len(bad)} of {g.numel()} elements differ; first at {i}: "
                             f"got {got.cpu()[i].float().item()!r}, want {want.cpu()[i].float().item()!r}")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the last place of b's dtype (relative to |b|)."""
    eps = torch.finfo(b.dtype).eps
    a, b = a.float().cpu(), b.float().cpu()
    unit = (b.abs() * eps).clamp_min(torch.finfo(torch.float32).tiny)
    return ((a - b).abs() / unit).max().item()


def _bit_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest number of representable values between a and b (16-bit floats, finite): 1 = adjacent."""
    def key(t):
        i = t.cpu().contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (key(a) - key(b)).abs().max().item()


def _quantize(y: torch.Tensor, dtype: str, group_size: int | None, scale_fmt: str):
    """The unfused kernels' quantization of a model-dtype activation."""
    if group_size is None:
        return per_token_quant_int8(y)
    return per_token_group_quant(y, dtype, group_size, scale_fmt)


def _rows(m: int, n: int, dtype: torch.dtype, seed: int, scale: float = 3.0, device=DEVICE) -> torch.Tensor:
    """Activations with outlier channels, an all-zero row (scale 0) and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * scale
    x[:, torch.randperm(n, generator=g)[: max(1, n // 64)]] *= 20.0
    if m >= 3:
        x[1] = 0.0
    x[0, -1] = -0.0
    return x.to(dtype).to(device)


def _norm_weight(n: int, dtype: torch.dtype, seed: int, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).to(device)


# ----------------------------------------------------------------------------------- fused_add_rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n", [(1, 576), (33, 576), (222, 100), (1, 2048), (33, 2048)])
def test_fused_add_rms_norm(dtype, m, n):
    x, r, w = _rows(m, n, dtype, m + n), _rows(m, n, dtype, m * n, scale=1.0), _norm_weight(n, dtype, n)
    normed, h = fused_add_rms_norm(x, r, w, EPS)
    assert_same(h, x + r, "x + residual")  # torch's add, bit for bit
    assert_same(normed, rms_norm(x + r, w, EPS), "normed vs rms_norm")  # the same kernel body
    want, want_h = ref.fused_add_rms_norm_ref(x.cpu(), r.cpu(), w.cpu(), EPS)
    assert_same(h, want_h, "x + residual vs ref")
    assert _ulps(normed, want) <= 1.0 + 1e-6  # the sum of squares in another order


def test_rms_norm_matches_the_reference_within_one_ulp():
    """rms_norm rounds to bf16 to nearest even in the interpreter too now (was: truncating casts, 2 ulps)."""
    for dtype in DTYPES:
        x, w = _rows(33, 576, dtype, 5), _norm_weight(576, dtype, 5)
        assert _ulps(rms_norm(x, w, EPS), ref.rms_norm_ref(x.cpu(), w.cpu(), EPS)) <= 1.0 + 1e-6


def test_rms_norm_ref_is_the_module():
    from ingot.layers.norm import RMSNorm

    norm = RMSNorm(100, EPS, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(_norm_weight(100, torch.bfloat16, 0, "cpu"))
    x = _rows(7, 100, torch.bfloat16, 1, device="cpu")
    assert_same(ref.rms_norm_ref(x, norm.weight, EPS), norm(x), "rms_norm_ref")


# ----------------------------------------------------------------------------------- rms_norm_quant


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("m, n", [(1, 576), (33, 576), (33, 100), (1, 2048), (33, 1024)])
def test_rms_norm_quant_equals_norm_then_quant(quant, residual, m, n):
    dtype = torch.bfloat16
    x, w = _rows(m, n, dtype, m + n), _norm_weight(n, dtype, n)
    r = _rows(m, n, dtype, 7 * m + n, scale=1.0) if residual else None
    x_q, x_s, h = rms_norm_quant(x, w, EPS, *quant, residual=r)
    if residual:
        normed, want_h = fused_add_rms_norm(x, r, w, EPS)
        assert_same(h, want_h, "x + residual")
    else:
        normed = rms_norm(x, w, EPS)
        assert h is None
    q_want, s_want = _quantize(normed, *quant)  # the unfused kernels
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")
    q_ref, s_ref = ref.quantize_act(normed.cpu(), *quant)  # the reference quantizer on the same normed values
    assert_same(x_q, q_ref, "x_q vs ref")
    assert_same(x_s, s_ref, "x_s vs ref")
    groups = 1 if quant[1] is None else -(-n // quant[1])
    assert x_q.shape == (m, n) and x_s.shape == (m, groups)


@pytest.mark.parametrize("quant", [QUANTS[0], QUANTS[3]], ids=[QUANT_IDS[0], QUANT_IDS[3]])
def test_rms_norm_quant_many_rows(quant):
    test_rms_norm_quant_equals_norm_then_quant(quant, True, 222, 576)


@pytest.mark.parametrize("quant", QUANTS[:3], ids=QUANT_IDS[:3])
def test_rms_norm_quant_against_the_reference(quant):
    """Against rms_norm_quant_ref (torch's norm): the norm's one-ulp differences move a quantized value by at most
    one step, rarely."""
    x, w, r = _rows(33, 576, torch.bfloat16, 3), _norm_weight(576, torch.bfloat16, 3), _rows(33, 576, torch.bfloat16, 4)
    x_q, x_s, h = rms_norm_quant(x, w, EPS, *quant, residual=r)
    q_ref, s_ref, h_ref = ref.rms_norm_quant_ref(x.cpu(), w.cpu(), EPS, *quant, residual=r.cpu())
    assert_same(h, h_ref, "x + residual")
    assert torch.allclose(x_s.cpu(), s_ref, rtol=2**-7, atol=0)
    step = (x_q.cpu().float() - q_ref.float()).abs()
    assert step.max().item() <= (1.0 if quant[0] == "int8" else 32.0)  # fp8: one e4m3 step at the top is 32
    assert (step > 0).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_quant_shapes_and_strides(dtype):
    """[B, T, N] inputs, a row-strided x (MLA's split of a wider projection), fp16, and M = 0."""
    w = _norm_weight(200, dtype, 0)
    wide = _rows(6, 300, dtype, 1)
    x = wide[:, :200]  # row stride 300
    x_q, x_s, _ = rms_norm_quant(x, w, EPS, "int8", 128)
    q_want, s_want = _quantize(rms_norm(x.contiguous(), w, EPS), "int8", 128, "float")
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")
    x3 = _rows(6, 200, dtype, 2).view(2, 3, 200)
    r3 = _rows(6, 200, dtype, 3).view(2, 3, 200)
    x_q, x_s, h = rms_norm_quant(x3, w, EPS, residual=r3)
    assert x_q.shape == (2, 3, 200) and x_s.shape == (2, 3, 1) and h.shape == (2, 3, 200)
    q_want, s_want = per_token_quant_int8(fused_add_rms_norm(x3, r3, w, EPS)[0])
    assert_same(x_q, q_want, "x_q 3-D")
    assert_same(x_s, s_want, "x_s 3-D")
    empty = torch.zeros(0, 200, dtype=dtype, device=DEVICE)
    x_q, x_s, _ = rms_norm_quant(empty, w, EPS, "fp8_e4m3", 128)
    assert x_q.shape == (0, 200) and x_s.shape == (0, 2)


def test_rms_norm_quant_group_larger_than_the_row():
    """K = 100 < one group of 128: one zero-padded group (per_token_group_quant's ragged group)."""
    x, w = _rows(5, 100, torch.bfloat16, 9), _norm_weight(100, torch.bfloat16, 9)
    x_q, x_s, _ = rms_norm_quant(x, w, EPS, "fp8_e4m3", 128, "ue8m0")
    q_want, s_want = _quantize(rms_norm(x, w, EPS), "fp8_e4m3", 128, "ue8m0")
    assert x_s.shape == (5, 1)
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")


# ----------------------------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n", [(1, 576), (33, 576), (222, 100), (1, 2048), (5, 2500)])
def test_silu_mul_matches_torch(dtype, m, n):
    gate_up = _rows(m, 2 * n, dtype, m + n)  # the halves of one gate_up output: row stride 2n
    gate, up = gate_up.chunk(2, dim=-1)
    got = silu_mul(gate, up)
    want = F.silu(gate.cpu()) * up.cpu()
    assert got.shape == (m, n) and got.dtype == dtype and got.is_contiguous()
    if CUDA:
        assert_same(got, F.silu(gate) * up, "silu_mul vs torch on the GPU")
    else:  # numpy's float32 exp vs torch's CPU exp: silu one value apart, rarely, and the product at most two
        assert _bit_distance(got, want) <= 2
    assert_same(ref.silu_mul_ref(gate.cpu(), up.cpu()), want, "silu_mul_ref")


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("m, n", [(1, 576), (33, 576), (222, 100), (1, 2048), (33, 1536)])
def test_silu_mul_quant_equals_silu_mul_then_quant(quant, m, n):
    gate_up = _rows(m, 2 * n, torch.bfloat16, m * 3 + n, scale=2.0)
    gate, up = gate_up.chunk(2, dim=-1)
    x_q, x_s = silu_mul_quant(gate, up, *quant)
    act = silu_mul(gate, up)
    q_want, s_want = _quantize(act, *quant)
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")
    q_ref, s_ref = ref.quantize_act(act.cpu(), *quant)
    assert_same(x_q, q_ref, "x_q vs ref")
    assert_same(x_s, s_ref, "x_s vs ref")


def test_silu_mul_quant_padded_halves_and_shapes():
    """MoE's layout: gate in columns [0, I), up in [I_pad, I_pad + I) of a [rows, 2 I_pad] GEMM output; [B, T, I]
    inputs; fp16; M = 0."""
    h = _rows(9, 2 * 128, torch.bfloat16, 4)
    gate, up = h[:, :96], h[:, 128:224]
    for quant in (("int8", None, "float"), ("fp8_e4m3", 64, "ue8m0")):
        x_q, x_s = silu_mul_quant(gate, up, *quant)
        q_want, s_want = _quantize(silu_mul(gate, up), *quant)
        assert_same(x_q, q_want, f"x_q {quant}")
        assert_same(x_s, s_want, f"x_s {quant}")
    g3 = _rows(6, 300, torch.float16, 5).view(2, 3, 300)
    u3 = _rows(6, 300, torch.float16, 6).view(2, 3, 300)
    x_q, x_s = silu_mul_quant(g3, u3, "int8", 128)
    assert x_q.shape == (2, 3, 300) and x_s.shape == (2, 3, 3)
    q_want, s_want = _quantize(silu_mul(g3, u3), "int8", 128, "float")
    assert_same(x_q, q_want, "x_q 3-D fp16")
    assert_same(x_s, s_want, "x_s 3-D fp16")
    x_q, x_s = silu_mul_quant(g3[:0], u3[:0])
    assert x_q.shape == (0, 3, 300) and x_s.shape == (0, 3, 1)


def test_silu_mul_quant_long_rows_take_two_launches(monkeypatch):
    """Per-token rows longer than one program holds: silu_mul, then per_token_quant_int8 - the same bits."""
    from ingot.kernels import silu_mul as module

    monkeypatch.setattr(module, "ONE_PASS_MAX_K", 512)
    gate, up = _rows(3, 1000, torch.bfloat16, 8), _rows(3, 1000, torch.bfloat16, 9)
    x_q, x_s = silu_mul_quant(gate, up)
    q_want, s_want = per_token_quant_int8(silu_mul(gate, up))
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")


@pytest.mark.parametrize("m, n", [(1, 14336), (3, 1000), (5, 576)])
def test_silu_mul_quant_split_rows_equal_one_program_per_row(monkeypatch, m, n):
    """Short batches spread each row over column programs (chunk maxima, then quantize_row_chunks): the same bits as
    one program per row, which the threshold 0 forces."""
    from ingot.kernels import silu_mul as module

    gate, up = _rows(m, n, torch.bfloat16, 10 + m, scale=3.0), _rows(m, n, torch.bfloat16, 20 + m)
    assert m <= module.SPLIT_ROWS_MAX
    x_q, x_s = silu_mul_quant(gate, up)
    monkeypatch.setattr(module, "SPLIT_ROWS_MAX", 0)
    q_one, s_one = silu_mul_quant(gate, up)
    assert_same(x_q, q_one, "x_q split rows vs one program")
    assert_same(x_s, s_one, "x_s split rows vs one program")
    q_want, s_want = per_token_quant_int8(silu_mul(gate, up))
    assert_same(x_q, q_want, "x_q vs silu_mul then per_token_quant_int8")
    assert_same(x_s, s_want, "x_s vs silu_mul then per_token_quant_int8")


def test_quantize_row_chunks_takes_any_ranges_and_refuses_bad_maxima():
    """The maxima may cover the row in any number of ranges (silu's 1024-column chunks, attention's head groups):
    only their max sets the scale. Wrong rows, an empty or non-fp32 maxima is refused."""
    x = _rows(3, 1500, torch.bfloat16, 5, scale=2.0)
    q_want, s_want = per_token_quant_int8(x)
    for ranges in (1, 3, 7):
        maxima = torch.stack([c.float().abs().amax(-1) for c in x.chunk(ranges, dim=-1)], dim=-1).contiguous()
        x_q, x_s = quantize_row_chunks(x, maxima)
        assert_same(x_q, q_want, f"x_q from {ranges} ranges")
        assert_same(x_s, s_want, f"x_s from {ranges} ranges")
    for bad in (torch.zeros((2, 2), device=DEVICE), torch.zeros((3, 0), device=DEVICE),
                torch.zeros((3, 2), dtype=torch.float16, device=DEVICE)):
        with pytest.raises(ValueError, match=r"maxima must be float32 \[M, C\] = \[3, C >= 1\]"):
            quantize_row_chunks(x, bad)


# ----------------------------------------------------------------------------------- refusals


def _x(shape=(4, 256), dtype=torch.bfloat16):
    return torch.ones(shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: rms_norm_quant(_x(), _x((256,)), EPS, "int8", 96), ValueError, "power of two.*96"),
        (lambda: rms_norm_quant(_x(), _x((256,)), EPS, "int8", 128, "ue8m0"), ValueError, "ue8m0"),
        (lambda: rms_norm_quant(_x(), _x((256,)), EPS, "fp8_e4m3", None), ValueError, "per token.*int8"),
        (lambda: rms_norm_quant(_x(), _x((256,)), EPS, "int4"), ValueError, "dtype must be one of"),
        (lambda: rms_norm_quant(_x(), _x((256,), torch.float16), EPS), TypeError, "share a dtype"),
        (lambda: fused_add_rms_norm(_x(), _x((4, 128)), _x((256,)), EPS), ValueError, "residual"),
        (lambda: fused_add_rms_norm(_x(), _x(dtype=torch.float16), _x((256,)), EPS), ValueError, "residual"),
        (lambda: silu_mul(_x(), _x((4, 128))), ValueError, "one shape"),
        (lambda: silu_mul(_x(dtype=torch.float32), _x(dtype=torch.float32)), TypeError, "share a dtype"),
        (lambda: silu_mul_quant(_x(), _x(), "int8", 0), ValueError, "group_size"),
    ],
)
def test_refusals_name_the_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------- GPU: real sizes


def _poison_allocator(*shapes_dtypes) -> None:
    """Fill, then free, blocks of the sizes the wrapper is about to allocate: the caching allocator hands them back,
    so an element the kernel forgets to write holds 0xFF bytes (NaN scales / fp8 / bf16, -1 int8), not a lucky 0."""
    blocks = [torch.full((dtype.itemsize * torch.Size(shape).numel(),), -1, dtype=torch.int8, device="cuda")
              for shape, dtype in shapes_dtypes]
    del blocks


def _gpu_rows(m: int, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(m, n, device="cuda") * torch.rand(m, 1, device="cuda") * 4
    x[:, torch.randperm(n, device="cuda")[:16]] *= 30.0
    return x.bfloat16()


def _q_dtype(quant):
    return torch.int8 if quant[0] == "int8" else torch.float8_e4m3fn


@pytest.mark.gpu
@pytest.mark.parametrize("quant", QUANTS[:4], ids=QUANT_IDS[:4])
@pytest.mark.parametrize("n", [4096, 7168])
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_gpu_rms_norm_quant_real_sizes(m, n, quant):
    x, r = _gpu_rows(m, n, m + n), _gpu_rows(m, n, 3 * m + n)
    w = (1 + 0.1 * torch.randn(n, device="cuda")).bfloat16()
    groups = 1 if quant[1] is None else n // quant[1]
    _poison_allocator(((m, n), _q_dtype(quant)), ((m, groups), torch.float32), ((m, n), torch.bfloat16))
    x_q, x_s, h = rms_norm_quant(x, w, EPS, *quant, residual=r)
    torch.cuda.synchronize()
    normed, want_h = fused_add_rms_norm(x, r, w, EPS)
    assert_same(h, x + r, "x + residual vs torch")
    assert_same(want_h, x + r, "fused_add_rms_norm's sum vs torch")
    assert_same(normed, rms_norm(x + r, w, EPS), "fused_add_rms_norm vs rms_norm")
    # Against the torch reference: the sum of squares over 4096-7168 channels runs in another order, and the bf16
    # normalized value is rounded twice (then * weight), so a row can land 2 ulps away (seen on the H100 at m = 1,
    # n = 4096); the fused kernel itself equals the unfused one bit for bit (above).
    ulps = _ulps(normed, ref.rms_norm_ref(x + r, w, EPS))
    assert ulps <= 2.0 + 1e-6, ulps
    q_want, s_want = _quantize(normed, *quant)
    assert_same(x_q, q_want, "x_q")
    assert_same(x_s, s_want, "x_s")
    _poison_allocator(((m, n), _q_dtype(quant)), ((m, groups), torch.float32))
    x_q, x_s, _ = rms_norm_quant(x, w, EPS, *quant)  # no residual (layer 0, MLA's q_a_layernorm)
    q_want, s_want = _quantize(rms_norm(x, w, EPS), *quant)
    assert_same(x_q, q_want, "x_q (no residual)")
    assert_same(x_s, s_want, "x_s (no residual)")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [14336, 18432, 2048])  # Llama-3-8B, DeepSeek-V3 dense, a DeepSeek-V3 expert
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_gpu_silu_mul_real_sizes(m, n):
    gate_up = _gpu_rows(m, 2 * n, m + n)
    gate, up = gate_up.chunk(2, dim=-1)
    _poison_allocator(((m, n), torch.bfloat16))
    got = silu_mul(gate, up)
    torch.cuda.synchronize()
    assert_same(got, F.silu(gate) * up, "silu_mul vs torch (libdevice expf, IEEE division)")
    for quant in QUANTS[:4]:
        groups = 1 if quant[1] is None else n // quant[1]
        _poison_allocator(((m, n), _q_dtype(quant)), ((m, groups), torch.float32))
        x_q, x_s = silu_mul_quant(gate, up, *quant)
        torch.cuda.synchronize()
        q_want, s_want = _quantize(got, *quant)
        assert_same(x_q, q_want, f"x_q {quant}")
        assert_same(x_s, s_want, f"x_s {quant}")
