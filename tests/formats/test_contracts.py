"""Every format ingot writes, checked byte-level against FORMATS.md.

A tiny random Llama (hidden 192, intermediate 320: neither a multiple of 128, so every scale grid is ragged) is
saved by transformers in bf16 and converted to every (scheme, format) pair ingot offers. The written directories are
read with ``safetensors.safe_open`` and plain JSON; packed layouts are decoded independently here (GPTQ with a
straightforward shift loop, compressed-tensors with its own package), compared with the reference quantizers, and
read back by ingot.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ingot import formats
from ingot.formats import FORMATS_OF_KIND
from ingot.formats.safetensors_io import Checkpoint
from ingot.quant import ref
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.ref import QuantizedWeight
from ingot.quant.schemes import PRESETS, Scheme

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS = 192, 320, 2
PAIRS = [(kind, fmt) for kind, fmts in FORMATS_OF_KIND.items() for fmt in fmts] + [("fp8-block-ue8m0", "hf-fp8")]
QUANT_PAIRS = [p for p in PAIRS if p[0] != "bf16"]
IGNORE = (r"layers\.0\.mlp\.down_proj$", r"layers\.1\.self_attn\.o_proj$")
IGNORED = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
# The Llama linears FORMATS.md quantizes, written out here rather than taken from ingot.
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
SCALE_DTYPE = {"hf-fp8": torch.float32, "sglang": torch.float32, "compressed-tensors": torch.bfloat16, "gptq": torch.float16}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pid(pair) -> str:
    return f"{pair[0]}-as-{pair[1]}"


# ----------------------------------------------------------------------------------------- fixtures


def _save_llama(path: Path, hidden: int, inter: int, seed: int, heads: int = 6, head_dim: int = 32) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=LAYERS, num_attention_heads=heads,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, max_position_embeddings=64,
        head_dim=head_dim,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        # All-zero tiles must survive every format: a 128x128 block, a whole output row, a ragged last group.
        model.model.layers[0].self_attn.q_proj.weight[:128, :128] = 0
        model.model.layers[1].self_attn.k_proj.weight[5] = 0
        model.model.layers[0].mlp.gate_proj.weight[:, 128:] = 0
        # Norms get non-trivial values so "unchanged bit for bit" means something.
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    _save_llama(path, HIDDEN, INTER, seed=0)
    return path


@pytest.fixture(scope="module")
def src_tensors(source) -> dict[str, torch.Tensor]:
    return load_dir(source)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """converted(scheme, format, ignore=(), shard_bytes=None) -> output directory (each made once per module)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("out")

    def get(scheme: str, fmt: str, ignore: tuple[str, ...] = (), shard_bytes: int | None = None) -> Path:
        key = (scheme, fmt, ignore, shard_bytes)
        if key not in cache:
            dst = root / f"{scheme}.{fmt}.{len(ignore)}.{shard_bytes}"
            opts = ConvertOptions(Scheme.from_name(scheme), format=fmt, ignore=ignore, max_shard_bytes=shard_bytes)
            convert(source, dst, opts, progress=False)
            cache[key] = dst
        return cache[key]

    return get


