"""RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)), the normalization of every model ingot runs.

The statistics are taken in float32 whatever the input dtype (a bf16 mean of squares over 7168 channels would carry
~3 significant digits); the normalized value is cast back to the input dtype *before* the weight multiply, exactly as
transformers' LlamaRMSNorm / DeepseekV3RMSNorm / Qwen3RMSNorm do, so BF16 outputs are bit-identical to theirs.
On CUDA, bf16/fp16 inputs take one Triton kernel (ingot.kernels.norm_rope.rms_norm: the same steps, its float32 sum
in another order, so within one bf16 ulp of this code) instead of eight launches.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension.

    dim:    normalized size (hidden_size; head_dim for Qwen3's per-head q/k norms; kv_lora_rank for MLA's latent).
    weight: [dim] in ``dtype``, allocated empty: the checkpoint fills it.
    forward(x [..., dim]) -> [..., dim] in x.dtype (promoted with the weight's dtype, as transformers does).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if dim <= 0 or not eps > 0:
            raise ValueError(f"RMSNorm: dim must be positive and eps > 0, got dim={dim}, eps={eps}")
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
            from ingot.kernels.norm_rope import rms_norm  # one launch instead of 8 (a decode graph runs 65 norms)

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
