"""The runtime linear layer of every ingot kind: one ``Linear`` module, one ``LinearMethod`` per stored kind.

SGLang's quantization seam (DESIGN rule 3): ``Linear`` knows shapes, dtype and bias only; its method registers the
parameters the kind stores (``create_weights``), copies one decoded ``StoredLinear`` in (``load``), finishes them
(``process_weights_after_loading``) and computes ``y = x @ W.T (+ bias)`` (``apply``). Formats never reach this
file: the loader decodes a checkpoint into logical ``StoredLinear``s, and any format's linear of a kind loads the same.

Parameters, named as on disk (DESIGN rule 6), ``W`` = [N, K] = [out_features, in_features]:

===============  ==============================================  ==================================================
kind             parameters                                      apply on CUDA (ingot.kernels)
===============  ==============================================  ==================================================
bf16             weight [N, K] (model dtype)                     F.linear (cuBLAS)
int8-channel     weight int8 [N, K], weight_scale fp32 [N, 1]    per_token_quant_int8 + int8_gemm_channel
int8-block       weight int8 [N, K], weight_scale fp32           per_token_group_quant(int8, bk) + int8_gemm_block
                 [cdiv(N, bn), cdiv(K, bk)]
fp8-block        weight e4m3fn [N, K], weight_scale fp32         per_token_group_quant(fp8_e4m3, bk, scale_fmt)
                 [cdiv(N, bn), cdiv(K, bk)]                      + fp8_gemm_block
int8-weight      weight int8 [N, K], weight_scale fp32 [N, 1]    w8a16_gemm
int4-group       weight_packed int32 [N, cdiv(K, 8)],            w4a16_gemm
                 weight_scale fp32 [N, cdiv(K, 128)]
===============  ==============================================  ==================================================

Quantized activations from the producer (the seam's second half). A W8A8 method says how it quantizes its input
(``act_quant``: an ``ActQuant`` - int8 per token, or int8 / fp8 per token per bk-group with its scale format; None
for bf16 and weight-only kinds), and ``apply`` also takes a ``QuantizedActivation`` (x_q, x_s, how, model dtype)
made exactly that way, running only its GEMM. ``Linear.input_quant(x)`` is what a producing op asks: the method's
``act_quant`` when it would run its kernels on x, else None. The producers - ``RMSNorm`` (the norm, optionally after
the residual add) and the MLP's silu * up, with ``fused_ops`` on - then quantize in their own launch
(ingot.kernels.norm_rope.rms_norm_quant, ingot.kernels.silu_mul.silu_mul_quant), bit-identical to this layer's own
``per_token_quant_int8`` / ``per_token_group_quant``, so each saves one launch per linear input. Linear keeps
knowing shapes only; which quantization is the method's business.

Scales are kept in float32 whatever the format stored them in (compressed-tensors: bf16, GPTQ: fp16): both convert
exactly, the kernels read fp32 scales, and the CPU path then equals ``ingot.quant.ref`` exactly. int4 keeps
compressed-tensors' packed int32 layout (8 values per int32, ``ingot.formats.base.pack_int32``): 0.5 byte per weight.

On CPU (or whenever a method's ``use_kernels`` is False) ``apply`` runs the math of ``ingot.quant.ref``: the
activation quantized by ``ref.quantize_act_token`` / ``ref.quantize_act_group`` exactly as the scheme says, then the
reference GEMM (``ref.int8_gemm_channel_ref`` / ``int8_gemm_block_ref`` / ``fp8_gemm_block_ref``; their exact integer
dots run as chunked float32 matmuls, fast on CPU).

FP8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper). Elsewhere - CPU, A100 (8.0), ... - an "fp8-block"
request gets ``Fp8FallbackMethod``: the FP8 weight is re-quantized at load, one linear at a time, to int8-block
(``fp8_fallback="int8-block"``, the default: half the memory of BF16, the DeepSeek-on-A100 path) or dequantized to
the model dtype (``"bf16"``). One warning per process on logging.getLogger("ingot") says so and why.

Activation scale format of fp8-block (``ue8m0``, DeepSeek-V3.1+): ``StoredLinear`` carries no flag, so
``process_weights_after_loading`` detects it per linear: when every non-zero weight scale is a power of two, the
activations are quantized with power-of-two scales too (``layer.act_scale_fmt``). This reads the same for every
format (compressed-tensors' fp8 has no scale_fmt field). A float scale amax / 448 is a power of two only when the
block's amax is 1.75 * 2^e: for bf16 weights about 1 block in 128, so all blocks of a linear with B blocks about
128^-B - 1 in 128 for a one-block toy linear (whose activations would then round to power-of-two scales, still
correct math), never for real ones (DeepSeek-V3's smallest, kv_a_proj_with_mqa, has 280 blocks).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ingot.formats.base import KINDS, StoredLinear, cdiv, pack_int32, unpack_int32
from ingot.quant import fast, ref
from ingot.quant.schemes import Scheme

logger = logging.getLogger("ingot")

FP8_FALLBACKS = ("int8-block", "bf16")
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later
DEFAULT_BLOCK = (128, 128)
DEFAULT_GROUP = 128
A16_DTYPES = (torch.bfloat16, torch.float16)  # the weight-only kernels' activations; float32 runs the reference

# ------------------------------------------------------------------------------------------------ activations


@dataclass(frozen=True)
class ActQuant:
    """How a W8A8 linear quantizes its input on the kernel path (``LinearMethod.act_quant``).

    dtype: "int8" or "fp8_e4m3"; group_size: None for one scale per token (int8-channel), else one scale per token
    per ``group_size`` channels (the block kinds' bk); scale_fmt: "float", or "ue8m0" (fp8: power-of-two scales).
    """

    dtype: str
    group_size: int | None = None
    scale_fmt: str = "float"


@dataclass(frozen=True)
class QuantizedActivation:
    """An activation already quantized as a linear's ``act_quant`` says, by the op that produced it (the fused
    RMSNorm / silu*mul kernels): ``Linear.forward`` takes it in place of the model-dtype tensor and skips its own
    quantization launch. Bit-identical to what the linear would have made of ``x`` (the producing kernels' tests).

    x_q [..., K] int8 / float8_e4m3fn; x_s float32 [..., 1] (per token) or [..., cdiv(K, group_size)];
    quant: how it was quantized; dtype: the model dtype of the activation it stands for (the GEMM's output dtype).
    """

    x_q: torch.Tensor
    x_s: torch.Tensor
    quant: ActQuant
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.x_q.shape


@dataclass(frozen=True)
class RowMaxActivation:
    """An activation in the model dtype with the max |x| of column ranges covering each of its rows, written by the
    op that produced it (the decode attention at batch 1, ``kernels.attention.paged_decode_attention_maxima``;
    ``kernels.silu_mul.silu_mul_maxima`` can make one too): a per-token int8 scale without a pass over x. A linear
    that ``takes_row_maxima`` (int8-channel's M = 1 GEMV) quantizes x itself as it reads it; int8-channel's kernel path
    at M > 1 quantizes from the maxima (``quantize_row_chunks``); every other path takes x as it is. The same result
    as passing x.

    x [..., K] bf16/fp16/fp32; maxima float32 [..., C] (C >= 1 ranges: only their max matters).
    """

    x: torch.Tensor
    maxima: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.x.shape


def quantize_activation(x: torch.Tensor, quant: ActQuant,
                        column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q, x_s) with the activation-quantization kernels (ingot.kernels.act_quant).
    ``column_major_scales``: per-group x_s stored column-major (the layout cuBLAS's block-scaled GEMM reads)."""
    from ingot.kernels.act_quant import per_token_group_quant, per_token_quant_int8

    if quant.group_size is None:
        return per_token_quant_int8(x)
    return per_token_group_quant(x, quant.dtype, group_size=quant.group_size, scale_fmt=quant.scale_fmt,
                                 column_major_scales=column_major_scales)


def shared_input_quant(x: torch.Tensor, *linears: "Linear") -> ActQuant | None:
    """The quantization that every one of ``linears`` (which all read ``x``) wants for it, or None when any of them
    takes x as it is or they disagree: what a producer may emit once for all of them."""
    wanted = {lin.input_quant(x) for lin in linears}
    return wanted.pop() if len(wanted) == 1 else None


# ------------------------------------------------------------------------------------------------ methods


def _register(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """An uninitialized (torch.empty) inference parameter: the loader fills it."""
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))


def _copy_in(layer: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Copy ``value`` into parameter ``name`` after checking its shape (and dtype, when given: copy_ would cast
    a float into int8 silently)."""
    param = getattr(layer, name)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"{name}: shape {tuple(value.shape)} does not fit this [{layer.out_features}, {layer.in_features}] "
            f"{layer.method.kind} linear, which expects {tuple(param.shape)}"
        )
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name}: dtype {value.dtype}, a {layer.method.kind} linear expects {dtype}")
    with torch.no_grad():
        param.copy_(value)


def _check_kind(method: "LinearMethod", layer: nn.Module, stored: StoredLinear) -> None:
    if stored.kind != method.source_kind:
        raise ValueError(
            f"cannot load a {stored.kind} linear into a layer built for {method.source_kind} "
            f"([{layer.out_features}, {layer.in_features}])"
        )
    shape = (layer.out_features, layer.in_features)
    if tuple(stored.qweight.shape) != shape:
        raise ValueError(
            f"weight: shape {tuple(stored.qweight.shape)} does not fit this linear, which expects [N, K] = {list(shape)}"
        )
    if stored.kind != "bf16" and stored.scale is None:
        raise ValueError(f"weight_scale: a {stored.kind} linear needs a scale, got None")


def _all_powers_of_two(s: torch.Tensor) -> bool:
    """Whether every non-zero scale is a power of two (and at least one is non-zero): ue8m0 scales."""
    mantissa, _ = torch.frexp(s.float())
    nonzero = s != 0
    return bool(nonzero.any()) and bool(((mantissa.abs() == 0.5) | ~nonzero).all())


class LinearMethod:
    """How a linear of one kind stores its weight and computes. One instance per layer.

    kind:        the layout of the layer's parameters, the kind it computes as.
    source_kind: the ``StoredLinear.kind`` that ``load`` accepts (the same, except for ``Fp8FallbackMethod``).
    use_kernels: None (default) runs the Triton/cuBLAS path for CUDA inputs and the reference math otherwise;
                 True/False force one (True on CPU runs the kernels under TRITON_INTERPRET=1, as the tests do).
    """

    kind: str = ""
    source_kind: str = ""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.use_kernels: bool | None = None

    # ---- the seam
    def create_weights(self, layer: nn.Module) -> None:
        """Register the kind's parameters on ``layer`` (torch.empty, on ``self.device``)."""
        raise NotImplementedError

    def load(self, layer: nn.Module, stored: StoredLinear) -> None:
        """Copy one decoded linear in, checking kind, shapes and dtypes (ValueError naming the tensor)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Finish the loaded parameters (once, after ``load``)."""

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The weight the layer multiplies by, W = q * scale: float32 [N, K] on the layer's device."""
        raise NotImplementedError

    def act_quant(self, layer: nn.Module) -> ActQuant | None:
        """How ``apply`` quantizes its input on the kernel path; None for kinds that multiply the activation as it is
        (bf16, weight-only)."""
        return None

    def runs_kernels(self, x: torch.Tensor) -> bool:
        """Whether ``apply`` takes the kernel path for an input on x's device."""
        return x.is_cuda if self.use_kernels is None else self.use_kernels

    def input_quant(self, layer: nn.Module, x: torch.Tensor) -> ActQuant | None:
        """``act_quant`` when ``apply`` would run its kernels on ``x`` (and so accepts a ``QuantizedActivation`` made
        as it says), else None: the reference path quantizes with ``ingot.quant.ref`` and keeps doing so."""
        quant = self.act_quant(layer)
        return quant if quant is not None and self.runs_kernels(x) else None

    def takes_row_maxima(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``apply`` would quantize an input shaped like ``x`` itself, inside its GEMM, from the maxima of a
        ``RowMaxActivation`` - so a producer that hands it one saves the per-token quantization's row-wide pass."""
        return False

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation | RowMaxActivation) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x's dtype, plus ``layer.bias`` when present (in the GEMM epilogue).

        x may be a ``QuantizedActivation`` quantized as ``act_quant`` says: the GEMM then runs on it directly; or a
        ``RowMaxActivation``: int8-channel's kernel path quantizes it from its maxima, every other path takes x."""
        if isinstance(x, QuantizedActivation):
            return self._apply_quantized(layer, x)
        if isinstance(x, RowMaxActivation):
            return self._apply_row_max(layer, x)
        k, n = layer.in_features, layer.out_features
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} features, this linear takes K = {k} (input shape {tuple(x.shape)})")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).contiguous()  # (M, K)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, n)
        kernels = x2.is_cuda if self.use_kernels is None else self.use_kernels
        y = self._kernel(layer, x2) if kernels else self._reference(layer, x2)
        return y.view(*lead, n)

    def _apply_quantized(self, layer: nn.Module, x: QuantizedActivation) -> torch.Tensor:
        k, n = layer.in_features, layer.out_features
        quant = self.act_quant(layer)
        if quant is None or x.quant != quant:
            raise ValueError(f"a {self.kind} linear [{n}, {k}] quantizes its input as {quant}, got an activation "
                             f"quantized as {x.quant}")
        if x.x_q.shape[-1] != k:
            raise ValueError(f"input has {x.x_q.shape[-1]} features, this linear takes K = {k} "
                             f"(input shape {tuple(x.x_q.shape)})")
        lead = x.x_q.shape[:-1]
        x_q = x.x_q.reshape(-1, k).contiguous()  # (M, K)
        x_s = x.x_s.reshape(x_q.shape[0], -1).contiguous()  # (M, G)
        if x_q.shape[0] == 0:
            return torch.empty(*lead, n, dtype=x.dtype, device=x_q.device)
        return self._gemm(layer, x_q, x_s, x.dtype, self.runs_kernels(x_q)).view(*lead, n)

    def _apply_row_max(self, layer: nn.Module, x: RowMaxActivation) -> torch.Tensor:
        """A ``RowMaxActivation``: x as it is (the kind quantizes it its own way, if at all); int8-channel's kernel
        path quantizes from the maxima."""
        return self.apply(layer, x.x)

    # ---- per kind: x2 (M, K) contiguous -> (M, N) in x2.dtype, bias included
    def _kernel(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Quantizing kinds: the activation-quantization kernel, then ``_gemm`` on the kernels."""
        x_q, x_s = quantize_activation(x, self.act_quant(layer), self._scales_column_major(layer, x))
        return self._gemm(layer, x_q, x_s, x.dtype, True)

    def _scales_column_major(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether the GEMM reads the activation scales of this (M, K) input column-major."""
        return False

    def _reference(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gemm(self, layer: nn.Module, x_q: torch.Tensor, x_s: torch.Tensor, out_dtype: torch.dtype,
              kernels: bool) -> torch.Tensor:
        """Quantizing kinds: x_q (M, K), x_s (M, G) -> (M, N) in out_dtype, bias included; the Triton GEMM or the
        reference GEMM of ``ingot.quant.ref``."""
        raise NotImplementedError


class Bf16Method(LinearMethod):
    """An unquantized linear in the model dtype: the same ``weight`` [N, K] as nn.Linear (HF state dicts load)."""

    kind = source_kind = "bf16"

    def create_weights(self, layer):
        _register(layer, "weight", (layer.out_features, layer.in_features), layer.params_dtype, self.device)

    def load(self, layer, stored):
        _check_kind(self, layer, stored)
        if not stored.qweight.is_floating_point():
            raise ValueError(f"weight: dtype {stored.qweight.dtype}, a bf16 linear expects a float weight")
        _copy_in(layer, "weight", stored.qweight)  # cast to the model dtype

    def dequantize(self, layer):
        return layer.weight.float()

    def apply(self, layer, x):
        if isinstance(x, QuantizedActivation):
            return self._apply_quantized(layer, x)  # refuses it: a bf16 linear quantizes nothing
        if isinstance(x, RowMaxActivation):
            return self._apply_row_max(layer, x)
        return F.linear(x, layer.weight, layer.bias)  # any leading shape, on every device


class Int8ChannelMethod(LinearMethod):
    """W8A8 int8, per output channel weight scales, per token activation scales (SGLang w8a8_int8)."""

    kind = source_kind = "int8-channel"

    def create_weights(self, layer):
        n, k = layer.out_features, layer.in_features
        _register(layer, "weight", (n, k), torch.int8, self.device)
        _register(layer, "weight_scale", (n, 1), torch.float32, self.device)

    def load(self, layer, stored):
        _check_kind(self, layer, stored)
        _copy_in(layer, "weight", stored.qweight, torch.int8)
        _copy_in(layer, "weight_scale", stored.scale.float())

    def dequantize(self, layer):
        return layer.weight.float() * layer.weight_scale  # (N, K) * (N, 1), as ref.dequantize_weight

    def act_quant(self, layer):
        return ActQuant("int8")

    def _reference(self, layer, x):
        x_q, x_s = ref.quantize_act_token(x)
        return self._gemm(layer, x_q, x_s, x.dtype, False)

    def takes_row_maxima(self, layer, x):
        if self.input_quant(layer, x) != ActQuant("int8") or x.numel() != x.shape[-1]:
            return False  # one row on the kernel path: the quantizing M = 1 GEMV (not int8-weight, a subclass)
        from ingot.kernels.int8_gemm import rowmax_gemv_config

        return rowmax_gemv_config(layer.out_features, layer.in_features, x.device) is not None

    def _apply_row_max(self, layer, x):
        if self.input_quant(layer, x.x) != ActQuant("int8"):  # the reference path; int8-weight (a subclass)
            return super()._apply_row_max(layer, x)
        from ingot.kernels.int8_gemm import int8_gemm_channel_rowmax

        k, lead = x.x.shape[-1], x.x.shape[:-1]
        y = int8_gemm_channel_rowmax(x.x.reshape(-1, k).contiguous(),  # M > 1: quantize_row_chunks, then the GEMM
                                     x.maxima.reshape(-1, x.maxima.shape[-1]).contiguous(),
                                     layer.weight, layer.weight_scale, bias=layer.bias, out_dtype=x.x.dtype)
        return y.view(*lead, layer.out_features)

    def _gemm(self, layer, x_q, x_s, out_dtype, kernels):
        if not kernels:
            return ref.int8_gemm_channel_ref(x_q, x_s, layer.weight, layer.weight_scale, layer.bias, out_dtype)
        from ingot.kernels.int8_gemm import int8_gemm_channel

        return int8_gemm_channel(x_q, x_s, layer.weight, layer.weight_scale, bias=layer.bias, out_dtype=out_dtype)


class _BlockMethod(LinearMethod):
    """Block-scaled weights: one fp32 scale per bn x bk block; activations per token per bk-group."""

    qdtype: torch.dtype

    def create_weights(self, layer):
        n, k = layer.out_features, layer.in_features
        layer.block_size = DEFAULT_BLOCK
        _register(layer, "weight", (n, k), self.qdtype, self.device)
        _register(layer, "weight_scale", (cdiv(n, DEFAULT_BLOCK[0]), cdiv(k, DEFAULT_BLOCK[1])), torch.float32, self.device)

    def load(self, layer, stored):
        _check_kind(self, layer, stored)
        block = tuple(stored.block_size)
        if block != tuple(layer.block_size):  # e.g. weight_block_size [64, 64]: the scale grid follows the checkpoint
            bn, bk = block
            if bn < 1 or bk < 16 or bk & (bk - 1):
                raise ValueError(f"weight_scale: block size {list(block)} unsupported (bk must be a power of two >= 16)")
            layer.block_size = block
            _register(layer, "weight_scale", (cdiv(layer.out_features, bn), cdiv(layer.in_features, bk)),
                      torch.float32, self.device)
        _copy_in(layer, "weight", stored.qweight, self.qdtype)
        _copy_in(layer, "weight_scale", stored.scale.float())

    def dequantize(self, layer):
        scheme = replace(Scheme.from_name(self.kind), block_size=tuple(layer.block_size))
        return ref.dequantize_weight(ref.QuantizedWeight(scheme, layer.weight, layer.weight_scale))


class Int8BlockMethod(_BlockMethod):
    """W8A8 int8, 128x128 weight blocks, activations per token per 128-group (SGLang blockwise_int8)."""

    kind = source_kind = "int8-block"
    qdtype = torch.int8

    def act_quant(self, layer):
        return ActQuant("int8", layer.block_size[1])

    def _reference(self, layer, x):
        x_q, x_s = ref.quantize_act_group(x, "int8", layer.block_size[1])
        return self._gemm(layer, x_q, x_s, x.dtype, False)

    def _gemm(self, layer, x_q, x_s, out_dtype, kernels):
        if not kernels:
            return ref.int8_gemm_block_ref(x_q, x_s, layer.weight, layer.weight_scale, layer.block_size, layer.bias,
                                           out_dtype)
        from ingot.kernels.int8_gemm import int8_gemm_block

        return int8_gemm_block(x_q, x_s, layer.weight, layer.weight_scale, block_size=layer.block_size,
                               bias=layer.bias, out_dtype=out_dtype)


class Fp8BlockMethod(_BlockMethod):
    """W8A8 fp8 e4m3, 128x128 weight blocks, activations per token per 128-group (DeepSeek-V3). Needs sm89+ on CUDA.

    ``layer.act_scale_fmt``: "ue8m0" when the weight scales are all powers of two (detected after loading, see the
    module docstring), else "float".
    """

    kind = source_kind = "fp8-block"
    qdtype = torch.float8_e4m3fn

    def create_weights(self, layer):
        super().create_weights(layer)
        layer.act_scale_fmt = "float"

    def process_weights_after_loading(self, layer):
        layer.act_scale_fmt = "ue8m0" if _all_powers_of_two(layer.weight_scale) else "float"

    def act_quant(self, layer):
        return ActQuant("fp8_e4m3", layer.block_size[1], layer.act_scale_fmt)

    def _scales_column_major(self, layer, x):
        """Where the GEMM runs on cuBLAS, which reads the activation scales column-major: quantized straight into
        that layout, the GEMM need not transpose them (one more launch per call: 1.34-1.42x -> 1.52-1.57x BF16 on
        four M = 1024 Llama / DeepSeek shapes, H100, kernels/NOTES.md)."""
        from ingot.kernels.fp8_gemm import auto_backend

        return auto_backend(x, layer.weight, layer.block_size, layer.bias, x.dtype) == "cublas"

    def _reference(self, layer, x):
        x_q, x_s = ref.quantize_act_group(x, "fp8_e4m3", layer.block_size[1], layer.act_scale_fmt)
        return self._gemm(layer, x_q, x_s, x.dtype, False)

    def _gemm(self, layer, x_q, x_s, out_dtype, kernels):
        if not kernels:
            return ref.fp8_gemm_block_ref(x_q, x_s, layer.weight, layer.weight_scale, layer.block_size, layer.bias,
                                          out_dtype)
        from ingot.kernels.fp8_gemm import fp8_gemm_block

        return fp8_gemm_block(x_q, x_s, layer.weight, layer.weight_scale, block_size=layer.block_size,
                              bias=layer.bias, out_dtype=out_dtype)


class Int8WeightMethod(Int8ChannelMethod):
    """W8A16: int8 weights, one scale per output channel (stored as int8-channel's), activations stay in the model
    dtype."""

    kind = source_kind = "int8-weight"

    def act_quant(self, layer):
        return None  # W8A16: the activation stays in the model dtype

    def _kernel(self, layer, x):
        if x.dtype not in A16_DTYPES:
            return self._reference(layer, x)
        from ingot.kernels.weight_only import w8a16_gemm

        return w8a16_gemm(x, layer.weight, layer.weight_scale, bias=layer.bias)

    def _reference(self, layer, x):
        return ref.w8a16_gemm_ref(x, layer.weight, layer.weight_scale, bias=layer.bias)


class Int4GroupMethod(LinearMethod):
    """W4A16: symmetric int4 weights in [-8, 7], one scale per row per 128 columns, packed 8 per int32."""

    kind = source_kind = "int4-group"

    def create_weights(self, layer):
        n, k = layer.out_features, layer.in_features
        layer.group_size = DEFAULT_GROUP
        _register(layer, "weight_packed", (n, cdiv(k, 8)), torch.int32, self.device)
        _register(layer, "weight_scale", (n, cdiv(k, DEFAULT_GROUP)), torch.float32, self.device)

    def load(self, layer, stored):
        _check_kind(self, layer, stored)
        if stored.group_size != layer.group_size:
            raise ValueError(f"weight_scale: group size {stored.group_size}, int4-group linears use {layer.group_size}")
        q = stored.qweight
        if q.dtype != torch.int8:
            raise ValueError(f"weight: dtype {q.dtype}, an int4-group linear expects int4 values unpacked into int8")
        lo, hi = int(q.min()), int(q.max())
        if lo < -8 or hi > 7:  # packing keeps 4 bits: anything outside would wrap silently
            raise ValueError(f"weight: values span [{lo}, {hi}], int4 holds [-8, 7]")
        _copy_in(layer, "weight_packed", pack_int32(q, 4))  # on q's device (random_model packs on the GPU)
        _copy_in(layer, "weight_scale", stored.scale.float())

    def dequantize(self, layer):
        q = unpack_int32(layer.weight_packed, 4, layer.in_features)
        scheme = replace(Scheme.from_name("int4-group"), group_size=layer.group_size)
        return ref.dequantize_weight(ref.QuantizedWeight(scheme, q, layer.weight_scale))

    def _kernel(self, layer, x):
        if x.dtype not in A16_DTYPES:
            return self._reference(layer, x)
        from ingot.kernels.weight_only import w4a16_gemm

        return w4a16_gemm(x, layer.weight_packed, layer.weight_scale, layer.in_features,
                          group_size=layer.group_size, bias=layer.bias)

    def _reference(self, layer, x):
        return ref.w4a16_gemm_ref(x, layer.weight_packed, layer.weight_scale, layer.in_features,
                                  group_size=layer.group_size, bias=layer.bias)


class Fp8FallbackMethod(LinearMethod):
    """An fp8-block linear on a device without FP8: loads FP8 and runs as int8-block or bf16 (``kind``).

    int8-block: each 128x128 FP8 block is dequantized and re-quantized to int8 (``ingot.quant.fast.requantize``,
    bit-identical to the reference, in cache-sized slabs); the same block grid, so one int8 scale per FP8 scale.
    bf16: dequantized into the model dtype. One linear's float32 copy exists at a time, never the model's.
    """

    source_kind = "fp8-block"

    def __init__(self, device: torch.device | str, fallback: str = "int8-block"):
        super().__init__(device)
        if fallback not in FP8_FALLBACKS:
            raise ValueError(f"fp8_fallback {fallback!r}: expected one of {', '.join(FP8_FALLBACKS)}")
        self.kind = fallback
        self.inner: LinearMethod = Int8BlockMethod(device) if fallback == "int8-block" else Bf16Method(device)

    @property
    def use_kernels(self) -> bool | None:
        return self.inner.use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool | None) -> None:
        if hasattr(self, "inner"):
            self.inner.use_kernels = value

    def create_weights(self, layer):
        self.inner.create_weights(layer)

    def load(self, layer, stored):
        _check_kind(self, layer, stored)
        block = tuple(stored.block_size)
        q, s = stored.qweight.to(self.device), stored.scale.float().to(self.device)
        if q.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight: dtype {q.dtype}, an fp8-block linear expects torch.float8_e4m3fn")
        if self.kind == "int8-block":
            scheme = replace(Scheme.from_name("int8-block"), block_size=block, act_group_size=block[1])
            result = fast.requantize(q, s, block, scheme)
            qw, _ = result if result is not None else fast.requantize_ref(q, s, block, scheme)
            self.inner.load(layer, StoredLinear("int8-block", qw.qweight, qw.scale, block_size=block))
        else:
            scheme = replace(Scheme.from_name("fp8-block"), block_size=block)
            w = ref.dequantize_weight(ref.QuantizedWeight(scheme, q, s), layer.params_dtype)
            self.inner.load(layer, StoredLinear("bf16", w, None))

    def process_weights_after_loading(self, layer):
        self.inner.process_weights_after_loading(layer)

    def dequantize(self, layer):
        return self.inner.dequantize(layer)

    def act_quant(self, layer):
        return self.inner.act_quant(layer)

    def input_quant(self, layer, x):
        return self.inner.input_quant(layer, x)

    def takes_row_maxima(self, layer, x):
        return self.inner.takes_row_maxima(layer, x)

    def apply(self, layer, x):
        return self.inner.apply(layer, x)


# ------------------------------------------------------------------------------------------------ registry

METHODS: dict[str, type[LinearMethod]] = {
    "bf16": Bf16Method,
    "fp8-block": Fp8BlockMethod,
    "int8-block": Int8BlockMethod,
    "int8-channel": Int8ChannelMethod,
    "int8-weight": Int8WeightMethod,
    "int4-group": Int4GroupMethod,
}
assert tuple(METHODS) == KINDS, "one method per stored kind"


def cuda_device_info(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a CUDA device."""
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why ``device`` cannot run fp8-block GEMMs (None: it can)."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    name, capability = cuda_device_info(device)
    if capability < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        return f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor cores (needs {need}+)"
    return None


@functools.lru_cache(maxsize=None)
def _warn_fp8_fallback(reason: str, fallback: str) -> None:
    """Once per process (per reason and fallback): a model has hundreds of fp8 linears, one line says it all."""
    how = "re-quantized to int8-block at load" if fallback == "int8-block" else "dequantized to the model dtype at load"
    logger.warning("fp8-block linears run as %s: %s; their FP8 weights are %s (fp8_fallback=%r)",
                   fallback, reason, how, fallback)


def linear_method(kind: str, device: torch.device | str, *, fp8_fallback: str = "int8-block") -> LinearMethod:
    """The method of a ``kind`` linear on ``device``. On CPU and on GPUs below compute capability 8.9, "fp8-block"
    gives ``Fp8FallbackMethod(device, fp8_fallback)`` ("int8-block" or "bf16"), with one warning per process."""
    if kind not in METHODS:
        raise ValueError(f"unknown linear kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if fp8_fallback not in FP8_FALLBACKS:
        raise ValueError(f"fp8_fallback {fp8_fallback!r}: expected one of {', '.join(FP8_FALLBACKS)}")
    device = torch.device(device)
    if kind == "fp8-block":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            _warn_fp8_fallback(reason, fp8_fallback)
            return Fp8FallbackMethod(device, fp8_fallback)
    return METHODS[kind](device)


def dequantized_weight(layer: "Linear", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a loaded Linear of any kind multiplies by, W = q * scale, as ``dtype`` [N, K] on its device.

    For load-time transforms that need the plain matrix (MLA absorbs kv_b_proj into the query and output): one
    linear's float32 copy, made once, never on the forward path.
    """
    return layer.method.dequantize(layer).to(dtype)


# ------------------------------------------------------------------------------------------------ module


class Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as ``kind`` (one of ingot.formats.base.KINDS).

    in_features K, out_features N; bias [N] in ``dtype`` (the model dtype), added in the GEMM epilogue.
    Parameters are allocated (torch.empty) on ``device`` (default: torch's default device) and filled by
    ``load(StoredLinear)`` + ``process_weights_after_loading()``, or, for bf16, by ``load_state_dict``.
    The method is chosen for ``device`` when the layer is built (fp8 fallback included).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        kind: str = "bf16",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        fp8_fallback: str = "int8-block",
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear({in_features}, {out_features}): features must be >= 1")
        if not dtype.is_floating_point:
            raise ValueError(f"Linear dtype must be a float dtype (the model's), got {dtype}")
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.in_features, self.out_features, self.params_dtype = in_features, out_features, dtype
        self.method = linear_method(kind, device, fp8_fallback=fp8_fallback)
        self.method.create_weights(self)
        if bias:
            _register(self, "bias", (out_features,), dtype, device)
        else:
            self.register_parameter("bias", None)

    @property
    def kind(self) -> str:
        """The kind this layer computes as (``self.method.source_kind`` is the kind it loads)."""
        return self.method.kind

    def load(self, stored: StoredLinear) -> None:
        """Copy one decoded linear in (``method.load``). Call ``process_weights_after_loading`` when done."""
        self.method.load(self, stored)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def input_quant(self, x: torch.Tensor) -> ActQuant | None:
        """The quantization this layer would give ``x`` before its GEMM (None: it multiplies x as it is, or runs the
        reference math for x's device). A producer that can emit exactly that (``RMSNorm``, ``MLP``'s silu * up,
        on their kernel paths) passes a ``QuantizedActivation`` instead and saves the quantization launch."""
        return self.method.input_quant(self, x)

    def takes_row_maxima(self, x: torch.Tensor) -> bool:
        """Whether this layer quantizes an input shaped like ``x`` inside its GEMM from a ``RowMaxActivation``'s
        maxima (int8-channel, one row, kernel path): what the decode attention asks before handing one."""
        return self.method.takes_row_maxima(self, x)

    def forward(self, x: torch.Tensor | QuantizedActivation | RowMaxActivation) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        loads = "" if self.method.source_kind == self.kind else f" (loads {self.method.source_kind})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind}{loads}")


# ------------------------------------------------------------------------------------------------ fusion


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear whose output is the concatenation of ``parts``' outputs on the same input: q/k/v -> qkv and
    gate/up -> gate_up, as vLLM's QKVParallelLinear / MergedColumnParallelLinear, but built *after* loading from the
    loaded parameters (checkpoints and the loader keep the per-projection names). Every parameter of every kind is
    per output row (weight, weight_packed, per-channel / per-group / per-block-row scales, bias), so the fused one is
    their concatenation along N: one activation quantization and one GEMM launch instead of one per part, and a
    wider N for the kernels. The parts' memory is copied once (one layer at a time); the caller drops them.

    None when the parts cannot share a launch: different kinds, inputs, dtypes, devices, bias presence, block or
    group sizes, activation scale formats (fp8 ue8m0), or a block kind whose parts do not each end on a block row
    (the block scales of a part with N % 128 != 0 would straddle the next part's rows).
    """
    if len(parts) < 2:
        return None
    first = parts[0]
    params = [name for name, _ in first.named_parameters(recurse=False)]
    for p in parts:
        if (p.kind != first.kind or type(p.method) is not type(first.method) or p.in_features != first.in_features
                or p.params_dtype != first.params_dtype or (p.bias is None) != (first.bias is None)
                or [n for n, _ in p.named_parameters(recurse=False)] != params):
            return None
        if any(getattr(p, a, None) != getattr(first, a, None) for a in ("block_size", "group_size", "act_scale_fmt")):
            return None
    device = next(first.parameters()).device
    if any(t.device != device for p in parts for t in p.parameters(recurse=False)):
        return None
    if first.kind in ("int8-block", "fp8-block") and any(p.out_features % first.block_size[0] for p in parts[:-1]):
        return None
    fallback = first.kind if isinstance(first.method, Fp8FallbackMethod) else "int8-block"
    fused = Linear(first.in_features, sum(p.out_features for p in parts), first.bias is not None,
                   kind=first.method.source_kind, device=device, dtype=first.params_dtype, fp8_fallback=fallback)
    with torch.no_grad():
        for name in params:
            torch.cat([getattr(p, name) for p in parts], dim=0, out=getattr(fused, name).data)
    for attr in ("block_size", "group_size", "act_scale_fmt"):
        if hasattr(first, attr):
            setattr(fused, attr, getattr(first, attr))
    fused.method.use_kernels = first.method.use_kernels
    return fused