@pytest.fixture(scope="module")
def read_back(tmp_path_factory):
    """read_back(dir) -> the directory converted back to plain bf16 by ingot."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("back")

    def get(path: Path) -> Path:
        if path not in cache:
            dst = root / path.name
            convert(path, dst, ConvertOptions(PRESETS["bf16"], format="bf16"), progress=False)
            cache[path] = dst
        return cache[path]

    return get


# ----------------------------------------------------------------------------------------- reading


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, through the index when there is one (safe_open only)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(path / shard), framework="pt") as f:
            for name in f.keys():
                assert weight_map.get(name) == shard, f"{shard}: stray tensor {name} not in the index"
                out[name] = f.get_tensor(name)
    assert set(out) == set(weight_map), "index lists tensors missing from the shards"
    return out


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (dtype, shape and bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def stored_kind(scheme: str) -> str:
    return Scheme.from_name(scheme).kind


def linear_layout(kind: str, fmt: str, prefix: str, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """FORMATS.md, tensor by tensor: name -> (dtype, shape) of one quantized [N, K] linear."""
    block = (cdiv(n, 128), cdiv(k, 128))
    p = prefix
    if fmt == "hf-fp8":
        return {f"{p}.weight": (torch.float8_e4m3fn, (n, k)), f"{p}.weight_scale_inv": (torch.float32, block)}
    if fmt == "sglang" and kind == "int8-block":
        return {f"{p}.weight": (torch.int8, (n, k)), f"{p}.weight_scale_inv": (torch.float32, block)}
    if fmt == "sglang" and kind == "int8-channel":
        return {f"{p}.weight": (torch.int8, (n, k)), f"{p}.weight_scale": (torch.float32, (n, 1))}
    if fmt == "compressed-tensors":
        bf16 = torch.bfloat16
        if kind == "fp8-block":
            return {f"{p}.weight": (torch.float8_e4m3fn, (n, k)), f"{p}.weight_scale": (bf16, block)}
        if kind == "int8-channel":
            return {f"{p}.weight": (torch.int8, (n, k)), f"{p}.weight_scale": (bf16, (n, 1))}
        bits = 8 if kind == "int8-weight" else 4
        return {
            f"{p}.weight_packed": (torch.int32, (n, cdiv(k * bits, 32))),
            f"{p}.weight_shape": (torch.int32, (2,)),
            f"{p}.weight_scale": (bf16, (n, 1) if kind == "int8-weight" else (n, cdiv(k, 128))),
        }
    if fmt == "gptq":
        return {
            f"{p}.qweight": (torch.int32, (k * 4 // 32, n)),
            f"{p}.qzeros": (torch.int32, (cdiv(k, 128), n * 4 // 32)),
            f"{p}.scales": (torch.float16, (cdiv(k, 128), n)),
            f"{p}.g_idx": (torch.int32, (k,)),
        }
    raise AssertionError(f"no layout for {kind} as {fmt}")


def gptq_decode(qweight, qzeros, scales, g_idx):
    """GPTQ v1, decoded the plain way: 8 nibbles per int32, low bits first; qweight packed along K, qzeros along N.

    Returns (q unsigned [K, N], zero [G, N] with v1's +1 applied, w = (q - zero[g_idx]) * scales[g_idx] [K, N]).
    """
    kq, n = qweight.shape
    qw = qweight.to(torch.int64) & 0xFFFFFFFF
    q = torch.empty(kq * 8, n, dtype=torch.int64)
    for j in range(8):
        q[j::8] = (qw >> (4 * j)) & 0xF  # input row 8 * r + j
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    zero = torch.empty(qzeros.shape[0], qzeros.shape[1] * 8, dtype=torch.int64)
    for j in range(8):
        zero[:, j::8] = ((qz >> (4 * j)) & 0xF) + 1  # v1 stores zero - 1
    g = g_idx.long()
    w = (q - zero[g]).float() * scales.float()[g]
    return q, zero, w


def ct_helpers():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:  # older compressed-tensors
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32, unpack_from_int32
    return pack_to_int32, unpack_from_int32


def written_linear(kind: str, fmt: str, t: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] int8 / e4m3, scale grid in the scheme's layout), decoded here from the raw tensors."""
    p = prefix
    if fmt in ("hf-fp8", "sglang") and kind != "int8-channel":
        return t[f"{p}.weight"], t[f"{p}.weight_scale_inv"]
    if fmt in ("sglang", "compressed-tensors") and kind in ("int8-channel", "fp8-block"):
        return t[f"{p}.weight"], t[f"{p}.weight_scale"]
    if fmt == "compressed-tensors":
        _, unpack = ct_helpers()
        bits = 8 if kind == "int8-weight" else 4
        shape = torch.Size(t[f"{p}.weight_shape"].tolist())
        return unpack(t[f"{p}.weight_packed"], bits, shape), t[f"{p}.weight_scale"]
    q_u, zero, _ = gptq_decode(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"])
    assert (zero == 8).all(), f"{p}: symmetric GPTQ has zero point 8"
    return (q_u - 8).to(torch.int8).T.contiguous(), t[f"{p}.scales"].T.contiguous()


def reference(scheme: str, fmt: str, w: torch.Tensor) -> QuantizedWeight:
    return ref.quantize_weight(w.float(), PRESETS[scheme], scale_dtype=SCALE_DTYPE[fmt])


def linear_prefixes(src: dict) -> list[str]:
    return sorted(n.removesuffix(".weight") for n in src if LINEAR.match(n.removesuffix(".weight")))


# ----------------------------------------------------------------------------------------- tensors on disk


@pytest.mark.parametrize("ignore", [(), IGNORE], ids=["all", "ignore"])
@pytest.mark.parametrize("pair", PAIRS, ids=pid)
def test_tensors_exactly_as_specified(pair, ignore, converted, src_tensors):
    scheme, fmt = pair
    if ignore and scheme == "bf16":
        pytest.skip("nothing to ignore when nothing is quantized")
    out = converted(scheme, fmt, ignore)
    t = load_dir(out)
    kind = stored_kind(scheme)
    ignored = IGNORED if ignore else []
    expected: dict[str, tuple] = {}
    for name, x in src_tensors.items():
        prefix = name.removesuffix(".weight")
        if kind != "bf16" and LINEAR.match(prefix) and prefix not in ignored:
            expected.update(linear_layout(kind, fmt, prefix, *x.shape))
        else:
            expected[name] = (torch.float16 if fmt == "fp16" else x.dtype, tuple(x.shape))
    assert sorted(t) == sorted(expected), "tensor names differ from FORMATS.md (stray or missing tensors)"
    for name, (dtype, shape) in expected.items():
        assert (t[name].dtype, tuple(t[name].shape)) == (dtype, shape), name
    # every tensor that is not a quantized linear: present and unchanged bit for bit (fp16: the exact cast)
    for name, x in src_tensors.items():
        prefix = name.removesuffix(".weight")
        if kind == "bf16" or not LINEAR.match(prefix) or prefix in ignored:
            want = x.to(torch.float16) if fmt == "fp16" else x
            assert bits_equal(t[name], want), f"{name} changed"
    # nothing half-written or left over
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".ingot"]
    assert leftovers == []


@pytest.mark.parametrize("pair", QUANT_PAIRS, ids=pid)
def test_quantized_values_are_the_reference(pair, converted, src_tensors):
    """Written values and scales (decoded independently) equal ref.quantize_weight of the source, bit for bit."""
    scheme, fmt = pair
    t = load_dir(converted(scheme, fmt))
    kind = stored_kind(scheme)
    for prefix in linear_prefixes(src_tensors):
        q, s = written_linear(kind, fmt, t, prefix)
        want = reference(scheme, fmt, src_tensors[f"{prefix}.weight"])
        assert bits_equal(q, want.qweight), f"{prefix}: quantized values"
        assert bits_equal(s, want.scale), f"{prefix}: scales ({s.dtype} vs {want.scale.dtype})"
        if kind != "fp8-block":
            lo, hi = (-127, 127) if PRESETS[scheme].weight == "int8" else (-8, 7)
            assert int(q.min()) >= lo and int(q.max()) <= hi
        if scheme == "fp8-block-ue8m0":
            pos = s > 0
            assert (torch.frexp(s[pos])[0] == 0.5).all(), "ue8m0 scales are powers of two"
    # the all-zero tiles planted in the source give zero scales (not NaN) and zero values
    granularity = PRESETS[scheme].granularity
    q, s = written_linear(kind, fmt, t, "model.layers.0.self_attn.q_proj")  # [:128, :128] == 0
    if granularity == "block":
        assert s.float()[0, 0] == 0
    elif granularity == "group":
        assert (s.float()[:128, 0] == 0).all()
    assert (q[:128, :128].float() == 0).all()
    q, s = written_linear(kind, fmt, t, "model.layers.0.mlp.gate_proj")  # [:, 128:] == 0 (a ragged 64-wide tail)
    if granularity in ("block", "group"):
        assert (s.float()[:, 1] == 0).all()
    assert (q[:, 128:].float() == 0).all()
    q, s = written_linear(kind, fmt, t, "model.layers.1.self_attn.k_proj")  # row 5 == 0
    if granularity in ("channel", "group"):
        assert (s.float()[5] == 0).all()
    assert (q[5].float() == 0).all()


@pytest.mark.parametrize("pair", QUANT_PAIRS, ids=pid)
def test_scale_dtypes(pair, converted):
    """compressed-tensors scales in the model dtype (bf16), GPTQ fp16, hf-fp8 / sglang float32."""
    scheme, fmt = pair
    t = load_dir(converted(scheme, fmt))
    names = {"hf-fp8": "weight_scale_inv", "compressed-tensors": "weight_scale", "gptq": "scales"}
    key = names.get(fmt) or ("weight_scale_inv" if stored_kind(scheme) == "int8-block" else "weight_scale")
    scales = [x for n, x in t.items() if n.endswith("." + key)]
    assert len(scales) == 2 * 7
    assert {x.dtype for x in scales} == {SCALE_DTYPE[fmt]}


# ----------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("kind,bits", [("int4-group", 4), ("int8-weight", 8)])
def test_compressed_tensors_packing_matches_the_package(kind, bits, converted, src_tensors):
    pack_to_int32, unpack_from_int32 = ct_helpers()
    t = load_dir(converted(kind, "compressed-tensors"))
    for prefix in linear_prefixes(src_tensors):
        n, k = src_tensors[f"{prefix}.weight"].shape
        assert t[f"{prefix}.weight_shape"].tolist() == [n, k]
        q = reference(kind, "compressed-tensors", src_tensors[f"{prefix}.weight"]).qweight
        packed = t[f"{prefix}.weight_packed"]
        assert torch.equal(packed, pack_to_int32(q, bits)), prefix
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size([n, k])), q), prefix


