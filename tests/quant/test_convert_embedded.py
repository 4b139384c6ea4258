"""The converter on a real model: the embedded SmolLM2-135M-Instruct (BF16, 30 Llama layers, hidden 576).

Every scheme in its default format, then the compressed-tensors outputs loaded by transformers + compressed-tensors
and compared with ingot's own dequantized model (the same directory converted back to BF16 by ingot).

SmolLM2's hidden size 576 is not a multiple of 128 (4.5 groups): q/k/v/o/gate/up have K = 576, only down_proj
(K = 1536) divides. ingot pads the last group / block (FORMATS.md, scale grids are cdiv), which compressed-tensors
handles for weight *blocks* but not for *groups* - int4 weight groups, or the fp8 scheme's per-group activation
quantization - see the int4 and fp8 tests for what that leaves checkable on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from ingot.formats import FORMATS_OF_KIND
from ingot.quant.inspect import inspect_checkpoint
from ingot.quant.schemes import PRESETS, Scheme

pytestmark = pytest.mark.slow  # a 135M-parameter model: each conversion takes seconds on 2 CPU cores

# 124 tokens of plain English prose.
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith from Mainz, "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could produce books far faster than "
    "scribes copying by hand. Before his invention, a single Bible could take a monk more than a year to complete. Within fifty "
    "years, printing shops had spread to more than two hundred cities across Europe, and millions of volumes had been printed. "
    "The new technology lowered the cost of books, encouraged literacy, and helped ideas about science, religion and politics travel "
    "quickly from one country to another."
)

# Mean per-linear weight SNR (dB, manifest totals) against the BF16 source, measured on the 210 linears:
#   fp8-block 31.55, fp8-block-ue8m0 31.51, int8-block 36.42, int8-channel 41.39, int8-weight 41.39, int4-group 18.58.
# Floors leave ~2-3 dB of margin. bf16 -> bf16 is exact (every row's SNR is None: infinite).
SNR_MEAN_FLOOR = {
    "fp8-block": 29.0,
    "fp8-block-ue8m0": 29.0,
    "int8-block": 34.0,
    "int8-channel": 39.0,
    "int8-weight": 39.0,
    "int4-group": 16.0,
}
# The requirement for int8 loaded by transformers vs ingot's own dequantized model.
TOP1_INT8 = 0.95
# transformers' W8A8 forward also fake-quantizes every Linear input per token (see test_int8_channel_w8a8): measured
# top-1 agreement with ingot's dense dequantized model 0.9435 (117/124), max |dlogit| 6.55 on PROMPT. That noise is
# the activation quantization's, not the checkpoint's: the weights are bit-exact and the W8A8 logits equal ingot's
# dense model behind compressed-tensors' activation rule exactly (both asserted). Floor below the measurement.
TOP1_W8A8_ACT_QUANT = 0.90
N_LINEARS = 30 * 7


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def snr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref64 = ref.double()
    noise = (ref64 - approx.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref64.pow(2).sum().item() / noise)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def embedded(embedded_model_dir, conversions):
    """scheme, format -> (dir, manifest) of the embedded model converted (once a session)."""
    return lambda scheme, fmt=None: conversions(embedded_model_dir, scheme, fmt)


@pytest.fixture(scope="module")
def source_info(embedded_model_dir):
    return inspect_checkpoint(embedded_model_dir)


@pytest.mark.parametrize("scheme", list(PRESETS))
def test_every_scheme(scheme, embedded, embedded_model_dir, source_info, ckpt_tools, decode):
    dst, manifest = embedded(scheme)
    kind = Scheme.from_name(scheme).kind
    fmt = FORMATS_OF_KIND[kind][0]
    assert (manifest["scheme"], manifest["format"]) == (scheme, fmt)
    info = inspect_checkpoint(dst)
    assert (info["format"], info["scheme"]) == (fmt, kind)
    assert info["params"] == source_info["params"] == manifest["totals"]["params"]
    assert info["linears"] == {kind: N_LINEARS}
    assert manifest["kept_unquantized"] == []
    src, out = ckpt_tools["Tensors"](embedded_model_dir), ckpt_tools["Tensors"](dst)
    prefixes = ckpt_tools["linear_prefixes"](src)
    assert len(prefixes) == N_LINEARS
    rows = {r["name"]: r for r in manifest["tensors"]}
    linear_rows = [rows[p] for p in prefixes]
    assert all(r["dtype_out"] == (kind if kind != "bf16" else "bfloat16") for r in linear_rows)
    if scheme == "bf16":
        assert all(r["snr_db"] is None for r in rows.values())  # bit-exact copies
        return
    mean = manifest["totals"]["snr_db_mean"]
    assert mean == pytest.approx(sum(r["snr_db"] for r in linear_rows) / N_LINEARS, abs=1e-3)
    assert mean > SNR_MEAN_FLOOR[scheme]
    print(f"\n{scheme}: mean weight SNR {mean:.2f} dB, min {manifest['totals']['snr_db_min']:.2f} dB")
    # An independent read of three layers (conftest's decoder, FORMATS.md only) agrees with the manifest's rows.
    for prefix in prefixes:
        if prefix.split(".")[2] in ("0", "17", "29"):
            got_kind, w = decode(out, prefix)
            assert got_kind == kind
            assert rows[prefix]["snr_db"] == pytest.approx(snr_db(src[f"{prefix}.weight"], w), abs=0.01), prefix


# --------------------------------------------------------------------- transformers + compressed-tensors


@pytest.fixture(scope="module")
def prompt_ids(embedded_model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(embedded_model_dir)(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] >= 100
    return ids


@pytest.fixture(scope="module")
def ct_case(embedded, conversions, prompt_ids):
    """scheme -> (compressed-tensors dir, ingot's BF16 model of it, that model's logits on PROMPT)."""
    from transformers import LlamaForCausalLM

    def get(scheme: str):
        dst, _ = embedded(scheme, "compressed-tensors")
        back, _ = conversions(dst, "bf16")
        model = LlamaForCausalLM.from_pretrained(back, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = model(prompt_ids).logits.float()
        return dst, model, logits

    return get


def _load_ct(d, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, output_loading_info=True, **kwargs)
    return model.eval(), info


def _linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    agreement = top1(got, want)
    print(f"\n{name}: top-1 agreement {agreement:.4f} ({int(round(agreement * got.shape[1]))}/{got.shape[1]}), "
          f"max |dlogit| {(got - want).abs().max().item():.4f}")
    return agreement


def test_int8_weight_w8a16_loads_in_transformers(ct_case, prompt_ids):
    d, ref, ref_logits = ct_case("int8-weight")
    model, info = _load_ct(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_packed.dtype == torch.int32  # loaded compressed; decompressed on the first forward
    with torch.no_grad():
        logits = model(prompt_ids).logits.float()
    # Decompressed, every linear is exactly ingot's dequantized weight.
    mine = _linears(ref)
    for name, module in _linears(model).items():
        assert bits(module.weight) == bits(mine[name].weight), name
    assert _report("int8-weight W8A16 (transformers vs ingot)", logits, ref_logits) >= TOP1_INT8


def _ct_int8_token_qdq(module, args):
    """compressed-tensors' dynamic symmetric per-token int8 fake quantization, in the activation's dtype."""
    x = args[0]
    s = x.abs().amax(dim=-1, keepdim=True) / 127.5  # (max - min) / 2 of the range [-128, 127]
    return ((x / s).round().clamp(-128, 127).to(s.dtype) * s,)


def test_int8_channel_w8a8_loads_in_transformers(ct_case, prompt_ids):
    """What transformers actually runs for W8A8: compressed-tensors decompresses each int8 weight to a dense bf16
    weight (int8 * scale) on the first forward and keeps the scheme's dynamic per-token int8 *activation*
    quantization as fake quantization (quantize-dequantize of the Linear input in bf16, scale amax / 127.5 over
    [-128, 127] - compressed-tensors' symmetric rule, not ingot's amax / 127 over +-127) before a dense bf16 matmul.
    No int8 GEMM runs. So: weights must match ingot bit for bit, logits with the activation fake-quant switched off
    must match ingot's dense model, with it on they must equal ingot's dense model behind that same activation rule,
    and they differ from ingot's dense logits by the activation quantization noise alone (ingot's own W8A8 rule,
    amax / 127, moves the same model's top-1 just as much: 115/124 on PROMPT)."""
    d, ref, ref_logits = ct_case("int8-channel")
    model, info = _load_ct(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.bfloat16
    acts = q.quantization_scheme.input_activations
    assert (acts.num_bits, acts.type, acts.strategy, acts.dynamic) == (8, "int", "token", True)
    with torch.no_grad():
        w8a8 = model(prompt_ids).logits.float()
        mine = _linears(ref)
        linears = _linears(model)
        for name, module in linears.items():
            assert bits(module.weight) == bits(mine[name].weight), name
        for module in linears.values():
            module.quantization_enabled = False  # compressed-tensors' switch for its fake quantization
        dense = model(prompt_ids).logits.float()
    assert _report("int8-channel W8A8 weights only (transformers vs ingot)", dense, ref_logits) >= TOP1_INT8
    # The W8A8 forward is exactly ingot's dense model with compressed-tensors' activation rule in front of each Linear.
    hooks = [m.register_forward_pre_hook(_ct_int8_token_qdq) for m in _linears(ref).values()]
    try:
        with torch.no_grad():
            emulated = ref(prompt_ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(emulated, w8a8)
    assert _report("int8-channel W8A8 with per-token activation fake-quant (transformers vs ingot)", w8a8, ref_logits) >= TOP1_W8A8_ACT_QUANT


def test_int4_group_w4a16_in_transformers(ct_case, prompt_ids, embedded_model_dir, ckpt_tools):
    """compressed-tensors cannot dequantize a group-quantized weight whose K is not a multiple of the group size:
    ``forward_helpers._process_group`` raises "tensor column shape must be divisble by the given group_size"
    (compressed-tensors issues #353 and #447; llm-compressor refuses to *write* such a model for the same reason).
    ingot writes the ragged last group (scale grid [N, cdiv(K, 128)], FORMATS.md), so SmolLM2's K = 576 linears
    (q/k/v/o/gate/up) load but cannot be decompressed, on the forward pass or with ``dequantize=True``. What can be
    checked: the checkpoint loads; every linear whose K divides (down_proj, K = 1536) decompresses, by
    compressed-tensors' own decompressor, to exactly ingot's weights; the others fail for exactly that reason and no other. If compressed-tensors learns ragged
    groups, the logits comparison below runs instead."""
    d, ref, ref_logits = ct_case("int4-group")
    model, info = _load_ct(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_packed.dtype == torch.int32 and tuple(q.weight_scale.shape) == (576, 5)
    try:
        with torch.no_grad():
            logits = model(prompt_ids).logits.float()
    except ValueError as e:
        assert "must be divisble by the given group_size 128 but got 576" in str(e)
    else:  # pragma: no cover - a compressed-tensors that handles ragged groups
        assert _report("int4-group W4A16 (transformers vs ingot)", logits, ref_logits) >= TOP1_INT8
        return

    # compressed-tensors' own decompressor (the one transformers' loader calls), linear by linear, on the file's tensors.
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    stored = ckpt_tools["Tensors"](d)
    mine = _linears(ref)
    ragged = {n for n, m in mine.items() if m.in_features % 128}
    assert ragged and ragged != set(mine)
    for name, module in _linears(model).items():
        tensors = {k: stored[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        if name in ragged:
            with pytest.raises(ValueError, match="must be divisble by the given group_size 128"):
                compressor.decompress(tensors, module.quantization_scheme)
        else:
            w = compressor.decompress(tensors, module.quantization_scheme)["weight"]
            assert bits(w.to(torch.bfloat16)) == bits(mine[name].weight), name
    # For the record: ingot's own int4 model against the BF16 source (transformers cannot run this checkpoint).
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        source = LlamaForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.bfloat16).eval()(prompt_ids).logits.float()
    _report("int4-group: ingot's dequantized model vs the BF16 source (not a transformers load)", ref_logits, source)


def test_fp8_block_loads_in_transformers(ct_case, prompt_ids):
    """float-quantized FP8 blocks load compressed (fp8 weights, bf16 [cdiv(N,128), cdiv(K,128)] scales). The plain
    forward fake-quantizes each Linear input dynamically per group of 128 channels, and compressed-tensors'
    ``compute_dynamic_scales_and_zp`` reshapes K into (cdiv(K, 128), 128), which fails for K = 576 ("unflatten"). Its
    weight path handles ragged blocks (``maybe_pad_tensor_for_block_quant``), so ``dequantize=True`` - weights
    dequantized at load, no activation quantization - runs, and must equal ingot's dequantized model exactly."""
    d, ref, ref_logits = ct_case("fp8-block")
    model, info = _load_ct(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.float8_e4m3fn and tuple(q.weight_scale.shape) == (5, 5)
    try:
        with torch.no_grad():
            logits = model(prompt_ids).logits.float()
    except RuntimeError as e:
        assert "unflatten" in str(e) and "576" in str(e)
    else:  # pragma: no cover - a compressed-tensors that handles ragged activation groups (unmeasured floor)
        assert _report("fp8-block with fp8 activation fake-quant (transformers vs ingot)", logits, ref_logits) >= TOP1_W8A8_ACT_QUANT

    model, info = _load_ct(d, dequantize=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    mine = _linears(ref)
    for name, module in _linears(model).items():
        assert bits(module.weight) == bits(mine[name].weight), name
    with torch.no_grad():
        logits = model(prompt_ids).logits.float()
    assert _report("fp8-block dequantize=True (transformers vs ingot)", logits, ref_logits) >= TOP1_INT8
