"""Block dequantization (ingot.kernels.dequant.block_dequant) against ingot.quant.ref.block_dequant_ref, bit for bit,
and the converter's ``--device cuda`` dequantize step that uses it (ingot.quant.convert._dequantize).

float32 outputs are one IEEE multiply of the exact decoded weight by its scale on both sides, so they must agree in
every bit (-0.0 and NaN positions included). On CPU the kernel runs in Triton's interpreter; GPU tests (marked
``gpu``) run real sizes, bf16 outputs (round to nearest even there, so bit-exact too) and whole conversions on the GPU
against the CPU's bytes.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # read by triton.jit when the kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ingot.formats.base import StoredLinear  # noqa: E402
from ingot.kernels import dequant  # noqa: E402
from ingot.kernels.dequant import block_dequant  # noqa: E402
from ingot.quant import convert as convert_mod  # noqa: E402
from ingot.quant import ref  # noqa: E402
from ingot.quant.convert import ConvertOptions, convert  # noqa: E402
from ingot.quant.schemes import Scheme  # noqa: E402

INTERPRET = dequant.INTERPRETED
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip(
        "ingot.kernels.dequant was imported before TRITON_INTERPRET=1 was set: its kernel is compiled for CUDA",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# (N, K, block): ragged against 128 in one or both dimensions, tiny, and block sizes that are not the tile's
# (64 x 32: several blocks per 32 x 128 tile; 96 x 100: no power of two at all).
SHAPES = [(576, 192, (128, 128)), (100, 300, (128, 128)), (129, 7, (128, 128)), (1, 1, (128, 128)),
          (300, 300, (64, 32)), (200, 250, (96, 100))]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def random_fp8(n: int, k: int, g: torch.Generator, nan: bool = True) -> torch.Tensor:
    """Every e4m3 code: subnormals, both zeros, and (unless ``nan`` is False) the NaNs 0x7F / 0xFF."""
    b = torch.randint(0, 256, (n, k), generator=g, device=DEVICE, dtype=torch.int32).to(torch.uint8)
    if not nan:
        b -= ((b & 0x7F) == 0x7F).to(torch.uint8)
    return b.view(FP8)


def random_int8(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, (n, k), generator=g, device=DEVICE, dtype=torch.int8)


def random_scales(n: int, k: int, block: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Positive scales over three decades, like DeepSeek's amax / 448 (real ones are ~1e-6 to 1e-3)."""
    shape = (cdiv(n, block[0]), cdiv(k, block[1]))
    return 10.0 ** (torch.rand(shape, generator=g, device=DEVICE) * 3.0 - 6.0)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same dtype, shape, and bits (NaN positions compared as bits too: the kernel's NaN is the canonical 0x7FC00000
    where torch's may carry a sign, so NaNs are compared by position)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
    g, w = got.cpu(), want.cpu()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(g), nan), f"{what}: NaN positions differ"
    width = {4: torch.int32, 2: torch.int16}[g.element_size()]
    bad = (g.view(width) != w.view(width)) & ~nan
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {g.numel()} elements differ; first at {bad.nonzero()[0].tolist()}")


# ------------------------------------------------------------------------------------------ against the ref


@pytest.mark.parametrize("n,k,block", SHAPES)
def test_fp8_bit_exact(n, k, block):
    g = _gen(n * 1000 + k)
    w_q, w_s = random_fp8(n, k, g), random_scales(n, k, block, g)
    y = block_dequant(w_q, w_s, block, out_dtype=torch.float32)
    assert_bits_equal(y, ref.block_dequant_ref(w_q, w_s, block, torch.float32), f"fp8 {n}x{k} block {block}")


@pytest.mark.parametrize("n,k,block", SHAPES)
def test_int8_bit_exact(n, k, block):
    g = _gen(n * 1000 + k + 1)
    w_q, w_s = random_int8(n, k, g), random_scales(n, k, block, g)
    y = block_dequant(w_q, w_s, block, out_dtype=torch.float32)
    assert_bits_equal(y, ref.block_dequant_ref(w_q, w_s, block, torch.float32), f"int8 {n}x{k} block {block}")


