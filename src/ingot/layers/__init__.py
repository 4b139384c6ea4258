"""Runtime nn.Modules: linear (one Linear + a LinearMethod per scheme), norm, rotary, attention (paged KV cache),
moe (gated MLP and DeepSeek-V3 routed experts). Models in ``ingot.models`` are assembled from these."""
