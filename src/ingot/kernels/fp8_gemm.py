"""FP8 block GEMM (fp8-block scheme, DeepSeek-V3/R1's native format): e4m3 activations quantized per token per
128-group, e4m3 weights with one scale per 128x128 block, fp32 accumulation with per-block promotion.

The kernel is the block-scaled GEMM of ``ingot.kernels.int8_gemm`` with float8 operands (``FP8=True``: an fp32
tensor-core dot per K block instead of an int32 one); the tile configs are tuned separately ("fp8_gemm_block").
ue8m0 scales (DeepSeek-V3.1) are ordinary fp32 powers of two here: the math is the same.

FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper) on. ``fp8_supported`` says whether a device has
them; callers (ingot.layers.linear) fall back to int8-block or bf16 where it is False, and never call this op.
Reference: ``ingot.quant.ref.fp8_gemm_block_ref``.

Two backends. At M >= ``CUBLAS_MIN_M`` on sm_90, cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm`` with 1x128
activation and 128x128 weight scales; measured with torch 2.11 + CUDA 13) where it applies: the Triton kernel's
per-block promotion makes every MMA wait for the previous block's scaling (kernels/NOTES.md), and on the H200 it ran
0.85-1.06x BF16 at M >= 1024 where cuBLAS ran 1.15-1.64x; cuBLAS was also ahead at M = 128 on 8 of 9 model shapes,
behind at M = 16 on 8 of 9. Elsewhere (decode sizes, other GPUs, ragged N or K, a bias, fp16/fp32 outputs, a caller's
tile config) the Triton kernel. The two differ by accumulation order and rounding only (relative 1.7e-3 in that
probe, the size of the bf16 output rounding).
"""

from __future__ import annotations

import torch

from ingot.kernels.checks import backend_failed, cdiv
from ingot.kernels.int8_gemm import INTERPRETED, check_block_operands, launch_block_gemm
from ingot.kernels.tuning import GemmConfig

MIN_CAPABILITY = (8, 9)
CUBLAS_MIN_M = 65  # above the decode sizes (M <= 64), where the Triton kernel's split-K tiles win
BACKENDS = ("auto", "triton", "cublas")
_cublas_failed: dict[torch.device, str] = {}  # device -> why cuBLAS raised on it (then "auto" stays on Triton)


def cublas_block_unsupported(x_q: torch.Tensor, w_q: torch.Tensor, block_size: tuple[int, int],
                             bias: torch.Tensor | None, out_dtype: torch.dtype) -> str | None:
    """Why cuBLAS's block-scaled FP8 GEMM cannot run this call, or None when it can."""
    if INTERPRETED or x_q.device.type != "cuda":
        return "needs a CUDA device"
    cap = torch.cuda.get_device_capability(x_q.device)
    if cap != (9, 0):
        return f"cuBLAS's 1x128 x 128x128 block-scaled FP8 GEMM is sm_90 only, this device is sm_{cap[0]}{cap[1]}"
    if tuple(block_size) != (128, 128):
        return f"needs 128x128 weight blocks, got {tuple(block_size)}"
    n, k = w_q.shape
    if n % 128 or k % 128:
        return f"needs N and K multiples of 128, got N = {n}, K = {k}"
    if bias is not None:
        return "takes no bias"
    if out_dtype != torch.bfloat16:
        return f"writes bf16 only, asked for {out_dtype}"
    if x_q.device in _cublas_failed:
        return f"raised on this device before: {_cublas_failed[x_q.device]}"
    return None


def auto_backend(x_q: torch.Tensor, w_q: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 config: GemmConfig | None = None) -> str:
    """The backend ``fp8_gemm_block(backend="auto")`` runs for these operands: "cublas" or "triton"."""
    if config is None and x_q.shape[0] >= CUBLAS_MIN_M and cublas_block_unsupported(x_q, w_q, block_size, bias,
                                                                                     out_dtype) is None:
        return "cublas"
    return "triton"


