"""The GEMM and GEMV kernels compile for a Hopper GPU (sm_90), checked on any machine: the CPU tests run the kernels in
triton's interpreter, which executes Python and so never meets the code generator. A kernel can pass every
interpreter test and still abort the GPU compile (a dot of fp8 operands into int32, emitted after a constexpr
branch's return, did). Each variant is compiled in a fresh interpreter-free subprocess with triton's own ptxas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# kernel, argument types by position (pointers then ints), constexprs
_CHANNEL_ARGS = ["*i8", "*fp32", "*i8", "*fp32", "*fp32", "*bf16", "*i32", "*i32"] + ["i32"] * 11
_BLOCK_ARGS = ["*{q}", "*fp32", "*{q}", "*fp32", "*fp32", "*bf16", "*fp32", "*i32"] + ["i32"] * 13
_TILES = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}
VARIANTS = {
    "channel": ("_int8_gemm_channel_kernel", _CHANNEL_ARGS,
                {"HAS_BIAS": False, "EVEN_K": True, **_TILES, "SPLIT_K": 1}),
    "channel split ragged": ("_int8_gemm_channel_kernel", _CHANNEL_ARGS,
                             {"HAS_BIAS": True, "EVEN_K": False, **_TILES, "BLOCK_M": 16, "SPLIT_K": 3}),
}
for q, fp8 in (("i8", False), ("fp8e4nv", True)):
    for split, even, per_column in ((1, True, False), (4, False, True)):
        VARIANTS[f"block {q} split {split}"] = (
            "_block_gemm_kernel", [a.format(q=q) for a in _BLOCK_ARGS],
            {"SCALE_N": 128, "WS_PER_COLUMN": per_column, "HAS_BIAS": not even, "EVEN_K": even, "FP8": fp8,
             **_TILES, "BLOCK_N": 256 if per_column else 128, "SPLIT_K": split})

# the weight-only GEMVs (M = 1), plain and with their K loop's loads pipelined by tl.range
_GEMV = {"HAS_BIAS": False, "EVEN_K": True, "SPLIT_K": 2, "UPCAST_DOT": False, "BLOCK_M": 1, "BLOCK_N": 32,
         "BLOCK_K": 128, "GROUP_M": 1}
# (pointers: x, w, w_s, bias, y, split-K partials, split-K tile counters)
for stages in (1, 3):
    VARIANTS[f"w8a16 gemv stages {stages}"] = (
        "weight_only._w8a16_gemv_kernel", ["*bf16", "*i8", "*fp32", "*fp32", "*bf16", "*fp32", "*i32"] + ["i32"] * 11,
        {**_GEMV, "LOOP_STAGES": stages})
    VARIANTS[f"w4a16 gemv stages {stages}"] = (
        "weight_only._w4a16_gemv_kernel", ["*bf16", "*i32", "*fp32", "*fp32", "*bf16", "*fp32", "*i32"] + ["i32"] * 13,
        {"GROUP_SIZE": 128, **_GEMV, "LOOP_STAGES": stages})
# the W4A16 GEMV's K steps of 4 whole groups (the H100 tables' pick)
VARIANTS["w4a16 gemv whole groups"] = (
    "weight_only._w4a16_gemv_kernel", ["*bf16", "*i32", "*fp32", "*fp32", "*bf16", "*fp32", "*i32"] + ["i32"] * 13,
    {"GROUP_SIZE": 128, **_GEMV, "BLOCK_N": 16, "BLOCK_K": 512, "LOOP_STAGES": 3})

# the W8A8 GEMVs (M = 1: dp4a inline PTX on int32 words), plain and pipelined, channel and block
for stages in (1, 3):
    for split, even in ((1, True), (4, False)):
        _W8A8_GEMV = {"HAS_BIAS": not even, "EVEN_K": even, "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1,
                      "SPLIT_K": split, "DP4A": True, "LOOP_STAGES": stages}
        VARIANTS[f"int8 channel gemv split {split} stages {stages}"] = (
            "_int8_gemv_channel_kernel", ["*i32", "*fp32", "*i32", "*fp32", "*fp32", "*bf16", "*i32", "*i32"]
            + ["i32"] * 8, {**_W8A8_GEMV, "QUANT_X": False, "BLOCK_C": 2, "COMPILED": True})
        # and quantizing its bf16 input itself from the row's maxima (int8_gemm_channel_rowmax)
        VARIANTS[f"int8 channel gemv quantizing x split {split} stages {stages}"] = (
            "_int8_gemv_channel_kernel", ["*bf16", "*fp32", "*i32", "*fp32", "*fp32", "*bf16", "*i32", "*i32"]
            + ["i32"] * 8, {**_W8A8_GEMV, "BLOCK_K": 1024, "QUANT_X": True, "BLOCK_C": 16, "COMPILED": True})
        VARIANTS[f"int8 block gemv split {split} stages {stages}"] = (
            "_int8_gemv_block_kernel", ["*i32", "*fp32", "*i32", "*fp32", "*fp32", "*bf16", "*fp32", "*i32"]
            + ["i32"] * 8, {"SCALE_N": 128, **_W8A8_GEMV})

# the decode attention (M = 1 query per row): the in-kernel split combine, the per-row int8 quantization behind a
# second arrival counter, the rotary + cache write of the new token, MLA's two-tile keys with values from keys
# (whose splits a second launch combines), and the output with its head groups' maxima (QUANT 3)
_ATTN_ARGS = (["*bf16"] * 3 + ["*i32"] * 2 + ["*bf16"] * 2 + ["*fp32"] * 2 + ["*i64"] + ["*fp32"] * 3
              + ["*bf16", "*i8", "*fp32", "*i32", "*fp32", "fp32"] + ["i32"] * 28)
for rope, splits, quant, dk, dv in ((True, 4, 2, 128, 128), (True, 1, 0, 128, 128), (False, 4, 1, 128, 128),
                                     (False, 1, 2, 64, 64), (False, 4, 0, 576, 512), (True, 4, 3, 128, 128)):
    d1, d2 = (512, 64) if dk == 576 else (dk, 0)
    VARIANTS[f"decode attention rope {rope} splits {splits} quant {quant} dk {dk}"] = (
        "attention._decode_kernel", _ATTN_ARGS,
        {"PAGE_SIZE": 16, "NUM_SPLITS": splits, "HEAD_BLOCKS": 1, "BLOCK_H": 16, "BLOCK_N": 64 if dk <= 128 else 32,
         "BLOCK_D1": d1, "BLOCK_D2": d2, "BLOCK_DV": dv, "BLOCK_S": max(2, splits), "V_FROM_K": dk == 576,
         "SPLIT_CHUNK": 1 if dk == 576 else 2, "COMBINE_H": 16 if dk == 576 else 4, "ROW_H": 32, "BLOCK_P": 8,
         "ROPE": rope, "COMBINE": dk != 576, "QUANT": quant, "UPCAST": False, "IEEE": False, "COMPILED": True})
# MLA's split combine, launched apart (acc, m, l, seq_lens, out; H, DV)
VARIANTS["decode attention combine launch dv 512"] = (
    "attention._combine_kernel", ["*fp32"] * 3 + ["*i32", "*bf16"] + ["i32"] * 2,
    {"NUM_SPLITS": 8, "BLOCK_N": 32, "BLOCK_S": 8, "SPLIT_CHUNK": 8, "BLOCK_DV": 512, "COMPILED": True})

_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
name, types, constexprs = json.loads(sys.argv[1])
module, _, name = name.rpartition(".")
kernel = getattr(importlib.import_module("ingot.kernels." + (module or "int8_gemm")), name)
params = [p for p in kernel.arg_names if p not in constexprs]
signature = dict(zip(params, types), **{c: "constexpr" for c in constexprs})
src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
print(len(out.asm["cubin"]))
"""


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemm_kernel_compiles_for_sm90(variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(VARIANTS[variant])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{variant}: compile for sm_90 failed (rc {run.returncode}):\n{run.stderr[-3000:]}"
    assert int(run.stdout.split()[-1]) > 0, f"{variant}: empty cubin"


# The Gluon int8 kernels (ingot.kernels.gemm_sm90) cannot run in the interpreter at all. Their speed rests on ptxas
# keeping the wgmmas asynchronous: ptxas serializes every wgmma of a kernel (info C7514 / C7512) when an instruction
# reads the registers of one in flight or registers run out, silently costing the overlap the kernels exist for (the
# block kernel ran at 0.75-1.0x BF16 that way). So besides compiling them, ptxas -v must report neither, and no
# spills; and the shared memory must fit the H100's 227 KB per block. The block kernel is warp-specialized: ptxas
# reports its launch register limit; a partition that outgrew its setmaxnreg share would spill, which the check sees.
_GLUON_SCRIPT = """
import json, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from triton.backends.nvidia.compiler import get_ptxas
from ingot.kernels import gemm_sm90 as g
from ingot.kernels.tuning import GemmConfig
op, tile, has_bias = sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3]))
# the decode kernel's extremes: the smallest tile, the largest (the most registers: a 128 x 64 split-K sum), deepest
SKINNY_TILES = [GemmConfig(16, 64, 256, num_stages=8, split_k=1), GemmConfig(64, 128, 256, num_stages=4, split_k=4),
                GemmConfig(32, 64, 128, num_stages=8, split_k=2)]
if op == "block":
    cfg = g.BLOCK_CONFIG
elif op == "channel":
    cfg = g.CHANNEL_TILES[tile][0]
else:
    cfg = SKINNY_TILES[tile]
    if op == "skinny-block" and not g.skinny_block_steps_ok(cfg):  # K steps of 256 need a group
        cfg = GemmConfig(cfg.block_m, cfg.block_n, 128, num_stages=cfg.num_stages, split_k=cfg.split_k)
x = torch.zeros(1024, 1024, dtype=torch.int8)
x_desc = mangle_type(g.TensorDescriptor(x, [1024, 1024], [1024, 1], [cfg.block_m, cfg.block_k],
                                        g._smem_layout(cfg.block_m, cfg.block_k)))
w_desc = mangle_type(g.TensorDescriptor(x, [1024, 1024], [1024, 1], [cfg.block_n, cfg.block_k],
                                        g._smem_layout(cfg.block_n, cfg.block_k)))
constexprs = {"HAS_BIAS": has_bias, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "GROUP_M": cfg.group_m, "STAGES": cfg.num_stages, "num_warps": cfg.num_warps}
options = {"num_warps": cfg.num_warps}
if op.startswith("skinny"):
    kernel = g._int8_skinny_gemm_sm90_kernel
    del constexprs["GROUP_M"]
    constexprs.update(BLOCKED=op == "skinny-block", SCALE_N=128, SPLIT_K=cfg.split_k, GROUP_K=g.skinny_group_k(cfg),
                      SCALE_STEPS=g.sm90_decode_scale_steps(cfg, 16384))
    part = "*fp32" if op == "skinny-block" else "*i32"
    types = [w_desc, x_desc, "*fp32", "*fp32", "*fp32", "*bf16", part, "*i32"] + ["i32"] * 9
elif op == "block":
    kernel, ints = g._int8_block_gemm_sm90_kernel, 9
    constexprs.update(SCALE_N=128, GROUP_K=g.GROUP_K, CONSUMER_REGS=g.BLOCK_CONSUMER_REGS)
    options["maxnreg"] = g.BLOCK_MAXNREG
else:
    kernel, ints = g._int8_channel_gemm_sm90_kernel, 7
if not op.startswith("skinny"):
    types = [x_desc, w_desc, "*fp32", "*fp32", "*fp32", "*bf16"] + ["i32"] * ints
params = [p for p in kernel.arg_names if p not in constexprs]
assert len(params) == len(types), params
signature = dict(zip(params, types), **{c: "constexpr" for c in constexprs})
src = GluonASTSource(fn=kernel, signature=signature,
                     constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
with tempfile.TemporaryDirectory() as d:
    open(d + "/k.ptx", "w").write(out.asm["ptx"])
    run = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", d + "/k.ptx", "-o", d + "/k.cubin"],
                         capture_output=True, text=True)
print(json.dumps({"cubin": len(out.asm["cubin"]), "shared": out.metadata.shared, "ptxas": run.stderr,
                  "num_warps": out.metadata.num_warps}))
"""
SM90_KERNELS = ([("block", 0)] + [("channel", i) for i in range(2)]
                + [(f"skinny-{kind}", i) for kind in ("channel", "block") for i in range(3)])


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("op,tile", SM90_KERNELS)
def test_sm90_gemm_compiles_with_async_wgmma(op, tile, has_bias):
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _GLUON_SCRIPT, op, str(tile), str(int(has_bias))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"compile for sm_90 failed (rc {run.returncode}):\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["cubin"] > 0
    assert result["shared"] <= 227 * 1024, f"{result['shared']} bytes of shared memory"
    ptxas = result["ptxas"]
    assert "serialized" not in ptxas, f"ptxas serializes the wgmmas:\n{ptxas}"
    assert " 0 bytes spill stores, 0 bytes spill loads" in ptxas, f"the kernel spills:\n{ptxas}"
    if op == "block":  # warp-specialized: two consumer warpgroups and the producer warp's (rounded up to 4 warps)
        assert result["num_warps"] == 12, result["num_warps"]


# The Gluon GEMVs (ingot.kernels.gemv_gluon) exist to cut the K loop's instructions per weight: they must keep
# 16-byte weight loads and stay under 6 SASS instructions per weight in the loop (W4A16 3.9-5.4 by rows per thread;
# the Triton GEMV took 8.8, session 17), with no spills, at the tile extremes the tuner tries (2 / 8 rows per thread,
# 8 / 32 lanes per row, warps along K, two chunks, split-K), for int4 and int8 weights.
_GEMV_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from ingot.kernels import gemv_gluon as g
r, c, wk, s, warps, split, has_bias, bits = map(int, sys.argv[1:9])
kernel = g._gemv_kernel
constexprs = dict(BITS=bits, GROUP_SIZE=128 if bits == 4 else 0, HAS_BIAS=bool(has_bias), SPLIT_K=split, R=r, C=c,
                  WK=wk, KC=s * c * wk, VEC=g.VEC, EVEN_K=True)
params = [p for p in kernel.arg_names if p not in constexprs]
types = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * (len(params) - 7)
signature = dict(zip(params, types), **{name: "constexpr" for name in constexprs})
aligned = ["x_ptr", "w_ptr", "ws_ptr", "bias_ptr", "y_ptr", "part_ptr", "lock_ptr", "K", "stride_wn"]  # as the JIT sees them
src = GluonASTSource(fn=kernel, signature=signature,
                     constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                     attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
bin_dir = os.path.dirname(get_ptxas(90).path)
with tempfile.TemporaryDirectory() as d:
    open(d + "/k.ptx", "w").write(out.asm["ptx"])
    ptxas = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", d + "/k.ptx", "-o", d + "/k.cubin"],
                           capture_output=True, text=True).stderr
    open(d + "/g.cubin", "wb").write(out.asm["cubin"])
    sass = subprocess.run([bin_dir + "/cuobjdump", "-sass", d + "/g.cubin"], capture_output=True, text=True).stdout
ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\\*([0-9a-f]{4,})\\*/\\s+([^;]*);", sass)]
loops = [(int(m.group(1), 16), a) for a, t in ins for m in [re.search(r"BRA\\s+(0x[0-9a-f]+)", t)]
         if m and int(m.group(1), 16) < a]
start, end = max(loops, key=lambda se: se[1] - se[0])  # the K loop: the longest backward branch
body = [t for a, t in ins if start <= a <= end]
print(json.dumps({"ptxas": ptxas, "loop": len(body), "weights": r * s * g.chunk(bits),
                  "wide_loads": sum("LDG.E.128" in t for t in body)}))
"""


@pytest.mark.parametrize("r,c,wk,s,warps,split,has_bias,bits", [
    (2, 32, 1, 1, 4, 1, 0, 4), (8, 8, 1, 1, 4, 1, 1, 4), (4, 16, 1, 1, 8, 4, 0, 4), (8, 32, 1, 1, 4, 2, 1, 4),
    (2, 16, 4, 2, 8, 1, 0, 4), (4, 8, 2, 1, 8, 1, 1, 4), (4, 32, 1, 1, 4, 1, 0, 8), (8, 16, 2, 1, 8, 2, 1, 8),
])
def test_gluon_gemv_compiles_lean(r, c, wk, s, warps, split, has_bias, bits):
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(v) for v in (r, c, wk, s, warps, split, has_bias, bits)]
    run = subprocess.run([sys.executable, "-c", _GEMV_SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"compile for sm_90 failed (rc {run.returncode}):\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert " 0 bytes spill stores, 0 bytes spill loads" in result["ptxas"], f"the kernel spills:\n{result['ptxas']}"
    # per thread and step: R x S 16-byte weight loads (+ 4 x S of x for int4: 32 bf16 per chunk; int8's 16 bf16 of x
    # per chunk come as four 8-byte loads, the layout's innermost dimension being one word's 4 values)
    assert result["wide_loads"] >= (r + (4 if bits == 4 else 0)) * s, result
    per_weight = result["loop"] / result["weights"]
    assert per_weight < 6.0, f"{per_weight:.2f} SASS instructions per weight in the K loop ({result})"
