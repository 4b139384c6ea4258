"""quant/fast.py must give the bytes ref.py gives: the same int8 values and scales, bit for bit, and an SNR within
the summation-order noise (the manifest rounds it to 1e-3 dB)."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ingot.quant import fast, ref
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.schemes import Scheme

INT8 = ("int8-block", "int8-channel")


def random_fp8(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Every e4m3 code but the NaNs (0x7F, 0xFF), subnormals and both zeros included."""
    b = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    b.sub_(((b & 0x7F) == 0x7F).to(torch.uint8))
    return b.view(torch.float8_e4m3fn)


def random_scales(n: int, k: int, block: tuple[int, int], gen: torch.Generator, lo=1e-6, hi=1e-3) -> torch.Tensor:
    return torch.rand(ref.cdiv(n, block[0]), ref.cdiv(k, block[1]), generator=gen) * (hi - lo) + lo


def assert_same(q8, s, block, scheme, scale_dtype=torch.float32, slab_elems=None):
    got = fast.requantize(q8, s, block, scheme, scale_dtype, "w", slab_elems=slab_elems)
    assert got is not None, "fast path refused a case it should take"
    want_qw, want_snr = fast.requantize_ref(q8, s, block, scheme, scale_dtype, "w")
    qw, snr = got
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == want_qw.qweight.shape
    assert torch.equal(qw.qweight, want_qw.qweight)
    assert qw.scale.dtype == want_qw.scale.dtype and qw.scale.shape == want_qw.scale.shape
    assert torch.equal(qw.scale.view(torch.int32 if qw.scale.dtype == torch.float32 else torch.int16),
                       want_qw.scale.view(torch.int32 if qw.scale.dtype == torch.float32 else torch.int16))  # bits, -0.0 too
    if math.isinf(want_snr) or math.isnan(want_snr):  # NaN: |w| ~ 1e34 squares to inf in both
        assert snr == want_snr or (math.isnan(snr) and math.isnan(want_snr))
    else:
        assert abs(snr - want_snr) < 1e-4, (snr, want_snr)


@pytest.mark.parametrize("name", INT8)
@pytest.mark.parametrize("shape", [(576, 192), (300, 1000), (256, 256), (1, 1), (129, 7), (128, 7168), (7, 300)])
@pytest.mark.parametrize("slab_elems", [None, 1000, 2**20])
def test_grid_bit_identical(name, shape, slab_elems):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((name, shape, slab_elems)).encode()))
    n, k = shape
    q8 = random_fp8(n, k, gen)
    assert_same(q8, random_scales(n, k, (128, 128), gen), (128, 128), Scheme.from_name(name), slab_elems=slab_elems)