def _cublas_block_gemm(x_q, x_s, w_q, w_s, out):
    """y = x_q @ w_q.T with 1x128 x 128x128 scales on cuBLAS: activation scales outer-dim-major (a [K / 128, M]
    buffer seen as [M, K / 128]; torch takes no other stride), weight scales as their [K / 128, N / 128] transpose
    view. cuBLAS refuses M % 4 != 0 (CUBLAS_STATUS_NOT_SUPPORTED on the H100: the scale buffer's rows must be 16-byte
    aligned, and torch refuses a padded leading dimension), so such M run on rows padded with zeros to a multiple of
    4 (x_q copied, the output's pad rows dropped)."""
    m, k = x_q.shape
    m4 = cdiv(m, 4) * 4
    if m4 != m:
        x_pad = torch.zeros((m4, k), dtype=x_q.dtype, device=x_q.device)
        x_pad[:m] = x_q
        s_pad = torch.zeros((x_s.shape[1], m4), dtype=torch.float32, device=x_s.device)
        s_pad[:, :m] = x_s.t()
        x_q, x_s = x_pad, s_pad.t()
    elif x_s.stride(0) != 1:
        x_s = x_s.t().contiguous().t()
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s.t(), out_dtype=torch.bfloat16,
                         out=out if m4 == m else None)
    if m4 == m:
        return y
    return y[:m] if out is None else out.copy_(y[:m])


def fp8_supported(device: torch.device | str) -> bool:
    """True where ``fp8_gemm_block`` runs: a CUDA device of compute capability >= 8.9, or triton's interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETED
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def fp8_gemm_block(
    x_q: torch.Tensor,
    x_s: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token-per-group x block FP8 GEMM: y [M, N] = sum over K blocks kb of
    (x_q[:, kb] @ w_q[:, kb].T) * x_s[:, kb] * w_s[n // bn, kb] (+ bias).

    x_q float8_e4m3fn [M, K], x_s float32 [M, cdiv(K, bk)], w_q float8_e4m3fn [N, K], w_s float32
    [cdiv(N, bn), cdiv(K, bk)] (hf-fp8's ``weight_scale_inv``: the dequantization multiplier), block_size (bn, bk),
    bias [N] or None. Returns y [M, N] in ``out_dtype``. Needs ``fp8_supported(device)``: on older GPUs it raises
    with the device's capability instead of failing inside the compiler.

    ``backend``: "auto" (cuBLAS at M >= CUBLAS_MIN_M where ``cublas_block_unsupported`` is None and no ``config``
    is given, else Triton; a cuBLAS error is logged once and that device stays on Triton), "triton", or "cublas"
    (raises where it does not apply).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not INTERPRETED and isinstance(x_q, torch.Tensor) and x_q.device.type == "cuda" and not fp8_supported(x_q.device):
        cap = torch.cuda.get_device_capability(x_q.device)
        raise RuntimeError(
            f"fp8_gemm_block needs FP8 tensor cores (compute capability >= 8.9); {torch.cuda.get_device_name(x_q.device)} "
            f"has {cap[0]}.{cap[1]}: quantize fp8-block linears to int8-block or bf16 at load instead"
        )
    m, n, k = check_block_operands("fp8_gemm_block", x_q, x_s, w_q, w_s, block_size, bias, out_dtype, out)
    if backend == "cublas":
        why_not = cublas_block_unsupported(x_q, w_q, block_size, bias, out_dtype)
        if why_not:
            raise ValueError(f"fp8_gemm_block backend 'cublas': {why_not}")
        return _cublas_block_gemm(x_q, x_s, w_q, w_s, out)
    if backend == "auto" and auto_backend(x_q, w_q, block_size, bias, out_dtype, config) == "cublas":
        try:
            return _cublas_block_gemm(x_q, x_s, w_q, w_s, out)
        except RuntimeError as e:  # an older cuBLAS / torch without block scaling: Triton from now on
            backend_failed(_cublas_failed, x_q.device, "fp8_gemm_block: cuBLAS block-scaled FP8 unavailable", e)
    return launch_block_gemm("fp8_gemm_block", (m, n, k), x_q, x_s, w_q, w_s, block_size, bias, out_dtype, config,
                             out)
