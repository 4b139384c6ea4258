"""FP8 block GEMM (fp8-block scheme, DeepSeek-V3/R1's native format): e4m3 activations quantized per token per
128-group, e4m3 weights with one scale per 128x128 block, fp32 accumulation with per-block promotion.

The kernel is the block-scaled GEMM of ``ingot.kernels.int8_gemm`` with float8 operands (``FP8=True``: an fp32
tensor-core dot per K block instead of an int32 one); the tile configs are tuned separately ("fp8_gemm_block").
ue8m0 scales (DeepSeek-V3.1) are ordinary fp32 powers of two here: the math is the same.

FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper) on. ``fp8_supported`` says whether a device has
them; callers (ingot.layers.linear) fall back to int8-block or bf16 where it is False, and never call this op.
Reference: ``ingot.quant.ref.fp8_gemm_block_ref``.
"""

from __future__ import annotations

import torch

from ingot.kernels.int8_gemm import INTERPRETED, block_gemm
from ingot.kernels.tuning import GemmConfig

MIN_CAPABILITY = (8, 9)


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
) -> torch.Tensor:
    """Per-token-per-group x block FP8 GEMM: y [M, N] = sum over K blocks kb of
    (x_q[:, kb] @ w_q[:, kb].T) * x_s[:, kb] * w_s[n // bn, kb] (+ bias).

    x_q float8_e4m3fn [M, K], x_s float32 [M, cdiv(K, bk)], w_q float8_e4m3fn [N, K], w_s float32
    [cdiv(N, bn), cdiv(K, bk)] (hf-fp8's ``weight_scale_inv``: the dequantization multiplier), block_size (bn, bk),
    bias [N] or None. Returns y [M, N] in ``out_dtype``. Needs ``fp8_supported(device)``: on older GPUs it raises
    with the device's capability instead of failing inside the compiler.
    """
    if not INTERPRETED and isinstance(x_q, torch.Tensor) and x_q.device.type == "cuda" and not fp8_supported(x_q.device):
        cap = torch.cuda.get_device_capability(x_q.device)
        raise RuntimeError(
            f"fp8_gemm_block needs FP8 tensor cores (compute capability >= 8.9); {torch.cuda.get_device_name(x_q.device)} "
            f"has {cap[0]}.{cap[1]}: quantize fp8-block linears to int8-block or bf16 at load instead"
        )
    return block_gemm("fp8_gemm_block", x_q, x_s, w_q, w_s, block_size, bias, out_dtype, config, out)