@pytest.mark.parametrize("name", INT8)
def test_zeros(name):
    gen = torch.Generator().manual_seed(1)
    scheme = Scheme.from_name(name)
    q8 = torch.zeros(300, 1000, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert_same(q8, random_scales(300, 1000, (128, 128), gen), (128, 128), scheme)  # scale 0, q 0, SNR inf
    q8 = random_fp8(300, 1000, gen)
    q8.view(torch.uint8)[:130, :260] = 0  # all-zero blocks (and zero rows) beside full ones
    q8.view(torch.uint8)[200:, 500:] = 0x80  # -0.0
    s = random_scales(300, 1000, (128, 128), gen)
    s[2, 3] = 0.0  # a source block with scale 0
    assert_same(q8, s, (128, 128), scheme)


@pytest.mark.parametrize("name", INT8)
def test_large_and_tiny_magnitudes(name):
    gen = torch.Generator().manual_seed(2)
    scheme = Scheme.from_name(name)
    q8 = random_fp8(576, 7168, gen)
    assert_same(q8, random_scales(576, 7168, (128, 128), gen, lo=1.0, hi=255.0), (128, 128), scheme)  # |w| to 1.1e5
    assert_same(q8, random_scales(576, 7168, (128, 128), gen, lo=1e30, hi=1e32), (128, 128), scheme)  # |w| near 4e34
    assert_same(q8, random_scales(576, 7168, (128, 128), gen, lo=1e-30, hi=1e-28), (128, 128), scheme)  # subnormal w
    s = random_scales(576, 7168, (128, 128), gen)
    s[0, 0] = -s[0, 0]  # odd but finite: the amax rule is sign-symmetric
    assert_same(q8, s, (128, 128), scheme)


def test_other_blocks_and_scale_dtypes():
    gen = torch.Generator().manual_seed(3)
    q8 = random_fp8(300, 1000, gen)
    assert_same(q8, random_scales(300, 1000, (64, 32), gen), (64, 32), Scheme.from_name("int8-channel"))
    block = replace(Scheme.from_name("int8-block"), block_size=(64, 32))
    assert_same(q8, random_scales(300, 1000, (64, 32), gen), (64, 32), block)
    # compressed-tensors stores int8-channel scales in bf16, rounded up before quantizing
    assert_same(q8, random_scales(300, 1000, (128, 128), gen), (128, 128), Scheme.from_name("int8-channel"), torch.bfloat16)


def test_refuses_what_it_cannot_do_exactly():
    gen = torch.Generator().manual_seed(4)
    q8 = random_fp8(256, 256, gen)
    s = random_scales(256, 256, (128, 128), gen)
    int8_block = Scheme.from_name("int8-block")
    assert fast.requantize(q8, s + 2.0**120, (128, 128), int8_block) is None  # scale * 2^8 would overflow
    bad = s.clone()
    bad[1, 1] = math.inf
    assert fast.requantize(q8, bad, (128, 128), int8_block) is None
    assert fast.requantize(q8, s, (64, 64), int8_block) is None  # block differs from the target's: a scale shape mismatch
    assert not fast.supports("fp8-block", (64, 64), int8_block)
    assert not fast.supports("bf16", (128, 128), int8_block)
    assert not fast.supports("fp8-block", (128, 128), Scheme.from_name("int4-group"))
    assert fast.supports("fp8-block", (64, 64), Scheme.from_name("int8-channel"))


def test_nan_codes_raise_like_the_reference():
    gen = torch.Generator().manual_seed(5)
    q8 = random_fp8(256, 256, gen)
    q8.view(torch.uint8)[130, 7] = 0xFF
    s = random_scales(256, 256, (128, 128), gen)
    for name in INT8:
        with pytest.raises(ref.NonFiniteError, match="w: contains NaN"):
            fast.requantize(q8, s, (128, 128), Scheme.from_name(name), name="w")
        with pytest.raises(ref.NonFiniteError, match="w: contains NaN"):
            fast.requantize_ref(q8, s, (128, 128), Scheme.from_name(name), name="w")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 300),
    bn=st.sampled_from([16, 32, 128]),
    bk=st.sampled_from([16, 64, 128]),
    name=st.sampled_from(INT8),
    slab=st.sampled_from([None, 64, 5000]),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_bit_identical(n, k, bn, bk, name, slab, seed):
    gen = torch.Generator().manual_seed(seed)
    scheme = Scheme.from_name(name)
    if scheme.granularity == "block":
        scheme = replace(scheme, block_size=(bn, bk))
    assert_same(random_fp8(n, k, gen), random_scales(n, k, (bn, bk), gen), (bn, bk), scheme, slab_elems=slab)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", INT8)
def test_cuda_matches_cpu_reference(name):
    """On a GPU (big slabs) the bytes are the CPU reference's too."""
    gen = torch.Generator().manual_seed(7)
    scheme = Scheme.from_name(name)
    for n, k in [(2048, 7168), (576, 7168), (300, 1000), (7168, 2048)]:
        q8, s = random_fp8(n, k, gen), random_scales(n, k, (128, 128), gen)
        qw, snr = fast.requantize(q8.cuda(), s.cuda(), (128, 128), scheme, name="w")
        want_qw, want_snr = fast.requantize_ref(q8, s, (128, 128), scheme, name="w")
        assert torch.equal(qw.qweight.cpu(), want_qw.qweight) and torch.equal(qw.scale.cpu(), want_qw.scale)
        assert abs(snr - want_snr) < 1e-4


def _fp8_checkpoint(path, gen) -> None:
    """A two-layer hf-fp8 checkpoint with ragged linears, a zero block and a norm."""
    tensors = {}
    for i, (n, k) in enumerate([(576, 192), (300, 1000)]):
        for proj in ("q_a_proj", "o_proj"):
            prefix = f"model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.weight"] = random_fp8(n, k, gen)
            tensors[f"{prefix}.weight_scale_inv"] = random_scales(n, k, (128, 128), gen)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(k, dtype=torch.bfloat16)
    tensors["model.layers.1.self_attn.o_proj.weight"].view(torch.uint8)[:128, :128] = 0
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", INT8)
def test_convert_writes_the_reference_bytes(tmp_path, monkeypatch, name):
    """The converter's output shards are byte-identical with and without the fast path."""
    _fp8_checkpoint(tmp_path / "src", torch.Generator().manual_seed(6))
    options = ConvertOptions(Scheme.from_name(name))
    fast_manifest = convert(tmp_path / "src", tmp_path / "fast", options, progress=False)
    monkeypatch.setattr(fast, "supports", lambda *args: False)
    ref_manifest = convert(tmp_path / "src", tmp_path / "ref", options, progress=False)
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert (tmp_path / "fast" / "config.json").read_bytes() == (tmp_path / "ref" / "config.json").read_bytes()
    fast_rows = {r["name"]: r for r in fast_manifest["tensors"]}
    for row in ref_manifest["tensors"]:
        if row["snr_db"] is not None:
            assert abs(fast_rows[row["name"]]["snr_db"] - row["snr_db"]) <= 1e-3
    out = load_file(str(tmp_path / "fast" / "model.safetensors"))
    assert out["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.int8
