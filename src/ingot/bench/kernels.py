"""``ingot bench kernels``: ingot's GEMMs and activation quantizers against cuBLAS, one run, one JSON.

For each (N, K) of the chosen model shapes and each M (tokens), times in the same process:

- ``bf16``: cuBLAS ``x @ w.T`` in BF16, the baseline every ratio is taken against;
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32) plus per-token x per-channel scaling to BF16 in PyTorch
  (only where its shape rules allow: M > 16, N and K multiples of 8; "n/a" otherwise);
- ``scaled_mm_fp8``: ``torch._scaled_mm`` on e4m3 with rowwise scales (per-tensor when rowwise raises; the reason
  is recorded);
- ``int8_channel`` / ``int8_block``: ``ingot.kernels.int8_gemm_channel`` / ``int8_gemm_block`` (GEMM only: the
  activations are already quantized, as for the cuBLAS rows; backend "auto": the Gluon sm_90 kernels at M >= 512
  on Hopper, the Triton kernels elsewhere; each row's ``backend`` says which);
- ``fp8_block``: ``ingot.kernels.fp8_gemm.fp8_gemm_block`` (e4m3, 1x128 activation x 128x128 weight scales), as
  the engine calls it (backend "auto": cuBLAS's block-scaled GEMM at M >= 65 on sm_90, the Triton kernel elsewhere;
  each row's ``backend`` says which; the activation scales in the layout the engine's fp8 linear quantizes into:
  column-major where cuBLAS runs, row-major for Triton);
- ``w8a16`` / ``w4a16``: ``ingot.kernels.weight_only`` (bf16 activations; int8 per-channel / int4 group-128 packed
  weights, dequantized in the kernel; backend "auto": at prefill sizes, weight_only.DEQUANT_MIN_M, dequantized to
  bf16 and multiplied by cuBLAS; each row's ``backend`` says which);
- ``quant_int8`` / ``quant_fp8``: ``ingot.kernels.per_token_group_quant`` (group 128) on the activation [M, K];
  beside it (``same_traffic_cast_*``) torch's elementwise cast of the same [M, K] to int8 / fp8, the same bytes
  less the scales with no reduction: how close to the 1 GiB copy rate a pass of this size gets at all.

Timing: ``triton.testing.do_bench_cudagraph`` (``do_bench`` with a note where graph capture fails), median of its
replays. Each timed call takes the next of several input sets (fresh random weights and activations), enough of
them that one pass over the sets moves >= 4x the L2 size, so weights come from HBM, not L2 (capture unrolls the
calls, so the rotation is baked into the graph). Activation-only rows at small M may still fit in L2
(``inputs_fit_in_l2`` says so).

Peaks are measured in the same run: a BF16 8192^3 matmul (TFLOP/s) and a 1 GiB device-to-device copy (GB/s,
bytes read + written). Bytes per row are the fewest the op must move: every input read once, the output written
once (scales included). Targets: see ``TARGETS``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ingot.bench.common import default_results_path, device_info, device_slug, git_info, software_info, timestamp, write_results

SHAPES: dict[str, tuple[tuple[int, int], ...]] = {  # (N, K) of the linears
    "llama3-8b": ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)),
    "deepseek-v3": ((7168, 2048), (2048, 7168), (24576, 1536), (7168, 16384), (18432, 7168)),
}
SHAPES["all"] = SHAPES["llama3-8b"] + SHAPES["deepseek-v3"]
DEFAULT_M = (1, 16, 64, 128, 256, 1024, 4096)
OPS = ("bf16", "int_mm", "scaled_mm_fp8", "int8_channel", "int8_block", "fp8_block", "w8a16", "w4a16", "quant_int8",
       "quant_fp8")
GEMM_OPS = OPS[:8]
WEIGHT_ONLY_OPS = ("w8a16", "w4a16")
_DEV = "cuda"  # where inputs are made (a CPU smoke run of the loop patches it)
H100_L2_BYTES = 50 * 2**20
SETTLE_MIN_M = 256  # GEMMs from here up draw enough power to move the clocks (BenchKernelsOptions.settle_ms)
QUANT_MIN_M = 1024  # the bandwidth target applies where the activation is large enough to be bandwidth-bound
TARGETS = {
    "int8_channel": {"small_m": 1.7, "large_m": 1.4},
    "int8_block": {"small_m": 1.5, "large_m": 1.2},
    "fp8_block": {"large_m": 1.5},
    "w4a16": {"m1": 2.5},
    "quant_fraction_of_copy_bandwidth": 0.70,
    "small_m_max": 64,
    "large_m_min": 1024,
    "quant_min_m": QUANT_MIN_M,
    "not_implemented": [],
}


@dataclass(frozen=True)
class BenchKernelsOptions:
    shapes: str = "all"  # a preset of SHAPES
    custom_shapes: tuple[tuple[int, int], ...] = ()  # (N, K) pairs; replace the preset when given
    m_sizes: tuple[int, ...] = DEFAULT_M
    out: object = None  # Path or None: benchmarks/results/kernels-<device>-<date>.json
    command: str = ""
    git_sha: str | None = None  # for trees copied without .git (the GPU machine)
    rep_ms: int = 10  # do_bench_cudagraph's rep: ms of unrolled calls per graph (replayed 10 times)
    seed: int = 0
    # idle ms before each GEMM timing from SETTLE_MIN_M rows up: the H100 caps its power (clocks 1155-1980 MHz within
    # one run, throttle reason "SW power cap"), so a GEMM timed right after heavy ones ran at lower clocks than the
    # same GEMM after a pause: int8-block at M = 4096 took 178 us in the bench after the int_mm / fp8 / channel rows
    # and 148 us after 0.5 s idle, while BF16 (timed first) took 175 in both (benchmarks/results/bench-clocks-*).
    settle_ms: int = 500

    def __post_init__(self) -> None:
        if self.shapes not in SHAPES:
            raise ValueError(f"bench kernels: shapes {self.shapes!r}; expected one of {', '.join(SHAPES)}")
        if not self.m_sizes or any(m < 1 for m in self.m_sizes):
            raise ValueError(f"bench kernels: M sizes must be positive integers, got {list(self.m_sizes)}")
        for nk in self.custom_shapes:
            if len(nk) != 2 or any(d < 1 for d in nk):
                raise ValueError(f"bench kernels: shape {nk!r}; expected (N, K) positive")
        if self.settle_ms < 0:
            raise ValueError(f"bench kernels: settle_ms must be >= 0, got {self.settle_ms}")
        if self.rep_ms < 1:
            raise ValueError(f"bench kernels: rep_ms must be >= 1, got {self.rep_ms}")

    def shape_list(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.custom_shapes) or SHAPES[self.shapes]


# ------------------------------------------------------------------------------------------------ timing


def _time_us(fn, rep_ms: int) -> tuple[float, str]:
    """Median microseconds of one fn() call, and the timer used."""
    import triton.testing

    torch.cuda.synchronize()  # inputs were made on the default stream; the timers run on their own
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        return ms * 1e3, "do_bench_cudagraph"
    except Exception as e:  # capture can fail for ops that sync or allocate oddly
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=5, rep=max(rep_ms, 10) * 2, return_mode="median")
        return ms * 1e3, f"do_bench (cuda graph failed: {type(e).__name__}: {str(e).splitlines()[0][:200]})"


def _rotating(sets: list, op):
    """fn() applying op to the next input set each call."""
    state = [0]

    def fn():
        s = sets[state[0] % len(sets)]
        state[0] += 1
        return op(*s)

    return fn


def _copies(bytes_per_set: int, l2: int, cap: int = 1024) -> int:
    return max(2, min(cap, math.ceil(4 * l2 / max(1, bytes_per_set))))


def measure_peaks(rep_ms: int) -> dict:
    n = 8192
    a = torch.randn(n, n, device=_DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=_DEV, dtype=torch.bfloat16)
    us_mm, timer_mm = _time_us(lambda: a @ b.T, max(rep_ms, 50))
    del a, b
    numel = 2**30 // 4
    src = torch.randn(numel, device=_DEV, dtype=torch.float32)
    dst = torch.empty_like(src)
    us_cp, timer_cp = _time_us(lambda: dst.copy_(src), max(rep_ms, 50))
    del src, dst
    torch.cuda.empty_cache()
    return {
        "bf16_matmul": {"shape": [n, n, n], "us": round(us_mm, 2), "tflops": round(2 * n**3 / us_mm / 1e6, 1),
                        "timer": timer_mm},
        "copy": {"bytes": 2 * 2**30, "us": round(us_cp, 2), "gbps": round(2 * 2**30 / us_cp / 1e3, 1),
                 "timer": timer_cp, "note": "device-to-device copy of 1 GiB; bytes = read + written"},
        "assumed_int8_fp8_tflops_factor": 2.0,
    }


# ------------------------------------------------------------------------------------------------ inputs


def _weights(n: int, k: int, copies: int) -> list[dict]:
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device=_DEV, dtype=torch.bfloat16)
        out.append({
            "w": w,
            "w_q": torch.randint(-127, 128, (n, k), device=_DEV, dtype=torch.int8),
            "w_s": torch.rand(n, 1, device=_DEV, dtype=torch.float32) / 127 + 1e-4,
            "w_sb": torch.rand((n + 127) // 128, (k + 127) // 128, device=_DEV, dtype=torch.float32) / 127 + 1e-4,
            "w8": (w * 16).to(torch.float8_e4m3fn),
            "w8_s_row": torch.rand(1, n, device=_DEV, dtype=torch.float32) / 16 + 1e-4,
            "w8_sb": torch.rand((n + 127) // 128, (k + 127) // 128, device=_DEV, dtype=torch.float32) / 16 + 1e-4,
            # int4 group-128, compressed-tensors' packing: 8 values per int32 along K
            "w4": torch.randint(-2**31, 2**31, (n, (k + 7) // 8), device=_DEV, dtype=torch.int64).to(torch.int32),
            "w4_s": torch.rand(n, (k + 127) // 128, device=_DEV, dtype=torch.float32) / 8 + 1e-4,
        })
    return out


def _acts(m: int, k: int, copies: int) -> list[dict]:
    out = []
    for _ in range(copies):
        x = torch.randn(m, k, device=_DEV, dtype=torch.bfloat16)
        out.append({
            "x": x,
            "x_q": torch.randint(-127, 128, (m, k), device=_DEV, dtype=torch.int8),
            "x_s": torch.rand(m, 1, device=_DEV, dtype=torch.float32) / 127 + 1e-4,
            "x_sg": torch.rand(m, (k + 127) // 128, device=_DEV, dtype=torch.float32) / 127 + 1e-4,
            "x8": (x * 16).to(torch.float8_e4m3fn),
            "x8_s_row": torch.rand(m, 1, device=_DEV, dtype=torch.float32) / 16 + 1e-4,
            "x8_sg": torch.rand(m, (k + 127) // 128, device=_DEV, dtype=torch.float32) / 16 + 1e-4,
        })
    return out


def _bytes(op: str, m: int, n: int, k: int) -> int:
    g = (k + 127) // 128
    return {
        "bf16": 2 * m * k + 2 * n * k + 2 * m * n,
        "int_mm": m * k + n * k + 4 * (m + n) + 2 * m * n,
        "scaled_mm_fp8": m * k + n * k + 4 * (m + n) + 2 * m * n,
        "int8_channel": m * k + n * k + 4 * (m + n) + 2 * m * n,
        "int8_block": m * k + n * k + 4 * m * g + 4 * ((n + 127) // 128) * g + 2 * m * n,
        "fp8_block": m * k + n * k + 4 * m * g + 4 * ((n + 127) // 128) * g + 2 * m * n,
        "w8a16": 2 * m * k + n * k + 4 * n + 2 * m * n,
        "w4a16": 2 * m * k + 4 * n * ((k + 7) // 8) + 4 * n * g + 2 * m * n,
        "quant_int8": 2 * m * k + m * k + 4 * m * g,
        "quant_fp8": 2 * m * k + m * k + 4 * m * g,
    }[op]


# ------------------------------------------------------------------------------------------------ the run


def _gemm_fns(m: int, n: int, k: int, pairs: list[tuple[dict, dict]], scaled_mode: list) -> dict:
    from ingot.kernels.fp8_gemm import auto_backend, fp8_gemm_block, fp8_supported
    from ingot.kernels.int8_gemm import int8_gemm_block, int8_gemm_channel
    from ingot.kernels.weight_only import w4a16_gemm, w8a16_gemm

    def int_mm(a, w):
        y = torch._int_mm(a["x_q"], w["w_q"].t())
        return (y.float() * a["x_s"] * w["w_s"].t()).to(torch.bfloat16)

    def scaled_rowwise(a, w):
        return torch._scaled_mm(a["x8"], w["w8"].t(), scale_a=a["x8_s_row"], scale_b=w["w8_s_row"],
                                out_dtype=torch.bfloat16)

    one = torch.ones((), device=_DEV, dtype=torch.float32)
    a0, w0 = pairs[0]
    fp8_scales = "x8_sg"
    if auto_backend(a0["x8"], w0["w8"]) == "cublas":  # the engine quantizes into cuBLAS's column-major layout there
        fp8_scales = "x8_sg_col"
        for a, _ in pairs:
            a["x8_sg_col"] = a["x8_sg"].t().contiguous().t()  # same values

    def scaled_tensor(a, w):
        return torch._scaled_mm(a["x8"], w["w8"].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    fns: dict = {
        "bf16": lambda a, w: a["x"] @ w["w"].t(),
        "int8_channel": lambda a, w: int8_gemm_channel(a["x_q"], a["x_s"], w["w_q"], w["w_s"]),
        "int8_block": lambda a, w: int8_gemm_block(a["x_q"], a["x_sg"], w["w_q"], w["w_sb"]),
        "fp8_block": (lambda a, w: fp8_gemm_block(a["x8"], a[fp8_scales], w["w8"], w["w8_sb"]))
        if fp8_supported(_DEV) else "n/a: no FP8 tensor cores (compute capability < 8.9)",
        "w8a16": lambda a, w: w8a16_gemm(a["x"], w["w_q"], w["w_s"]),
        "w4a16": lambda a, w: w4a16_gemm(a["x"], w["w4"], w["w4_s"], k),
    }
    if m > 16 and n % 8 == 0 and k % 8 == 0:
        fns["int_mm"] = int_mm
    else:
        fns["int_mm"] = "n/a: torch._int_mm needs M > 16 and N, K multiples of 8"
    errors = []
    for mode, f in (("rowwise", scaled_rowwise), ("per-tensor", scaled_tensor)):
        try:
            f(a0, w0)
            torch.cuda.synchronize()
            fns["scaled_mm_fp8"] = f
            scaled_mode[:] = [mode, errors]
            break
        except Exception as e:
            errors.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    else:
        fns["scaled_mm_fp8"] = "n/a: " + "; ".join(errors)
        scaled_mode[:] = [None, errors]
    return fns


def _row(op: str, m: int, n: int, k: int, us: float | None, peaks: dict, **extra) -> dict:
    row: dict = {"op": op, "m": m, "n": n, "k": k, **extra}
    if us is None:
        return row
    nbytes = _bytes(op, m, n, k)
    peak_tf = peaks["bf16_matmul"]["tflops"]
    peak_bw = peaks["copy"]["gbps"]
    row.update({"us": round(us, 2), "bytes": nbytes, "gbps": round(nbytes / us / 1e3, 1),
                "gbps_frac_of_copy_peak": round(nbytes / us / 1e3 / peak_bw, 3)})
    if op in GEMM_OPS:
        flops = 2 * m * n * k
        # weight-only kernels run bf16 tensor-core dots: the bf16 peak is theirs
        factor = 1.0 if op == "bf16" or op in WEIGHT_ONLY_OPS else peaks["assumed_int8_fp8_tflops_factor"]
        tflops = flops / us / 1e6
        floor_us = max(flops / (peak_tf * factor * 1e6), nbytes / (peak_bw * 1e3))
        row.update({"tflops": round(tflops, 2), "tflops_frac_of_bf16_peak": round(tflops / peak_tf, 3),
                    "roofline_floor_us": round(floor_us, 2), "frac_of_roofline": round(floor_us / us, 3),
                    "bound": "compute" if flops / (peak_tf * factor * 1e6) > nbytes / (peak_bw * 1e3) else "memory"})
    return row


def _targets(rows: list[dict]) -> dict:
    checks = []
    for r in rows:
        op, m = r["op"], r["m"]
        if "us" not in r:
            continue
        if op == "w4a16" and m == 1 and "ratio_to_bf16" in r:
            need = TARGETS["w4a16"]["m1"]
            r["target"] = {"speedup_vs_bf16": need, "pass": r["ratio_to_bf16"] >= need}
            checks.append(r)
        elif op in ("int8_channel", "int8_block", "fp8_block") and "ratio_to_bf16" in r:
            if m <= TARGETS["small_m_max"] and "small_m" in TARGETS[op]:
                need = TARGETS[op]["small_m"]
            elif m >= TARGETS["large_m_min"]:
                need = TARGETS[op]["large_m"]
            else:
                continue
            r["target"] = {"speedup_vs_bf16": need, "pass": r["ratio_to_bf16"] >= need}
            checks.append(r)
        elif op in ("quant_int8", "quant_fp8") and m >= QUANT_MIN_M:
            need = TARGETS["quant_fraction_of_copy_bandwidth"]
            r["target"] = {"frac_of_copy_peak": need, "pass": r["gbps_frac_of_copy_peak"] >= need}
            checks.append(r)
    by_op: dict = {}
    for r in checks:
        d = by_op.setdefault(r["op"], {"checked": 0, "passed": 0, "failed": []})
        d["checked"] += 1
        d["passed"] += r["target"]["pass"]
        if not r["target"]["pass"]:
            d["failed"].append(f"M={r['m']} {r['n']}x{r['k']}")
    return {**TARGETS, "summary": by_op, "all_pass": bool(checks) and all(r["target"]["pass"] for r in checks)}


def run_bench_kernels(options: BenchKernelsOptions) -> dict:
    """Time every op at every (shape, M); write the JSON; print a table; return the results."""
    if not torch.cuda.is_available():
        raise ValueError("bench kernels: needs a CUDA device (torch.cuda.is_available() is False)")
    import triton

    from ingot.kernels.act_quant import per_token_group_quant
    from ingot.kernels.fp8_gemm import auto_backend
    from ingot.kernels.int8_gemm import auto_backend as int8_auto_backend
    from ingot.kernels.weight_only import choose_backend, resolve_config

    torch.manual_seed(options.seed)
    started = timestamp()
    device = device_info(["cuda"])
    props = torch.cuda.get_device_properties(0)
    l2 = max(getattr(props, "L2_cache_size", 0) or 0, H100_L2_BYTES)
    peaks = measure_peaks(options.rep_ms)
    rows: list[dict] = []
    scaled_modes: dict = {}
    for n, k in options.shape_list():
        copies = _copies(n * k, l2, cap=64)  # the int8 / fp8 weight (the smallest) decides; bf16 gets as many
        weights = _weights(n, k, copies)
        for m in options.m_sizes:
            acts = _acts(m, k, copies)
            pairs = list(zip(acts, weights))
            mode: list = []
            fns = _gemm_fns(m, n, k, pairs, mode)
            scaled_modes[f"{m}x{n}x{k}"] = mode[0]
            times: dict = {}
            for op in GEMM_OPS:
                f = fns[op]
                extra = {"input_sets": copies, "inputs_fit_in_l2": False}
                if op == "fp8_block" and not isinstance(f, str):  # what fp8_gemm_block's "auto" runs here
                    extra["backend"] = auto_backend(pairs[0][0]["x8"], pairs[0][1]["w8"])
                if op == "int8_block":  # and int8_gemm_block's, int8_gemm_channel's
                    extra["backend"] = int8_auto_backend(pairs[0][0]["x_q"], pairs[0][1]["w_q"], (128, 128))
                if op == "int8_channel":
                    extra["backend"] = int8_auto_backend(pairs[0][0]["x_q"], pairs[0][1]["w_q"])
                if op in WEIGHT_ONLY_OPS:  # "triton" kernels, or "dequant" (to bf16, then cuBLAS) at prefill sizes
                    extra["backend"] = choose_backend(op + "_gemm", "auto", m, n, None, torch.bfloat16, torch.bfloat16,
                                                      pairs[0][0]["x"].device)
                    if extra["backend"] == "triton":  # the launch's kernel: "triton", or "gluon" (the M = 1 GEMV)
                        extra["kernel"] = resolve_config(op + "_gemm", None, m, n, k, pairs[0][0]["x"].device).kernel
                if op == "scaled_mm_fp8":
                    extra["scale_mode"] = mode[0]
                    if mode[1]:
                        extra["scale_errors"] = mode[1]
                if isinstance(f, str):
                    rows.append(_row(op, m, n, k, None, peaks, status=f, **extra))
                    continue
                if m >= SETTLE_MIN_M:
                    time.sleep(options.settle_ms / 1e3)
                try:
                    us, timer = _time_us(_rotating(pairs, f), options.rep_ms)
                except Exception as e:
                    torch.cuda.synchronize()
                    rows.append(_row(op, m, n, k, None, peaks, status=f"error: {type(e).__name__}: {str(e)[:300]}", **extra))
                    continue
                times[op] = us
                rows.append(_row(op, m, n, k, us, peaks, status="ok", timer=timer, **extra))
            for dtype, op in (("int8", "quant_int8"), ("fp8_e4m3", "quant_fp8")):
                xbytes = 2 * m * k
                qcopies = _copies(xbytes, l2)
                xs = [(a["x"],) for a in acts] + [
                    (torch.randn(m, k, device=_DEV, dtype=torch.bfloat16),) for _ in range(max(0, qcopies - len(acts)))
                ]
                extra = {"input_sets": len(xs), "inputs_fit_in_l2": len(xs) * xbytes < l2, "group_size": 128}
                try:
                    us, timer = _time_us(_rotating(xs, lambda x, d=dtype: per_token_group_quant(x, d)), options.rep_ms)
                    # the same traffic with no reduction: torch's elementwise cast of x to the 1-byte dtype (reads
                    # 2 M K, writes M K; the quantizer writes 4 M K / 128 more scale bytes) - what a kernel of this
                    # size can reach against the 1 GiB copy the target is measured by
                    cast_dtype = torch.int8 if dtype == "int8" else torch.float8_e4m3fn
                    cast_us, _ = _time_us(_rotating(xs, lambda x, t=cast_dtype: x.to(t)), options.rep_ms)
                    extra["same_traffic_cast_us"] = round(cast_us, 2)
                    extra["same_traffic_cast_frac_of_copy_peak"] = round(
                        3 * m * k / cast_us / 1e3 / peaks["copy"]["gbps"], 3)
                    rows.append(_row(op, m, n, k, us, peaks, status="ok", timer=timer, **extra))
                except Exception as e:
                    torch.cuda.synchronize()
                    rows.append(_row(op, m, n, k, None, peaks, status=f"error: {type(e).__name__}: {str(e)[:300]}", **extra))
                del xs
            base = times.get("bf16")
            for r in rows:
                if r["m"] == m and r["n"] == n and r["k"] == k and "us" in r and base and r["op"] in GEMM_OPS:
                    r["ratio_to_bf16"] = round(base / r["us"], 3)
            print(_line(m, n, k, [r for r in rows if r["m"] == m and r["n"] == n and r["k"] == k]), flush=True)
            del acts, pairs, fns
        del weights
        torch.cuda.empty_cache()
    targets = _targets(rows)
    results = {
        "bench": "kernels",
        "command": options.command,
        "started": started,
        "finished": timestamp(),
        "git": {"sha": options.git_sha, "dirty": None} if options.git_sha else git_info(),
        "device": device,
        "software": {**software_info(), "triton": triton.__version__},
        "config": {
            "shapes": options.shapes if not options.custom_shapes else "custom",
            "nk": [list(s) for s in options.shape_list()],
            "m_sizes": list(options.m_sizes),
            "rep_ms": options.rep_ms,
            "settle": f"{options.settle_ms} ms idle before each GEMM timing at M >= {SETTLE_MIN_M} (every op starts "
                      "from the same power state: the GPU caps its power, and an op timed right after heavy ones "
                      "ran at lower clocks)",
            "seed": options.seed,
            "l2_bytes_assumed": l2,
            "timing": "triton.testing.do_bench_cudagraph, median of 10 graph replays of rep_ms of unrolled calls; "
                      "do_bench fallback noted per row in 'timer'",
            "l2_policy": "rotation: each timed call takes the next of 'input_sets' sets of fresh random inputs "
                         "(weights and activations), >= 4x L2 bytes per pass for GEMMs (at least 2 sets); no L2 flush",
            "gemm_scope": "GEMM only: activations pre-quantized (quantization timed separately in quant_* rows); "
                          "output bf16, no bias",
            "bytes": "fewest bytes the op must move: inputs (incl. scales) read once + output written once",
            "int_mm": "torch._int_mm(x_q, w_q.t()) then (y.float() * x_s * w_s.t()).to(bf16)",
            "scaled_mm_fp8": "torch._scaled_mm(x8, w8.t(), rowwise fp32 scales [M,1]/[1,N], out bf16), per-tensor "
                             "scales if rowwise raises; use_fast_accum=False",
            "ratio_to_bf16": "bf16 time / op time at the same (M, N, K) in this run (> 1 is faster)",
            "roofline": "floor = max(flops / peak, bytes / copy GB/s); int8/fp8 peak assumed 2x the measured bf16 peak",
        },
        "peaks": peaks,
        "scaled_mm_modes": scaled_modes,
        "rows": rows,
        "targets": targets,
    }
    out = options.out or default_results_path("kernels", device_slug(device))
    results["out"] = str(write_results(out, results))
    print(format_table(results))
    return results


def _line(m: int, n: int, k: int, rows: list[dict]) -> str:
    parts = []
    for r in rows:
        parts.append(f"{r['op']}={r['us']:.1f}" if "us" in r else f"{r['op']}=n/a")
    return f"M={m} {n}x{k}: " + " ".join(parts)


def format_table(results: dict) -> str:
    p = results["peaks"]
    lines = [f"peaks: bf16 matmul {p['bf16_matmul']['tflops']} TFLOP/s, copy {p['copy']['gbps']} GB/s",
             "times in us; (x) = speed-up over bf16; quant: % of copy GB/s"]
    head = (f"{'M':>5} {'N x K':>12} {'bf16':>8} {'int_mm':>14} {'fp8':>14} {'channel':>14} {'block':>14} "
            f"{'fp8_block':>14} {'w8a16':>14} {'w4a16':>14} {'q_int8':>12} {'q_fp8':>12}")
    lines += [head, "-" * len(head)]
    groups: dict = {}
    for r in results["rows"]:
        groups.setdefault((r["n"], r["k"], r["m"]), {})[r["op"]] = r
    for (n, k, m), g in groups.items():
        cells = []
        for op in OPS:
            r = g.get(op)
            if r is None or "us" not in r:
                cells.append("n/a")
            elif op == "bf16":
                cells.append(f"{r['us']:.1f}")
            elif op in GEMM_OPS:
                mark = "" if "target" not in r else ("" if r["target"]["pass"] else "!")
                cells.append(f"{r['us']:.1f}({r.get('ratio_to_bf16', 0):.2f}){mark}")
            else:
                cells.append(f"{r['us']:.1f}/{100 * r['gbps_frac_of_copy_peak']:.0f}%")
        w = (8, 14, 14, 14, 14, 14, 14, 14, 12, 12)
        lines.append(f"{m:>5} {f'{n}x{k}':>12} " + " ".join(f"{c:>{wi}}" for c, wi in zip(cells, w)))
    t = results["targets"]
    for op, d in t["summary"].items():
        lines.append(f"target {op}: {d['passed']}/{d['checked']} pass" + (f" (fail: {', '.join(d['failed'][:8])})" if d["failed"] else ""))
    lines.append(f"not implemented: {', '.join(t['not_implemented'])}; all targets pass: {t['all_pass']}  ('!' = target missed)")
    lines.append(f"results: {results['out']}")
    return "\n".join(lines)
