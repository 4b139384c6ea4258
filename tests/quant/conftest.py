"""Fixtures for the converter tests: a synthetic tiny DeepSeek-V3 checkpoint (BF16, then FP8 as DeepSeek ships it),
a cache of conversions, and an independent decoder of every on-disk format (FORMATS.md).

The decoder here is written from FORMATS.md alone and shares no code with ``ingot.formats``: the tests compare
what ingot wrote against it, so a layout bug in a format module cannot hide behind the same bug in its reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ingot.quant.convert import ConvertOptions, convert, plan
from ingot.quant.schemes import Scheme

# ------------------------------------------------------------------------------------ the tiny DeepSeek-V3

# Dimensions chosen so that most linears are ragged against the 128x128 blocks and 128-groups (320, 192, 160, 448
# are not multiples of 128), while every dimension stays a multiple of 8 (GPTQ packs 8 int4 values per int32).
DEEPSEEK_ARGS = dict(
    vocab_size=512,
    hidden_size=320,
    intermediate_size=448,  # the dense MLP of layer 0
    moe_intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=192,
    kv_lora_rank=160,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,  # layer 0 dense, layers 1.. MoE
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
N_LAYERS = 3  # decoder layers; the MTP layer is model.layers.3
MTP_LAYER = N_LAYERS
# The MTP layer's tensors beyond a decoder layer's, as in DeepSeek-V3's checkpoint (model.layers.61.* there).
MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight")


def _build_deepseek_bf16(out: Path, scratch: Path) -> Path:
    """Random (seeded) DeepSeek-V3 with HF tensor names, BF16, router bias float32, plus one MTP layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    # Build N_LAYERS + 1 decoder layers so that the MTP layer's decoder part has exactly HF's names and shapes,
    # then declare only N_LAYERS of them as hidden layers and the last as the MTP layer.
    cfg = DeepseekV3Config(num_hidden_layers=N_LAYERS + 1, num_nextn_predict_layers=1, **DEEPSEEK_ARGS)
    model = DeepseekV3ForCausalLM(cfg)
    # save_pretrained writes the checkpoint names (per-expert mlp.experts.{e}.*_proj), not the fused in-memory ones.
    model.save_pretrained(scratch)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(scratch / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    g = torch.Generator().manual_seed(1)
    h, v = DEEPSEEK_ARGS["hidden_size"], DEEPSEEK_ARGS["vocab_size"]
    for name in list(tensors):
        t = tensors[name]
        if name.endswith("norm.weight"):  # not all ones: "unchanged" must mean something
            tensors[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):  # float32 values that bf16 cannot hold
            tensors[name] = 0.01 * torch.randn(t.shape, generator=g) + 1e-5
    p = f"model.layers.{MTP_LAYER}."
    tensors[p + "enorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    tensors[p + "hnorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    tensors[p + "eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h, generator=g)
    tensors[p + "shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    tensors[p + "shared_head.head.weight"] = 0.02 * torch.randn(v, h, generator=g)
    tensors[p + "embed_tokens.weight"] = 0.02 * torch.randn(v, h, generator=g)
    tensors = {
        k: (t.float() if k.endswith("e_score_correction_bias") else t.to(torch.bfloat16)).contiguous()
        for k, t in sorted(tensors.items())
    }
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((scratch / "config.json").read_text())
    config.update(num_hidden_layers=N_LAYERS, num_nextn_predict_layers=1, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = scratch / "generation_config.json"
    if gen.exists():
        (out / "generation_config.json").write_bytes(gen.read_bytes())
    return out


def _split_shard_bytes(src: Path, options: ConvertOptions) -> int:
    """A max_shard_bytes under which output shard 1 ends exactly after some linear's ``weight``, so its
    ``weight_scale_inv`` (the next tensor written) cannot fit and opens shard 2 - as in the real DeepSeek-R1.
    Picks the first such cut past a quarter of the total, which gives >= 3 shards."""
    p = plan(src, Path("/nonexistent"), options)
    specs = [s for it in p.items for s in it.specs]
    total = sum(s.nbytes for s in specs)
    size = 0
    for a, b in zip(specs, specs[1:]):
        size += a.nbytes
        if size >= total / 4 and a.name.endswith(".weight") and b.name == a.name[: -len("weight")] + "weight_scale_inv":
            return size
    raise AssertionError("no weight followed by its scale in the plan")


@pytest.fixture(scope="session")
def deepseek_layout() -> dict:
    """What the tests need to know of the tiny DeepSeek's layout (the converter itself reads it from config.json)."""
    return {"n_layers": N_LAYERS, "mtp_layer": MTP_LAYER, "mtp_extra": MTP_EXTRA}


@pytest.fixture(scope="session")
def deepseek_bf16_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deepseek")
    return _build_deepseek_bf16(root / "bf16", root / "hf-save")


@pytest.fixture(scope="session")
def deepseek_fp8_dir(deepseek_bf16_dir, tmp_path_factory) -> Path:
    """The BF16 model written by ingot as hf-fp8 into >= 3 shards, with a scale in another shard than its weight.

    quantize_mtp=True: DeepSeek-V3's own FP8 checkpoint stores its MTP layer's MoE and attention in FP8 too, so the
    default conversions below have to *dequantize* the MTP linears to keep them unquantized.
    """
    dst = tmp_path_factory.mktemp("deepseek-fp8") / "fp8"
    base = ConvertOptions(Scheme.from_name("fp8-block"), quantize_mtp=True)
    options = ConvertOptions(base.scheme, quantize_mtp=True, max_shard_bytes=_split_shard_bytes(deepseek_bf16_dir, base))
    convert(deepseek_bf16_dir, dst, options, progress=False)
    return dst


class Conversions:
    """Conversions made once per session, keyed by (source dir, scheme, format, quantize_mtp)."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[tuple, tuple[Path, dict]] = {}

    def __call__(self, src: Path, scheme: str, fmt: str | None = None, quantize_mtp: bool = False) -> tuple[Path, dict]:
        key = (str(src), scheme, fmt, quantize_mtp)
        if key not in self.done:
            dst = self.root / f"{len(self.done):03d}-{src.name}-{scheme}-{fmt}-{'mtp' if quantize_mtp else 'nomtp'}"
            options = ConvertOptions(Scheme.from_name(scheme), format=fmt, quantize_mtp=quantize_mtp)
            manifest = convert(src, dst, options, progress=False)
            self.done[key] = (dst, manifest)
        return self.done[key]


@pytest.fixture(scope="session")
def conversions(tmp_path_factory) -> Conversions:
    return Conversions(tmp_path_factory.mktemp("conversions"))


# ------------------------------------------------------------------------------- reading checkpoints back


def read_index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def shard_headers(d: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """{shard file: {tensor: (dtype code, shape)}} of every *.safetensors in a directory, from headers only."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out[f.name] = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    return out


class Tensors:
    """Every tensor of a checkpoint directory, loaded by name from whichever shard holds it."""

    def __init__(self, d: Path):
        self.dir = d
        self.where = {name: shard for shard, hdr in shard_headers(d).items() for name in hdr}
        self.config = json.loads((d / "config.json").read_text())

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def names(self) -> list[str]:
        return sorted(self.where)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _expand(s: torch.Tensor, n: int, k: int, bn: int = 128, bk: int = 128) -> torch.Tensor:
    """A [cdiv(n, bn), cdiv(k, bk)] scale grid over an [n, k] weight, each scale covering a bn x bk tile."""
    assert tuple(s.shape) == (_cdiv(n, bn), _cdiv(k, bk)), (tuple(s.shape), n, k, bn, bk)
    return s.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def _unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 [R, P] -> int64 [R, count] unsigned fields, element i at bit offset bits*i of the row, low bits first."""
    u = packed.astype(np.int64) & 0xFFFFFFFF
    per = 32 // bits
    fields = [(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(fields, axis=-1).reshape(packed.shape[0], -1)[:, :count]


def decode_linear(t: Tensors, prefix: str) -> tuple[str, torch.Tensor]:
    """(stored kind, float32 [N, K] dequantized weight) of one linear, from FORMATS.md alone."""
    qcfg = t.config.get("quantization_config")
    method = qcfg["quant_method"] if qcfg else None
    p = prefix + "."
    if method is None or (p + "weight" in t and t[p + "weight"].dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return "bf16", t[p + "weight"].float()
    if method == "fp8":
        w = t[p + "weight"]
        assert w.dtype == torch.float8_e4m3fn, prefix
        s = t[p + "weight_scale_inv"]
        assert s.dtype == torch.float32 and tuple(s.shape) == (_cdiv(w.shape[0], 128), _cdiv(w.shape[1], 128)), prefix
        return "fp8-block", w.float() * _expand(s, *w.shape)
    if method == "blockwise_int8":
        w, s = t[p + "weight"], t[p + "weight_scale_inv"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32
        assert tuple(s.shape) == (_cdiv(w.shape[0], 128), _cdiv(w.shape[1], 128)), prefix
        return "int8-block", w.float() * _expand(s, *w.shape)
    if method == "w8a8_int8":
        w, s = t[p + "weight"], t[p + "weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32 and tuple(s.shape) == (w.shape[0], 1)
        return "int8-channel", w.float() * s.float()
    if method == "compressed-tensors":
        fmt = qcfg["format"]
        mdtype = torch.bfloat16  # compressed-tensors keeps scales in the model's dtype
        if fmt == "float-quantized":
            w, s = t[p + "weight"], t[p + "weight_scale"]
            assert w.dtype == torch.float8_e4m3fn and s.dtype == mdtype
            assert tuple(s.shape) == (_cdiv(w.shape[0], 128), _cdiv(w.shape[1], 128)), prefix
            return "fp8-block", w.float() * _expand(s, *w.shape)
        if fmt == "int-quantized":
            w, s = t[p + "weight"], t[p + "weight_scale"]
            assert w.dtype == torch.int8 and s.dtype == mdtype and tuple(s.shape) == (w.shape[0], 1)
            assert int(w.min()) >= -127, f"{prefix}: -128 is outside the symmetric int8 range"
            return "int8-channel", w.float() * s.float()
        assert fmt == "pack-quantized", fmt
        bits = qcfg["config_groups"]["group_0"]["weights"]["num_bits"]
        n, k = t[p + "weight_shape"].tolist()
        packed, s = t[p + "weight_packed"], t[p + "weight_scale"]
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (n, _cdiv(k * bits, 32)) and s.dtype == mdtype
        assert p + "weight_zero_point" not in t, "symmetric: no zero point"
        q = _unpack_rows(packed.numpy(), bits, k) - (1 << (bits - 1))
        if bits == 4:
            assert tuple(s.shape) == (n, _cdiv(k, 128))
            return "int4-group", torch.from_numpy(q).float() * _expand(s, n, k, 1, 128)
        assert tuple(s.shape) == (n, 1)
        return "int8-weight", torch.from_numpy(q).float() * s.float()
    assert method == "gptq", method
    qweight, qzeros, scales = t[p + "qweight"], t[p + "qzeros"], t[p + "scales"]
    k8, n = qweight.shape
    k = k8 * 8
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (_cdiv(k, 128), n)
    # qweight packs 8 values along K: value j of int32 [r, c] is weight[c, 8r + j].
    q = _unpack_rows(qweight.T.contiguous().numpy(), 4, k)  # [N, K] unsigned
    zeros = _unpack_rows(qzeros.numpy(), 4, n) + 1  # [G, N]: v1 stores zero - 1
    g_idx = t[p + "g_idx"].long().numpy() if p + "g_idx" in t else np.arange(k) // 128
    z = zeros[g_idx].T  # [N, K]
    s = scales.float().T[:, torch.from_numpy(g_idx)]  # [N, K]
    return "int4-group", torch.from_numpy(q - z).float() * s


def linear_prefixes(t: Tensors) -> list[str]:
    """Module prefixes of the quantizable linears (FORMATS.md), however they are stored."""
    pat = re.compile(
        r"^(model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)"
        r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj)))\.(weight|weight_packed|qweight)$"
    )
    return sorted({m.group(1) for n in t.names() if (m := pat.match(n))})


@pytest.fixture(scope="session")
def decode():
    """decode(Tensors, prefix) -> (stored kind, float32 [N, K] weight), independent of ingot.formats."""
    return decode_linear


@pytest.fixture(scope="session")
def ckpt_tools():
    """Helpers to read checkpoints back: Tensors, shard_headers, read_index, linear_prefixes."""
    return dict(Tensors=Tensors, shard_headers=shard_headers, read_index=read_index, linear_prefixes=linear_prefixes)
