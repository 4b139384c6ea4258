"""Kernels launched by a decode step (what the CUDA graph holds) and by a prefill step of 64 prompts, for a 32-layer
Llama (tiny widths, bf16), with the CUDA dispatch emulated on CPU: aten ops that launch a kernel (views, same-dtype
casts and the interpreter's own tensor traffic excluded) + Triton launches (run by the interpreter).

Usage: python benchmarks/scripts/decode_kernel_count.py before|after [--scheme int8-channel] [--unfused] [--no-prefill]
(``before``: the torch paths, Triton only for decode attention, as the CUDA graph held before the kernels of
ingot.kernels.norm_rope / kv_store; run it with PYTHONPATH pointing at an older tree's src). ``--scheme``: the
linears' kind (random weights; W8A8 kinds run their Triton quant + GEMM kernels, interpreted, counted by name).
``--unfused``: the engine's fused norm / residual-add / activation-quant forms off (``CausalLM.set_fused_ops``).
bf16 linears count one launch (F.linear)."""
import os, sys, collections
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "kernels"))
import conftest  # noqa: E402  (the interpreter's index fix)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from ingot.engine import LLM, SamplingParams
from ingot.models.loader import random_model
import ingot.layers.attention as A, ingot.layers.norm as N, ingot.models.llama as L
from ingot.layers.linear import Linear
from ingot.kernels.attention import paged_decode_attention

args = sys.argv[1:]
SCHEME = args[args.index("--scheme") + 1] if "--scheme" in args else "bf16"
CFG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
VIEWS = {"aten.view.default", "aten.t.default", "aten._unsafe_view.default", "aten.unsqueeze.default", "aten.slice.Tensor",
         "aten.expand.default", "aten.split.Tensor", "aten.split_with_sizes.default", "aten.select.int", "aten.transpose.int",
         "aten.detach.default", "aten.alias.default", "aten.reshape.default", "aten.unflatten.int", "aten.squeeze.dim",
         "aten.permute.default", "aten.as_strided.default", "aten.chunk.default", "aten.unbind.int", "aten.flatten.using_ints",
         "aten.empty.memory_format", "aten.empty_strided.default", "aten.lift_fresh.default", "aten.is_same_size.default"}

IN_TRITON = [False]
class Count(TorchDispatchMode):
    def __init__(self): super().__init__(); self.c = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if IN_TRITON[0]: return out  # the interpreter's own tensor traffic
        name = str(func)
        if name in VIEWS: return out
        if name in ("aten.to.dtype", "aten._to_copy.default") and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor) and out.data_ptr() == args[0].data_ptr():
            return out
        self.c[name] += 1
        return out

launches = collections.Counter()
def count_launches(kernel, name):
    orig = kernel.__getitem__
    class W:
        def __getitem__(self, grid):
            f = orig(grid)
            def run(*a, **k):
                launches[name] += 1
                IN_TRITON[0] = True
                try:
                    return f(*a, **k)
                finally:
                    IN_TRITON[0] = False
            return run
    return W()

def count_all_kernels():
    """Every ``_*_kernel`` of ingot.kernels, counted under its name without the leading underscore."""
    import importlib, pkgutil, ingot.kernels as K
    for info in pkgutil.iter_modules(K.__path__):
        module = importlib.import_module(f"ingot.kernels.{info.name}")
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                setattr(module, name, count_launches(getattr(module, name), name[1:-len("_kernel")]))

def emulate_cuda():
    from ingot.kernels import norm_rope, kv_store
    count_all_kernels()
    if not hasattr(N.RMSNorm(8), "use_kernels"):  # an older tree: its CUDA branch, forced
        N.RMSNorm.forward = lambda self, x: norm_rope.rms_norm(x, self.weight, self.eps)
    L.apply_rotary = lambda x, c, s, interleaved=False: norm_rope.rotary(x, c, s, interleaved)
    A.apply_rotary = L.apply_rotary
    A.store_kv = lambda k, v, kc, vc, sm: kv_store.store_kv_cache(k, v, kc, vc, sm)
    if hasattr(A, "_fused_rope_store"):  # the layer's rope + cache write in one launch (its CUDA branch, forced)
        A._fused_rope_store = lambda q, k, v, cos: v is not None and q.dtype == torch.bfloat16 and q.dim() == 3
    orig_pa = A.paged_attention
    def pa(q, kc, vc, meta, scale, dv, window=None, *rest):
        if meta.max_query_len == 1:
            return paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, scale, dv)
        return orig_pa(q, kc, vc, meta, scale, dv, window, *rest)
    A.paged_attention = pa