def test_every_e4m3_code():
    """All 256 codes with unit scales decode to torch's own fp8 -> fp32 conversion: normals, the subnormals m * 2^-9,
    +-0.0 (sign kept), +-448, NaN at 0x7F and 0xFF."""
    codes = torch.arange(256, dtype=torch.int32, device=DEVICE).to(torch.uint8).view(16, 16).view(FP8)
    y = block_dequant(codes, torch.ones(1, 1, device=DEVICE), (16, 16), out_dtype=torch.float32)
    assert_bits_equal(y, codes.float(), "e4m3 codes")
    assert y.view(-1)[0x80].item() == 0.0 and torch.signbit(y.view(-1)[0x80]).item()
    assert y.view(-1)[0x7E].item() == 448.0 and y.view(-1)[0x01].item() == 2.0**-9


def test_ue8m0_scales_and_block_placement():
    """Power-of-two (ue8m0) scales give exact products; and each scale lands on its own block only: one nonzero
    scale per run leaves every other block zero."""
    n, k, block = 300, 300, (128, 128)
    g = _gen(5)
    w_q = random_fp8(n, k, g, nan=False)
    w_s = 2.0 ** torch.randint(-20, -5, (3, 3), generator=g, device=DEVICE).float()
    y = block_dequant(w_q, w_s, block, out_dtype=torch.float32)
    assert_bits_equal(y, ref.block_dequant_ref(w_q, w_s, block, torch.float32), "ue8m0")
    for nb, kb in [(0, 0), (2, 1), (1, 2)]:
        one = torch.zeros(3, 3, device=DEVICE)
        one[nb, kb] = 1.0
        y = block_dequant(w_q, one, block, out_dtype=torch.float32)
        inside = torch.zeros(n, k, dtype=torch.bool, device=DEVICE)
        inside[nb * 128 : (nb + 1) * 128, kb * 128 : (kb + 1) * 128] = True
        assert torch.equal(y[inside], w_q.float()[inside]) and (y[~inside] == 0).all(), f"scale ({nb}, {kb})"


@pytest.mark.parametrize("w_kind", ["fp8", "int8"])
def test_half_precision_outputs(w_kind):
    """bf16 / fp16 outputs are the fp32 result rounded. GPU and fp16: round to nearest even, the same bits as the
    reference's cast. bf16 in triton 3.6's interpreter: truncated, so within one bf16 ulp (2^-7 relative)."""
    n, k, block = 100, 300, (128, 128)
    g = _gen(7)
    w_q = random_fp8(n, k, g, nan=False) if w_kind == "fp8" else random_int8(n, k, g)
    w_s = random_scales(n, k, block, g) * 100  # fp16 keeps these above its subnormal range
    exact = ref.block_dequant_ref(w_q, w_s, block, torch.float32)
    y16 = block_dequant(w_q, w_s, block, out_dtype=torch.float16)
    assert_bits_equal(y16, ref.block_dequant_ref(w_q, w_s, block, torch.float16), f"{w_kind} fp16")
    yb = block_dequant(w_q, w_s, block)  # default out_dtype: bf16
    assert yb.dtype == torch.bfloat16
    if INTERPRET:
        err = (yb.float() - exact).abs()
        assert (err <= 2.0**-7 * exact.abs()).all(), f"{w_kind} bf16: off by more than one ulp"
        assert (err > 0).any()  # bf16 really rounds these (8 bits of q times a 24-bit scale)
    else:
        assert_bits_equal(yb, ref.block_dequant_ref(w_q, w_s, block, torch.bfloat16), f"{w_kind} bf16")


def test_out_buffer_poisoned_and_row_strided():
    """Every element of a NaN-filled ``out`` is written; a row-strided ``out`` leaves the columns beside it alone."""
    n, k, block = 129, 300, (128, 128)
    g = _gen(9)
    w_q, w_s = random_fp8(n, k, g, nan=False), random_scales(n, k, block, g)
    want = ref.block_dequant_ref(w_q, w_s, block, torch.float32)
    out = torch.full((n, k), float("nan"), device=DEVICE)
    assert block_dequant(w_q, w_s, block, torch.float32, out=out) is out
    assert_bits_equal(out, want, "poisoned out")
    wide = torch.full((n, k + 20), -7.0, device=DEVICE)
    block_dequant(w_q, w_s, block, torch.float32, out=wide[:, :k])
    assert_bits_equal(wide[:, :k], want, "strided out")
    assert (wide[:, k:] == -7.0).all()


