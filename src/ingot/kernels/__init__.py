"""Triton kernels: the only package of ingot that imports triton. One module per op family.

Every op is a pair: a ``_op_kernel`` (explicit strides, ``tl.constexpr`` tiles, fp32 math) and a public ``op()``
wrapper that checks shapes, dtypes, contiguity and the ties between tile and quantization block, allocates, and
launches. Ops take tensors on CUDA, or on any device when triton runs its interpreter (``TRITON_INTERPRET=1`` set
before the kernel modules are imported: that is how CPU CI runs them on small shapes). Each op has a plain-PyTorch
reference with the same math in ``ingot.quant.ref``.

Modules: ``act_quant`` (dynamic activation quantization), ``int8_gemm`` (W8A8 int8 GEMMs), ``weight_only`` (W8A16
and W4A16 GEMMs for decode), ``dequant`` (block dequantization of fp8-block / int8-block weights), ``norm_rope``
(RMSNorm - also with the residual add and the output's quantization fused - and rotary), ``silu_mul`` (the gated
MLP's silu(gate) * up, optionally quantized for down_proj), ``l2_prefetch`` (pull a weight's first bytes into L2 on
sm_90+, for the engine's decode step), ``dense_gemv`` (a bf16/fp16 weight times one token: the lm_head at batch 1).
"""