def force_kernels(model):  # what runs on CUDA inputs: norms, silu * up and W8A8 linears on their kernel paths
    for m in model.modules():
        if isinstance(m, Linear):
            m.method.use_kernels = True
        elif hasattr(m, "use_kernels"):
            m.use_kernels = True

def attention_only_kernels():  # the old code's CUDA decode: torch everywhere except the Triton attention
    from ingot.kernels import attention as KA
    KA._decode_partial_kernel = count_launches(KA._decode_partial_kernel, "attn_partial")
    KA._decode_combine_kernel = count_launches(KA._decode_combine_kernel, "attn_combine")
    orig_pa = A.paged_attention
    def pa(q, kc, vc, meta, scale, dv, window=None, *rest):
        if meta.max_query_len == 1:
            return paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, scale, dv)
        return orig_pa(q, kc, vc, meta, scale, dv, window, *rest)
    A.paged_attention = pa

mode = args[0]
(emulate_cuda if mode == "after" else attention_only_kernels)()
model = random_model(CFG, SCHEME, "cpu", dtype=torch.bfloat16)
llm = LLM.from_model(model, max_num_seqs=1, max_model_len=64, block_size=16)
if mode == "after":
    force_kernels(model)
if "--unfused" in args:
    model.set_fused_ops(False)
mode = f"{mode} {SCHEME}{' unfused' if '--unfused' in args else ''}"
prompts = [[1, 2, 3, 4, 5]]
llm._add(0, prompts[0], SamplingParams(max_tokens=3))
out = llm.scheduler.schedule(); llm.runner.execute(out); llm.scheduler.update(out, [7])
dec = llm.scheduler.schedule()
assert dec.is_decode
from ingot.engine import runner as R
with torch.inference_mode():
    if hasattr(R, "DecodeBuffers"):
        buf = llm.runner.decode; buf.fill(dec.scheduled, 1)
        launches.clear(); m = Count()
        with m: model.forward(buf.input_ids[:1], buf.positions[:1], buf.meta(1))
    else:
        g = R._DecodeGraphs(model, R.RunnerConfig(1, 64), 16, torch.device("cpu")); g.fill(dec)
        launches.clear(); m = Count()
        with m: g._run(1)
aten = sum(m.c.values()); tri = sum(launches.values())
print(f"{mode}: decode forward of 32 layers (graph contents): {aten} torch kernels + {tri} Triton launches = {aten + tri}"
      f" ({(aten + tri) / 32:.1f} per layer)")
print("   triton:", dict(launches)); print("   torch :", dict(m.c.most_common()))

# a prefill step of 64 prompts x 16 tokens (all fresh, one step), and a mixed step (32 decodes + 32 prompts)
for label, nq in () if "--no-prefill" in args else (("prefill 64 prompts", 64),):
    llm2 = LLM.from_model(model, max_num_seqs=64, max_model_len=64, block_size=16, max_num_batched_tokens=4096)
    for i in range(nq):
        llm2._add(i, list(range(1 + i % 7, 17 + i % 7)), SamplingParams(max_tokens=3))
    out = llm2.scheduler.schedule()
    launches.clear(); m = Count()
    with torch.inference_mode(), m:
        llm2.runner.execute(out)
    aten = sum(m.c.values()); tri = sum(launches.values())
    print(f"{mode}: {label} ({out.num_tokens} tokens, 32 layers): {aten} torch kernels + {tri} Triton = {aten + tri}"
          f" ({(aten + tri) / 32:.0f} per layer)")