def test_compressed_tensors_packing_bit_layout():
    """FORMATS.md in words: value + 2^(bits-1), element i at bit offset bits * i, low bits first."""
    pack_to_int32, _ = ct_helpers()
    from ingot.formats.base import pack_int32, unpack_int32

    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4, -1]], dtype=torch.int8)
    words = pack_int32(q, 4)
    u = [v + 8 for v in q[0].tolist()]
    w0 = sum(x << (4 * i) for i, x in enumerate(u[:8]))
    assert words.shape == (1, 2)
    assert words[0, 0].item() & 0xFFFFFFFF == w0 and words[0, 1].item() == u[8]
    assert torch.equal(words, pack_to_int32(q, 4))
    assert torch.equal(unpack_int32(words, 4, 9), q)
    q8 = torch.tensor([[-127, 127, 0, -1, 5]], dtype=torch.int8)
    assert torch.equal(pack_int32(q8, 8), pack_to_int32(q8, 8))
    assert pack_int32(q8, 8)[0, 0].item() & 0xFFFFFFFF == 1 | (255 << 8) | (128 << 16) | (127 << 24)


def test_gptq_decodes_to_ingot_dequantization(converted, src_tensors, read_back):
    out = converted("int4-group", "gptq")
    t = load_dir(out)
    back = load_dir(read_back(out))
    for prefix in linear_prefixes(src_tensors):
        n, k = src_tensors[f"{prefix}.weight"].shape
        assert torch.equal(t[f"{prefix}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
        q_u, zero, w = gptq_decode(t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"], t[f"{prefix}.scales"], t[f"{prefix}.g_idx"])
        assert int(q_u.min()) >= 0 and int(q_u.max()) <= 15
        assert (zero == 8).all()
        want = ref.dequantize_weight(reference("int4-group", "gptq", src_tensors[f"{prefix}.weight"]))
        assert torch.equal(w.T, want), prefix
        assert bits_equal(back[f"{prefix}.weight"], w.T.to(torch.bfloat16)), prefix


# ----------------------------------------------------------------------------------------- config.json


def expected_qcfg(scheme: str, fmt: str, ignored: list[str]) -> dict | None:
    """quantization_config exactly, for the formats whose entry FORMATS.md fixes completely."""
    kind = stored_kind(scheme)
    if fmt == "hf-fp8":
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if scheme.endswith("ue8m0"):
            cfg["scale_fmt"] = "ue8m0"
        if ignored:
            cfg.update(modules_to_not_convert=ignored, ignored_layers=ignored)
        return cfg
    if fmt == "sglang":
        if kind == "int8-block":
            cfg = {"quant_method": "blockwise_int8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        else:
            cfg = {"quant_method": "w8a8_int8"}
        if ignored:
            cfg["ignored_layers"] = ignored
        return cfg
    if fmt == "gptq":
        cfg = {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
            "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq",
        }
        if ignored:
            cfg["modules_to_not_convert"] = ignored
        return cfg
    raise AssertionError(fmt)


ARG_KEYS = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size", "block_structure")
CT_EXPECTED = {
    # kind: (format, weights, input_activations)
    "fp8-block": (
        "float-quantized",
        dict(num_bits=8, type="float", strategy="block", symmetric=True, dynamic=False, group_size=None, block_structure=[128, 128]),
        dict(num_bits=8, type="float", strategy="group", symmetric=True, dynamic=True, group_size=128, block_structure=None),
    ),
    "int8-channel": (
        "int-quantized",
        dict(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False, group_size=None, block_structure=None),
        dict(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True, group_size=None, block_structure=None),
    ),
    "int8-weight": (
        "pack-quantized",
        dict(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False, group_size=None, block_structure=None),
        None,
    ),
    "int4-group": (
        "pack-quantized",
        dict(num_bits=4, type="int", strategy="group", symmetric=True, dynamic=False, group_size=128, block_structure=None),
        None,
    ),
}


@pytest.mark.parametrize("ignore", [(), IGNORE], ids=["all", "ignore"])
@pytest.mark.parametrize("pair", PAIRS, ids=pid)
def test_config_json(pair, ignore, converted, source, src_tensors):
    scheme, fmt = pair
    if ignore and scheme == "bf16":
        pytest.skip("nothing to ignore when nothing is quantized")
    out = converted(scheme, fmt, ignore)
    cfg, src_cfg = config_of(out), config_of(source)
    ignored = IGNORED if ignore else []
    # everything else in config.json is the source's
    rest = {k: v for k, v in cfg.items() if k not in ("quantization_config", "dtype", "torch_dtype")}
    assert rest == {k: v for k, v in src_cfg.items() if k not in ("dtype", "torch_dtype")}
    if fmt in ("bf16", "fp16"):
        assert "quantization_config" not in cfg
        assert cfg["dtype"] == ("float16" if fmt == "fp16" else "bfloat16")
        return
    assert cfg["dtype"] == "bfloat16"
    qcfg = cfg["quantization_config"]
    if fmt != "compressed-tensors":
        assert qcfg == expected_qcfg(scheme, fmt, ignored)
        return
    kind = stored_kind(scheme)
    ct_format, weights, acts = CT_EXPECTED[kind]
    assert set(qcfg) == {"quant_method", "format", "quantization_status", "ignore", "config_groups", "kv_cache_scheme"}
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == ct_format
    assert qcfg["quantization_status"] == "compressed"
    assert qcfg["kv_cache_scheme"] is None
    assert list(qcfg["config_groups"]) == ["group_0"]
    group = qcfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"].get(k) for k in ARG_KEYS} == weights
    if acts is None:
        assert group.get("input_activations") is None
    else:
        assert {k: group["input_activations"].get(k) for k in ARG_KEYS} == acts
    assert "lm_head" in qcfg["ignore"]
    for name in ignored:
        assert name in qcfg["ignore"]
    # no ignore entry may catch a linear that was quantized (a loader would then misread its tensors)
    quantized = [p for p in linear_prefixes(src_tensors) if p not in ignored]
    for entry in qcfg["ignore"]:
        pattern = re.compile(entry[3:]) if entry.startswith("re:") else None
        for prefix in quantized:
            assert not (pattern.match(prefix) if pattern else entry == prefix), f"ignore entry {entry!r} hits {prefix}"
    # and compressed-tensors itself parses it
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qcfg)
    assert parsed.format == ct_format


# ----------------------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("ignore", [(), IGNORE], ids=["all", "ignore"])
@pytest.mark.parametrize("pair", PAIRS, ids=pid)
def test_read_back(pair, ignore, converted, read_back, src_tensors):
    """ingot detects and decodes what it wrote; back in bf16 it is exactly ref.dequantize_weight of the written data,
    and within the scheme's error bound of the source."""
    scheme, fmt = pair
    if ignore and scheme == "bf16":
        pytest.skip("nothing to ignore when nothing is quantized")
    out = converted(scheme, fmt, ignore)
    cfg = config_of(out)
    kind = stored_kind(scheme)
    ignored = IGNORED if ignore else []
    fmt_obj, detected_kind = formats.detect(cfg)
    assert (fmt_obj.name, detected_kind) == (fmt, kind)
    t = load_dir(out)
    ckpt = Checkpoint(out)
    back = load_dir(read_back(out))
    assert sorted(back) == sorted(src_tensors)
    back_cfg = config_of(read_back(out))
    assert "quantization_config" not in back_cfg and back_cfg["dtype"] == "bfloat16"
    assert formats.detect(back_cfg)[0].name == "bf16"
    for name, x in src_tensors.items():
        prefix = name.removesuffix(".weight")
        got = back[name]
        if kind == "bf16" or not LINEAR.match(prefix) or prefix in ignored:
            want = x.to(torch.float16).to(torch.bfloat16) if fmt == "fp16" else x
            assert bits_equal(got, want), f"{name} changed on the round trip"
            continue
        q, s = written_linear(kind, fmt, t, prefix)
        stored = fmt_obj.decode(prefix, ckpt, detected_kind, cfg)  # ingot's decoder agrees with the one here
        assert bits_equal(stored.qweight, q) and torch.equal(stored.scale.float(), s.float()), prefix
        deq = ref.dequantize_weight(QuantizedWeight(PRESETS[kind], q, s))
        assert bits_equal(got, deq.to(torch.bfloat16)), f"{prefix}: read back differs from dequantize(written)"
        # error bound against the source (plus the final bf16 rounding of the read-back, half an ulp = 2^-8)
        n, k = x.shape
        sch = PRESETS[kind]
        bn, bk = (128, 128) if sch.granularity == "block" else ((1, k) if sch.granularity == "channel" else (1, 128))
        s_el = s.float()[(torch.arange(n) // bn)[:, None], (torch.arange(k) // bk)[None, :]]
        w = x.float()
        err = (w - got.float()).abs()
        if kind == "fp8-block":
            bound = 2.0**-4 * w.abs() + s_el * 2.0**-9
        else:
            bound = s_el / 2 * (1 + 2.0**-16)
        bound = bound + 2.0**-8 * deq.abs() + 2.0**-20 * w.abs()
        assert (err <= bound).all(), f"{prefix}: max excess {(err - bound).max().item()}"
    ckpt.close()


# ----------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("pair", PAIRS, ids=pid)
def test_sharded_output_same_tensors(pair, converted, read_back):
    """With small shards a weight's scale may land in another shard: the index resolves it, bytes are the same."""
    scheme, fmt = pair
    single = converted(scheme, fmt)
    sharded = converted(scheme, fmt, shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    a, b = load_dir(single), load_dir(sharded)
    assert sorted(a) == sorted(b)
    assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in b.values())
    for name in a:
        assert bits_equal(a[name], b[name]), name
    assert config_of(single) == config_of(sharded)
    back_a, back_b = load_dir(read_back(single)), load_dir(read_back(sharded))
    for name in back_a:
        assert bits_equal(back_a[name], back_b[name]), name


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "scheme,fmt",
    [("int8-block", "gptq"), ("fp8-block", "sglang"), ("int4-group", "hf-fp8"), ("int8-weight", "sglang"),
     ("int8-channel", "gptq"), ("bf16", "compressed-tensors"), ("int4-group", "bf16")],
)
def test_impossible_pair_is_refused(scheme, fmt, source, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        convert(source, dst, ConvertOptions(Scheme.from_name(scheme), format=fmt), progress=False)
    msg = str(info.value)
    assert scheme in msg and fmt in msg
    assert not dst.exists() or not any(dst.iterdir()), "a refused conversion must not leave files behind"


def test_fp16_overflow_is_refused(source, tmp_path):
    """bf16 reaches 3e38, fp16 only 65504: a tensor that does not fit is an error naming it, never a silent inf."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "big"
    shutil.copytree(source, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"][3] = 1e6
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        convert(src, dst, ConvertOptions(PRESETS["bf16"], format="fp16"), progress=False)
    assert not (dst / "config.json").exists()


# ----------------------------------------------------------------------------------------- compressed-tensors loads


def _ct_load_and_compare(out: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
    state = model.state_dict()
    t = load_dir(out)
    n_linear = 0
    for prefix in sorted({n.rsplit(".", 1)[0] for n in t if n.endswith(".weight_scale")}):
        q, s = written_linear(kind, "compressed-tensors", t, prefix)
        want = ref.dequantize_weight(QuantizedWeight(PRESETS[kind], q, s)).to(torch.bfloat16)
        got = state[f"{prefix}.weight"]
        assert bits_equal(got, want), f"{prefix}: compressed-tensors decompresses to {got.flatten()[:4]}, ingot {want.flatten()[:4]}"
        n_linear += 1
    assert n_linear == 2 * 7


@pytest.mark.parametrize("kind", ["fp8-block", "int8-channel", "int8-weight"])
def test_transformers_compressed_tensors_loads(kind, converted):
    """FORMATS.md's check: transformers + compressed-tensors loads the directory and decompresses to ingot's weights."""
    pytest.importorskip("compressed_tensors")
    _ct_load_and_compare(converted(kind, "compressed-tensors"), kind)


def test_transformers_compressed_tensors_loads_w4a16(tmp_path):
    """W4A16 on a model whose K are multiples of 128 (compressed-tensors' group dequantizer requires that)."""
    pytest.importorskip("compressed_tensors")
    src = tmp_path / "aligned"
    _save_llama(src, 256, 384, seed=1, heads=4, head_dim=64)  # q, o [256, 256], k/v [128, 256], down [256, 384]
    out = tmp_path / "w4a16"
    convert(src, out, ConvertOptions(PRESETS["int4-group"], format="compressed-tensors"), progress=False)
    _ct_load_and_compare(out, "int4-group")