def test_empty():
    assert block_dequant(torch.zeros(0, 300, dtype=torch.int8, device=DEVICE),
                         torch.zeros(0, 3, device=DEVICE)).shape == (0, 300)


# ------------------------------------------------------------------------------------------------- refusals


def test_refusals():
    g = _gen(11)
    w_q, w_s = random_fp8(100, 300, g), random_scales(100, 300, (128, 128), g)
    with pytest.raises(TypeError, match=r"w_q must be one of .* got torch.float8_e5m2"):
        block_dequant(w_q.view(torch.uint8).view(torch.float8_e5m2), w_s)
    with pytest.raises(TypeError, match=r"w_s must be torch.float32, got torch.bfloat16"):
        block_dequant(w_q, w_s.bfloat16())
    with pytest.raises(ValueError, match=r"w_s must be per 128x128 block, shape \(cdiv\(N, 128\), cdiv\(K, 128\)\) = "
                                         r"\(1, 3\) for w_q \(100, 300\), got \(3, 1\)"):
        block_dequant(w_q, w_s.T.contiguous())
    with pytest.raises(ValueError, match=r"w_s must be per 64x128 block, .* = \(2, 3\)"):
        block_dequant(w_q, w_s, (64, 128))
    with pytest.raises(ValueError, match=r"block_size must be two positive ints \(bn, bk\), got \(128, 0\)"):
        block_dequant(w_q, w_s, (128, 0))
    with pytest.raises(ValueError, match=r"w_q must be contiguous, got shape \(100, 150\)"):
        block_dequant(w_q[:, ::2], random_scales(100, 150, (128, 128), g))
    with pytest.raises(ValueError, match=r"w_q must be 2-D, got shape \(30000,\)"):
        block_dequant(w_q.view(-1), w_s)
    with pytest.raises(TypeError, match=r"out_dtype must be one of .* got torch.int8"):
        block_dequant(w_q, w_s, out_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"out has dtype torch.bfloat16, but out_dtype is torch.float32"):
        block_dequant(w_q, w_s, out_dtype=torch.float32, out=torch.empty(100, 300, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must have shape \(N, K\) = \(100, 300\), got \(300, 100\)"):
        block_dequant(w_q, w_s, out=torch.empty(300, 100, dtype=torch.bfloat16, device=DEVICE))


# ------------------------------------------------------------------- the converter's dequantize step (--device cuda)


@pytest.mark.parametrize("kind,block", [
    ("fp8-block", (128, 128)), ("int8-block", (128, 128)), ("fp8-block", (64, 128)),
])
def test_convert_dequantize_kernel_path_bit_identical(kind, block):
    """convert._dequantize with the kernel (what --device cuda runs) gives the reference path's float32 bits, the
    weight every target scheme is then quantized from."""
    n, k = 576, 300
    g = _gen(13)
    q = random_fp8(n, k, g, nan=False) if kind == "fp8-block" else random_int8(n, k, g)
    stored = StoredLinear(kind, q, random_scales(n, k, block, g), block_size=block)
    got = convert_mod._dequantize(stored, use_kernel=True)
    assert_bits_equal(got, convert_mod._dequantize(stored, use_kernel=False), f"{kind} {block}")


def test_convert_dequantize_uses_the_kernel_for_block_kinds_only(monkeypatch):
    """use_kernel routes fp8-block / int8-block through block_dequant; channel, group and bf16 linears keep the
    reference (there is no kernel for them, and their dequantize is a single broadcast multiply)."""
    calls = []
    real = dequant.block_dequant

    def spy(*args, **kw):
        calls.append(args[0].dtype)
        return real(*args, **kw)

    monkeypatch.setattr(dequant, "block_dequant", spy)
    g = _gen(17)
    n, k = 100, 300
    block_linears = [
        StoredLinear("fp8-block", random_fp8(n, k, g, nan=False), random_scales(n, k, (128, 128), g)),
        StoredLinear("int8-block", random_int8(n, k, g), random_scales(n, k, (128, 128), g)),
    ]
    other = [
        StoredLinear("int8-channel", random_int8(n, k, g), random_scales(n, 1, (1, 1), g)),
        StoredLinear("int4-group", torch.randint(-8, 8, (n, k), device=DEVICE, dtype=torch.int8),
                     random_scales(n, k, (1, 128), g)),
        StoredLinear("bf16", torch.randn(n, k, device=DEVICE).bfloat16(), None),
    ]
    for stored in block_linears + other:
        got = convert_mod._dequantize(stored, use_kernel=True)
        assert_bits_equal(got, convert_mod._dequantize(stored, use_kernel=False), stored.kind)
    assert calls == [FP8, torch.int8]


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(7168, 2048), (2048, 7168), (576, 7168), (18432, 7168), (7168, 18432), (1536, 7168)])
@pytest.mark.parametrize("w_kind", ["fp8", "int8"])
def test_gpu_real_sizes(w_kind, n, k):
    """DeepSeek-V3 weight shapes, fresh random codes (NaNs included for fp8), NaN-poisoned outputs, fp32 and bf16,
    bit-exact against the reference computed on the same GPU."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = _gen(seed)
    w_q = random_fp8(n, k, g) if w_kind == "fp8" else random_int8(n, k, g)
    w_s = random_scales(n, k, (128, 128), g)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.full((n, k), float("nan"), dtype=out_dtype, device="cuda")
        block_dequant(w_q, w_s, out_dtype=out_dtype, out=out)
        torch.cuda.synchronize()
        assert_bits_equal(out, ref.block_dequant_ref(w_q, w_s, (128, 128), out_dtype),
                          f"{w_kind} {n}x{k} {out_dtype} seed={seed}")


def _block_checkpoint(path, kind: str, seed: int) -> None:
    """A two-layer hf-fp8 (or sglang blockwise_int8) checkpoint of ragged linears, a zero block and a norm."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (n, k) in enumerate([(576, 192), (300, 1000)]):
        for proj in ("q_a_proj", "o_proj"):
            prefix = f"model.layers.{i}.self_attn.{proj}"
            if kind == "fp8-block":
                b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
                tensors[f"{prefix}.weight"] = (b - ((b & 0x7F) == 0x7F).to(torch.uint8)).view(FP8)
            else:
                tensors[f"{prefix}.weight"] = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            shape = (cdiv(n, 128), cdiv(k, 128))
            tensors[f"{prefix}.weight_scale_inv"] = 10.0 ** (torch.rand(shape, generator=g) * 3.0 - 6.0)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(k, dtype=torch.bfloat16)
    tensors["model.layers.1.self_attn.o_proj.weight"].view(torch.uint8)[:128, :128] = 0
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    method = {"fp8-block": {"quant_method": "fp8", "fmt": "e4m3"},
              "int8-block": {"quant_method": "blockwise_int8"}}[kind]
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "torch_dtype": "bfloat16",
              "quantization_config": {**method, "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.gpu
@pytest.mark.parametrize("src_kind,scheme", [
    ("fp8-block", "bf16"),  # dequantize only
    ("fp8-block", "int4-group"),
    ("fp8-block", "fp8-block-ue8m0"),
    ("int8-block", "int8-weight"),
    ("int8-block", "bf16"),
])
def test_gpu_convert_matches_cpu_bytes(tmp_path, monkeypatch, src_kind, scheme):
    """A whole conversion with --device cuda (dequantize through block_dequant, quantize in torch on the GPU) writes
    the CPU conversion's bytes."""
    _block_checkpoint(tmp_path / "src", src_kind, seed=23)
    calls = []
    real = dequant.block_dequant
    monkeypatch.setattr(dequant, "block_dequant", lambda *a, **kw: calls.append(a[0].device) or real(*a, **kw))
    options = ConvertOptions(Scheme.from_name(scheme))
    convert(tmp_path / "src", tmp_path / "cpu", options, progress=False)
    assert calls == []
    convert(tmp_path / "src", tmp_path / "cuda", ConvertOptions(Scheme.from_name(scheme), device="cuda"),
            progress=False)
    assert len(calls) == 4 and all(d.type == "cuda" for d in calls)
    for f in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "cuda" / f.name).read_bytes(), f"{f.name} differs"
    assert (tmp_path / "cpu" / "config.json").read_bytes() == (tmp_path / "cuda" / "config.json").read_bytes()
