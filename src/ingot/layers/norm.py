"""RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)), the normalization of every model ingot runs.

The statistics are taken in float32 whatever the input dtype (a bf16 mean of squares over 7168 channels would carry
~3 significant digits); the normalized value is cast back to the input dtype *before* the weight multiply, exactly as
transformers' LlamaRMSNorm / DeepseekV3RMSNorm / Qwen3RMSNorm do, so BF16 outputs are bit-identical to theirs.
On CUDA, bf16/fp16 inputs take one Triton kernel (ingot.kernels.norm_rope.rms_norm: the same steps, its float32 sum
in another order, so within one bf16 ulp of this code) instead of eight launches.

The decoder's fused forms (``DecoderLayer`` with ``fused_ops``), one launch each on the kernel path:
- ``add_forward(x, residual)``: the residual add of the previous sub-layer and this norm (``fused_add_rms_norm``).
- ``quant=``: the normed output quantized for the linear(s) that read it (``rms_norm_quant``), returned as a
  ``QuantizedActivation`` that those linears take in place of the tensor; bit-identical to their own quantization.
Elsewhere (CPU, float32, or no quantizing consumer) they run the same math as separate steps: ``x + residual`` in
the model dtype, then ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from ingot.layers.linear import ActQuant, QuantizedActivation

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension.

    dim:    normalized size (hidden_size; head_dim for Qwen3's per-head q/k norms; kv_lora_rank for MLA's latent).
    weight: [dim] in ``dtype``, allocated empty: the checkpoint fills it.
    forward(x [..., dim]) -> [..., dim] in x.dtype (promoted with the weight's dtype, as transformers does).
    use_kernels: None (default) runs the Triton kernels for CUDA inputs; True forces them (Triton's interpreter on
    CPU, as the tests do), False the torch code. Only bf16/fp16 inputs of the weight's dtype take them.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if dim <= 0 or not eps > 0:
            raise ValueError(f"RMSNorm: dim must be positive and eps > 0, got dim={dim}, eps={eps}")
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)
        self.use_kernels: bool | None = None

    def _kernels(self, x: torch.Tensor) -> bool:
        want = x.is_cuda if self.use_kernels is None else self.use_kernels
        return want and x.dtype == self.weight.dtype and x.dtype in KERNEL_DTYPES

    def forward(self, x: torch.Tensor, quant: ActQuant | None = None) -> torch.Tensor | QuantizedActivation:
        """x [..., dim] -> the normed [..., dim] in x.dtype; with ``quant`` (a consumer's ``Linear.input_quant``) and
        on the kernel path, that output quantized in the same launch, as a QuantizedActivation."""
        if not self._kernels(x):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(x.dtype)
        from ingot.kernels import norm_rope  # one launch instead of 8 (a decode graph runs 65 norms)

        if quant is None:
            return norm_rope.rms_norm(x, self.weight, self.eps)
        x_q, x_s, _ = norm_rope.rms_norm_quant(x, self.weight, self.eps, quant.dtype, quant.group_size, quant.scale_fmt)
        return QuantizedActivation(x_q, x_s, quant, x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, quant: ActQuant | None = None
    ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """(forward(x + residual, quant), x + residual): a pre-norm residual step, the sum rounded once to the model
        dtype as torch's ``x + residual``; one launch on the kernel path. residual None: (forward(x, quant), x)."""
        if residual is None:
            return self(x, quant), x
        if not self._kernels(x) or residual.dtype != x.dtype:
            h = x + residual
            return self(h, quant), h
        from ingot.kernels import norm_rope

        if quant is None:
            return norm_rope.fused_add_rms_norm(x, residual, self.weight, self.eps)
        x_q, x_s, h = norm_rope.rms_norm_quant(x, self.weight, self.eps, quant.dtype, quant.group_size,
                                               quant.scale_fmt, residual=residual)
        return QuantizedActivation(x_q, x_s, quant, x.dtype), h

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
