"""The converter on a synthetic tiny DeepSeek-V3 (MLA + MoE + shared experts + one MTP layer), FP8 as DeepSeek ships it.

The FP8 source (conftest ``deepseek_fp8_dir``) is written by ingot itself from a seeded random BF16 model, sharded so
that a ``weight_scale_inv`` sits in another shard than its ``weight``. It is then converted to every scheme and format
pair ingot writes, and each output is read back with the independent decoder of conftest (FORMATS.md only) and by
ingot (converted back to BF16).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from ingot.formats import FORMATS_OF_KIND
from ingot.quant import convert as convert_mod
from ingot.quant.convert import ConvertOptions, convert
from ingot.quant.schemes import Scheme

# The tiny model's layout (conftest DEEPSEEK_ARGS): 3 decoder layers, then the MTP layer model.layers.3.
N_LAYERS = 3
MTP_LAYER = N_LAYERS
MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight")

PAIRS = [(kind, fmt) for kind, fmts in FORMATS_OF_KIND.items() for fmt in fmts]
PAIRS += [("fp8-block-ue8m0", fmt) for fmt in FORMATS_OF_KIND["fp8-block"]]
QUANTIZED_PAIRS = [p for p in PAIRS if p[0] != "bf16"]
PAIR_IDS = [f"{k}:{f}" for k, f in PAIRS]
QUANTIZED_IDS = [f"{k}:{f}" for k, f in QUANTIZED_PAIRS]

# Per-tensor SNR floors (dB) of each scheme against the FP8 source's dequantized weight. Measured minimum over the
# 48 linears quantized by default (68 with the MTP layer's) of the tiny model (random normal weights, std 0.02, ragged blocks), then ~3 dB of margin:
#   bf16 55.0 (bf16 rounding of fp8 * scale)   fp16 73.0
#   fp8-block/hf-fp8 inf (every block re-quantizes to the same values and scale)
#   fp8-block/compressed-tensors 47.7 (its scales are bf16, rounded up, so values move)
#   fp8-block-ue8m0 30.8 (power-of-two scales)   int8-block 40.0   int8-channel / int8-weight 42.6   int4-group 19.0
SNR_FLOOR = {
    ("bf16", "bf16"): 52.0,
    ("bf16", "fp16"): 70.0,
    ("fp8-block", "hf-fp8"): 60.0,
    ("fp8-block", "compressed-tensors"): 44.0,
    ("fp8-block-ue8m0", "hf-fp8"): 27.5,
    ("fp8-block-ue8m0", "compressed-tensors"): 27.5,
    ("int8-block", "sglang"): 37.0,
    ("int8-channel", "sglang"): 39.5,
    ("int8-channel", "compressed-tensors"): 39.5,
    ("int8-weight", "compressed-tensors"): 39.5,
    ("int4-group", "compressed-tensors"): 16.0,
    ("int4-group", "gptq"): 16.0,
}
# config.json quantization_config.quant_method of each stored kind and format (None: no quantization_config).
QUANT_METHOD = {
    ("bf16", "bf16"): None,
    ("bf16", "fp16"): None,
    ("fp8-block", "hf-fp8"): "fp8",
    ("fp8-block", "compressed-tensors"): "compressed-tensors",
    ("int8-block", "sglang"): "blockwise_int8",
    ("int8-channel", "sglang"): "w8a8_int8",
    ("int8-channel", "compressed-tensors"): "compressed-tensors",
    ("int8-weight", "compressed-tensors"): "compressed-tensors",
    ("int4-group", "compressed-tensors"): "compressed-tensors",
    ("int4-group", "gptq"): "gptq",
}
# Where each format lists the linears it keeps unquantized (FORMATS.md).
IGNORE_KEYS = {
    "hf-fp8": ("modules_to_not_convert", "ignored_layers"),
    "sglang": ("ignored_layers",),
    "compressed-tensors": ("ignore",),
    "gptq": ("modules_to_not_convert",),
}
# The tensors a stored linear consists of, in any format: a kept linear has only ``weight``.
LINEAR_SUFFIXES = ("weight", "weight_scale_inv", "weight_scale", "weight_packed", "weight_shape", "qweight", "qzeros", "scales", "g_idx")


def snr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref64 = ref.double()
    noise = (ref64 - approx.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref64.pow(2).sum().item() / noise)


def is_mtp(name: str) -> bool:
    return name.startswith(f"model.layers.{MTP_LAYER}.")


def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (torch.equal treats -0.0 == 0.0)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def ignore_list(config: dict, fmt: str) -> list[list[str]]:
    qcfg = config.get("quantization_config") or {}
    return [qcfg.get(key, []) for key in IGNORE_KEYS.get(fmt, ())]


def listed(name: str, entries: list[str]) -> bool:
    """Is a module named by an ignore list (plain names, or compressed-tensors' ``re:`` regexes)."""
    return any(re.fullmatch(e[3:], name) if e.startswith("re:") else e == name for e in entries)


def check_index(d: Path, tools) -> dict:
    """weight_map covers exactly the tensors of the shards, each in its own shard; total_size is their bytes."""
    index = tools["read_index"](d)
    headers = tools["shard_headers"](d)
    itemsize = {"F8_E4M3": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}
    where = {name: shard for shard, hdr in headers.items() for name in hdr}
    assert len(where) == sum(len(h) for h in headers.values()), "a tensor is stored in two shards"
    assert index["weight_map"] == where
    assert set(index["weight_map"].values()) == set(headers), "a shard file is not in the index"
    total = sum(itemsize[dt] * math.prod(shape) for hdr in headers.values() for dt, shape in hdr.values())
    assert index["metadata"]["total_size"] == total
    return index


def test_layout_matches_the_fixture(deepseek_layout):
    assert deepseek_layout == {"n_layers": N_LAYERS, "mtp_layer": MTP_LAYER, "mtp_extra": MTP_EXTRA}


@pytest.fixture(scope="module")
def fp8(deepseek_fp8_dir, ckpt_tools, decode):
    """The FP8 source: its tensors, and each linear's dequantized weight (float32), decoded once."""
    t = ckpt_tools["Tensors"](deepseek_fp8_dir)
    prefixes = ckpt_tools["linear_prefixes"](t)
    weights = {}
    for prefix in prefixes:
        kind, w = decode(t, prefix)
        assert kind == "fp8-block", prefix  # MTP included: DeepSeek stores it in FP8 too
        weights[prefix] = w
    return t, weights


# ------------------------------------------------------------------------------------------ the fixture


def test_fp8_source_is_sharded_like_r1(deepseek_fp8_dir, ckpt_tools, fp8):
    index = check_index(deepseek_fp8_dir, ckpt_tools)
    wm = index["weight_map"]
    assert len(set(wm.values())) >= 3
    split = [n for n in wm if n.endswith(".weight_scale_inv") and wm[n] != wm[n[: -len("_scale_inv")]]]
    assert split, "no weight_scale_inv sits in another shard than its weight"
    config = json.loads((deepseek_fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }
    assert config["num_hidden_layers"] == N_LAYERS and config["num_nextn_predict_layers"] == 1
    t, weights = fp8
    # 3 decoder layers + the MTP layer; layer 0 dense (3 MLP linears), the others MoE: 4 experts + shared (15).
    mla = 5
    assert len(weights) == (mla + 3) + 3 * (mla + 15)
    assert all(f"model.layers.{MTP_LAYER}.{x}" in t for x in MTP_EXTRA)


# ------------------------------------------------------------------------------------------ every pair


@pytest.fixture(scope="module")
def converted(deepseek_fp8_dir, conversions):
    """(kind, fmt) -> (dir, manifest, dir converted back to bf16 by ingot)."""

    def get(kind: str, fmt: str, quantize_mtp: bool = False):
        dst, manifest = conversions(deepseek_fp8_dir, kind, fmt, quantize_mtp)
        back, _ = conversions(dst, "bf16")
        return dst, manifest, back

    return get


@pytest.mark.parametrize("kind,fmt", PAIRS, ids=PAIR_IDS)
def test_every_pair_reads_back_within_its_error_bound(kind, fmt, converted, fp8, ckpt_tools, decode):
    dst, manifest, back = converted(kind, fmt)
    src_t, src_w = fp8
    t, b = ckpt_tools["Tensors"](dst), ckpt_tools["Tensors"](back)
    check_index(dst, ckpt_tools)
    assert manifest["scheme"] == kind and manifest["format"] == fmt
    qcfg = t.config.get("quantization_config")
    assert (qcfg or {}).get("quant_method") == QUANT_METHOD[(Scheme.from_name(kind).kind, fmt)]
    assert (qcfg or {}).get("scale_fmt") == ("ue8m0" if (kind, fmt) == ("fp8-block-ue8m0", "hf-fp8") else None)
    assert t.config["dtype"] == ("float16" if fmt == "fp16" else "bfloat16")
    assert (manifest["source"]["format"], manifest["source"]["scheme"]) == ("hf-fp8", "fp8-block")
    rows = {r["name"]: r for r in manifest["tensors"]}
    stored_kind = Scheme.from_name(kind).kind
    measured = []
    for prefix, w_src in src_w.items():
        got_kind, w = decode(t, prefix)
        quantized = kind != "bf16" and not is_mtp(prefix)
        assert got_kind == (stored_kind if quantized else "bf16"), prefix
        snr = snr_db(w_src, w)
        if quantized:
            measured.append(snr)
            assert snr > SNR_FLOOR[(kind, fmt)], f"{prefix}: {snr:.2f} dB"
            if (kind, fmt) == ("fp8-block", "hf-fp8"):  # re-quantizing FP8 blocks to FP8 blocks is lossless
                assert math.isinf(snr), f"{prefix}: {snr:.2f} dB"
        elif kind == "bf16":
            assert snr > SNR_FLOOR[(kind, fmt)], f"{prefix}: {snr:.2f} dB"
        # The manifest's row is the same number (rounded to 3 decimals; None when exact).
        row = rows[prefix]
        if math.isinf(snr):
            assert row["snr_db"] is None, prefix
        else:
            assert row["snr_db"] == pytest.approx(snr, abs=0.01), prefix
        assert row["shape"] == list(w_src.shape)
        # ingot reads it back (to bf16) to exactly the decoded values.
        back_w = b[f"{prefix}.weight"]
        assert bits(back_w) == bits(w.to(back_w.dtype)), prefix
    if kind == "fp8-block-ue8m0":
        for prefix in src_w:
            if not is_mtp(prefix):
                s = t[prefix + (".weight_scale_inv" if fmt == "hf-fp8" else ".weight_scale")].float()
                m, _ = torch.frexp(s)
                assert bool((m == 0.5).all()), f"{prefix}: scale not a power of two"
    if measured:
        print(f"\n{kind}:{fmt} per-tensor SNR min {min(measured):.2f} dB, mean {sum(measured) / len(measured):.2f} dB")


@pytest.mark.parametrize("kind,fmt", QUANTIZED_PAIRS, ids=QUANTIZED_IDS)
def test_mtp_kept_unquantized_and_listed_by_default(kind, fmt, converted, fp8, ckpt_tools):
    dst, manifest, _ = converted(kind, fmt)
    t = ckpt_tools["Tensors"](dst)
    _, src_w = fp8
    mtp = sorted(p for p in src_w if is_mtp(p))
    assert mtp and manifest["kept_unquantized"] == mtp
    lists = ignore_list(t.config, fmt)
    assert lists
    for prefix in src_w:
        stored = {n for n in t.names() if n.startswith(prefix + ".") and n[len(prefix) + 1:] in LINEAR_SUFFIXES}
        if is_mtp(prefix):
            assert stored == {f"{prefix}.weight"}, prefix  # a plain weight, no scale
            w = t[f"{prefix}.weight"]
            assert w.dtype == torch.bfloat16
            assert bits(w) == bits(src_w[prefix].to(torch.bfloat16)), prefix
        for entries in lists:
            assert listed(prefix, entries) == is_mtp(prefix), prefix
    # The router stays out of compressed-tensors' Linear targets, whatever the loader thinks a router is.
    if fmt == "compressed-tensors":
        assert all(listed(f"model.layers.{i}.mlp.gate", lists[0]) for i in range(1, MTP_LAYER + 1))


@pytest.mark.parametrize("kind,fmt", QUANTIZED_PAIRS, ids=QUANTIZED_IDS)
def test_quantize_mtp_quantizes_the_mtp_layer(kind, fmt, converted, fp8, ckpt_tools, decode):
    dst, manifest, _ = converted(kind, fmt, quantize_mtp=True)
    t = ckpt_tools["Tensors"](dst)
    _, src_w = fp8
    assert manifest["kept_unquantized"] == []
    for entries in ignore_list(t.config, fmt):
        assert not any(listed(p, entries) for p in src_w)
    for prefix in (p for p in src_w if is_mtp(p)):
        got_kind, w = decode(t, prefix)
        assert got_kind == Scheme.from_name(kind).kind, prefix
        assert snr_db(src_w[prefix], w) > SNR_FLOOR[(kind, fmt)], prefix


@pytest.mark.parametrize("kind,fmt", PAIRS, ids=PAIR_IDS)
def test_router_embeddings_norms_mtp_extras_unchanged(kind, fmt, converted, fp8, deepseek_bf16_dir, ckpt_tools):
    dst, _, _ = converted(kind, fmt)
    t = ckpt_tools["Tensors"](dst)
    src_t, src_w = fp8
    orig = ckpt_tools["Tensors"](deepseek_bf16_dir)
    linear_tensors = {n for p in src_w for n in src_t.names() if n.startswith(p + ".")}
    others = [n for n in src_t.names() if n not in linear_tensors]
    routers = [f"model.layers.{i}.mlp.gate.{x}" for i in range(1, MTP_LAYER + 1) for x in ("weight", "e_score_correction_bias")]
    norms = [n for n in others if n.endswith("norm.weight")]
    must = routers + ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    must += [f"model.layers.{MTP_LAYER}.{x}" for x in MTP_EXTRA]
    assert set(must) <= set(others) and len(norms) == 4 * (MTP_LAYER + 1) + 1 + 3  # per layer: input, post-attention, q_a, kv_a; final; MTP enorm, hnorm, shared_head.norm
    for name in others:
        before, after = src_t[name], t[name]
        assert bits(before) == bits(orig[name]), name  # the FP8 fixture kept it too
        if name.endswith("e_score_correction_bias"):
            assert before.dtype == after.dtype == torch.float32, name
        if fmt == "fp16" and before.dtype == torch.bfloat16:  # the fp16 format casts bf16 tensors (float32 stays)
            before = before.to(torch.float16)
        assert after.dtype == before.dtype, name
        assert bits(after) == bits(before), name
    # And nothing else: every output tensor is one of those or part of a linear.
    stray = [n for n in t.names() if n not in set(others) and n.rsplit(".", 1)[0] not in src_w]
    assert not stray


@pytest.mark.parametrize("kind,fmt", PAIRS, ids=PAIR_IDS)
def test_manifest(kind, fmt, converted, deepseek_fp8_dir, fp8, ckpt_tools):
    dst, manifest, _ = converted(kind, fmt)
    on_disk = json.loads((dst / "ingot_manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    src_t, src_w = fp8
    assert manifest["source"]["path"] == str(deepseek_fp8_dir.resolve())
    assert (manifest["scheme"], manifest["format"]) == (kind, fmt)
    rows = manifest["tensors"]
    assert all(set(r) >= {"name", "shape", "dtype_in", "dtype_out", "snr_db"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert len(by_name) == len(rows)
    linear_tensors = {n for p in src_w for n in src_t.names() if n.startswith(p + ".")}
    assert set(by_name) == set(src_w) | (set(src_t.names()) - linear_tensors)
    stored_kind = Scheme.from_name(kind).kind
    out_dtype = "float16" if fmt == "fp16" else "bfloat16"
    for prefix in src_w:
        r = by_name[prefix]
        assert r["dtype_in"] == "fp8-block"
        assert r["dtype_out"] == (stored_kind if kind != "bf16" and not is_mtp(prefix) else out_dtype), prefix
        assert r["shape"] == list(src_w[prefix].shape)
    for name in set(by_name) - set(src_w):
        r = by_name[name]
        assert r["snr_db"] is None and r["shape"] == list(src_t[name].shape)
        assert r["dtype_in"] == str(src_t[name].dtype).removeprefix("torch."), name
    totals = manifest["totals"]
    src_index = ckpt_tools["read_index"](deepseek_fp8_dir)
    assert totals["params"] == sum(math.prod(r["shape"]) for r in rows)
    assert totals["params"] == sum(w.numel() for w in src_w.values()) + sum(src_t[n].numel() for n in set(by_name) - set(src_w))
    assert totals["bytes_in"] == src_index["metadata"]["total_size"]
    assert totals["bytes_out"] == ckpt_tools["read_index"](dst)["metadata"]["total_size"]
    assert totals["seconds"] > 0
    assert 10 * 2**20 < totals["peak_rss_bytes"] < 256 * 2**30  # a Python process with torch, in bytes (not KiB)
    assert totals["tensors"] == len(rows) and totals["shards"] == len(set(src_index["weight_map"].values()))
    snrs = [r["snr_db"] for r in rows if r["snr_db"] is not None]
    assert totals["snr_db_min"] == (min(snrs) if snrs else None)


# ------------------------------------------------------------------------------- FP8 -> INT8, directly


@pytest.mark.parametrize("kind,fmt", [("int8-block", "sglang"), ("int8-channel", "sglang"), ("int8-channel", "compressed-tensors")])
def test_fp8_to_int8_directly_without_a_bf16_copy(kind, fmt, deepseek_fp8_dir, fp8, tmp_path, monkeypatch, ckpt_tools):
    written: list[tuple[Path, dict[str, torch.dtype]]] = []

    class Spy(convert_mod.ShardWriter):  # shards are written tensor by tensor: record each shard and its tensors
        def __enter__(self):
            written.append((self.path, {}))
            return super().__enter__()

        def write(self, name, tensor):
            written[-1][1][name] = tensor.dtype
            super().write(name, tensor)

    monkeypatch.setattr(convert_mod, "ShardWriter", Spy)
    dst = tmp_path / "int8"
    convert(deepseek_fp8_dir, dst, ConvertOptions(Scheme.from_name(kind), format=fmt), progress=False)
    _, src_w = fp8
    index = check_index(dst, ckpt_tools)
    shards = set(index["weight_map"].values())
    # Every shard ever written is a final shard, written once, straight into DST; nothing else holds weights.
    assert sorted(p.name for p, _ in written) == sorted(shards) and all(p.parent == dst for p, _ in written)
    files = {str(p.relative_to(dst)) for p in dst.rglob("*")}
    assert files == shards | {"model.safetensors.index.json", "config.json", "ingot_manifest.json", "generation_config.json"}
    # Every quantized linear went out as int8 and nothing else was written in bf16 than what the source holds in
    # bf16 (norms, embeddings, router), the MTP linears kept unquantized, and compressed-tensors' bf16 scales.
    out = {name: dtype for _, tensors in written for name, dtype in tensors.items()}
    src_t, _ = fp8
    for prefix in src_w:
        assert out[f"{prefix}.weight"] == (torch.bfloat16 if is_mtp(prefix) else torch.int8), prefix
    bf16 = {n for n, dt in out.items() if dt == torch.bfloat16}
    expected = {n for n in src_t.names() if src_t[n].dtype == torch.bfloat16}
    expected |= {f"{p}.weight" for p in src_w if is_mtp(p)}
    if fmt == "compressed-tensors":
        expected |= {f"{p}.weight_scale" for p in src_w if not is_mtp(p)}
    assert bf16 == expected


# ------------------------------------------------------------------------- transformers reads ingot's bf16


def test_bf16_form_loads_in_transformers_with_hf_names(converted, fp8):
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3ForCausalLM

    dst, _, _ = converted("bf16", "bf16")
    model, info = DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"]
    assert list(info["mismatched_keys"]) == [] and list(info.get("error_msgs", [])) == []
    # The MTP layer is not part of HF's model; its tensors are the only unexpected ones.
    unexpected = sorted(info["unexpected_keys"])
    assert unexpected and all(k.startswith(f"model.layers.{MTP_LAYER}.") for k in unexpected)

    # The same model built by hand from the FP8 source's dequantized weights (our own decoding).
    src_t, src_w = fp8
    config = AutoConfig.from_pretrained(dst)
    # from_config(dtype=...) as from_pretrained does: bf16 parameters, float32 rotary buffers.
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert type(ref) is DeepseekV3ForCausalLM
    state = {}
    for name in src_t.names():
        if is_mtp(name) or any(name.startswith(p + ".") for p in src_w):
            continue
        state[name] = src_t[name]
    for prefix, w in src_w.items():
        if not is_mtp(prefix) and ".experts." not in prefix:
            state[f"{prefix}.weight"] = w.to(torch.bfloat16)
    n_experts = config.n_routed_experts
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        e = f"model.layers.{i}.mlp.experts"
        state[f"{e}.gate_up_proj"] = torch.stack(
            [torch.cat([src_w[f"{e}.{j}.gate_proj"], src_w[f"{e}.{j}.up_proj"]]) for j in range(n_experts)]
        ).to(torch.bfloat16)
        state[f"{e}.down_proj"] = torch.stack([src_w[f"{e}.{j}.down_proj"] for j in range(n_experts)]).to(torch.bfloat16)
    for module in ref.modules():  # HF keeps the router bias in float32 (_keep_in_fp32_modules_strict)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias = module.e_score_correction_bias.float()
    ref.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert set(loaded) == set(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert loaded[name].dtype == tensor.dtype and bits(loaded[name]) == bits(tensor), name

    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.eval()(ids).logits, ref.eval()(ids).logits
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- parallel


def test_two_workers_write_the_same_bytes(deepseek_fp8_dir, tmp_path):
    out = {}
    for workers in (1, 2):
        dst = tmp_path / f"w{workers}"
        options = ConvertOptions(Scheme.from_name("int8-block"), workers=workers, max_shard_bytes=400_000)
        out[workers] = (dst, convert(deepseek_fp8_dir, dst, options, progress=False))
    (d1, m1), (d2, m2) = out[1], out[2]
    files1 = sorted(p.name for p in d1.iterdir())
    assert files1 == sorted(p.name for p in d2.iterdir())
    assert sum(f.endswith(".safetensors") for f in files1) >= 3
    for name in files1:
        if name == "ingot_manifest.json":
            continue
        assert hashlib.sha256((d1 / name).read_bytes()).digest() == hashlib.sha256((d2 / name).read_bytes()).digest(), name
    for m in (m1, m2):  # only the timing and memory of the run may differ
        for key in ("seconds", "peak_rss_bytes"):
            m["totals"].pop(key)
    assert m1 == m2
