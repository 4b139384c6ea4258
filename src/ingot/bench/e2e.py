"""``ingot bench e2e``: the engine end to end on random-weight models of real shapes, every scheme against BF16 in
one run, and transformers' ``generate`` as the outside peer.

For each scheme (``random_model`` builds the model directly on the device: no checkpoint, no conversion):

- an ``LLM`` over it with max_num_seqs = the largest batch and a KV pool sized to the workload (largest batch x
  (input + output) tokens), so peak memory compares the schemes rather than a pool that fills the GPU;
- for each batch size B: B prompts of ``input_len`` random token ids, ``output_len`` tokens each (eos ignored),
  after one untimed run of the same batch (Triton compiles the prefill shapes there), then ``repeats`` timed runs
  (default 3; the run of median wall time is reported, every wall time is kept: one run's TTFT is a single prefill,
  whose host time varied 25 -> 97 ms between runs of one build). Recorded: output tokens/s (B x output_len / wall
  time of ``generate``, prefill included), TTFT (first token minus arrival, all requests arrive together), TPOT
  ((latency - TTFT) / (output_len - 1)), peak allocated GPU memory.

Batch-1 decode roofline: a decode step must read every weight it uses once (activated experts only for MoE: top-k
of the routed experts; the embedding gives one row; lm_head whole) plus the KV cache of the context (input_len +
output_len / 2 tokens on average). Roofline tokens/s = measured copy bandwidth (read + written bytes of a 1 GiB
device-to-device copy, the same measure as ``bench kernels``) / those bytes. The target compares 1 / TPOT at batch 1
with it.

transformers peer: the same architecture in BF16 (``AutoModelForCausalLM.from_config``, the ingot BF16 model's
weights copied in by name where they line up), ``generate`` with a static cache, greedy, min_new_tokens =
max_new_tokens = output_len; TTFT from a separate max_new_tokens = 1 call. transformers 5 compiles the decode forward
of a static-cache generate (torch.compile, mode "reduce-overhead") on CUDA the first time it runs: ~40 s for
Llama-3-8B, which an untimed 2-token warm-up did not cover (other lengths, other cache size), so it once landed in
the timing (1.5 tok/s at batch 1). Now both timed calls are first made once, identically (same batch, prompt,
max_new_tokens), then timed twice each; if the two timings of a call differ by more than 25% (a recompile), the peer
is measured again with compile disabled, and the JSON says so (``compiled``, ``compile_note``). ``hf_compile=False``
disables it from the start. Skipped (with the reason) where transformers is missing.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ingot.bench.common import default_results_path, device_slug, run_stamp, write_results

# Llama-3-8B's config.json (meta-llama/Meta-Llama-3-8B), the fields ingot's Llama reads.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3), without its quantization_config: the bench quantizes itself.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
PRESETS = {"llama3-8b": LLAMA3_8B, "deepseek-v3": DEEPSEEK_V3}
NEEDS_LAYERS = {"deepseek-v3": "61 layers of 256 experts are ~1.3 TB in BF16: pass --layers N (4 = 3 dense + 1 MoE)"}

TARGETS = {  # issue 4
    "batch1_decode_fraction_of_roofline": 0.80,
    "vs_bf16_tokens_per_s": {"int8-channel": 1.6, "int8-block": 1.4},
    "vs_bf16_batches": [1, 64],
    "bf16_vs_hf_generate_batch1": 2.0,
}
BANDWIDTH_BYTES = 2**30  # the copy that measures bandwidth (1 GiB read + 1 GiB written)


@dataclass(frozen=True)
class BenchE2EOptions:
    model: str = "llama3-8b"  # a PRESETS name or a config.json path
    layers: int | None = None  # keep the first N decoder layers
    schemes: tuple[str, ...] = ("bf16", "int8-channel", "int8-block", "fp8-block")
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    input_len: int = 128
    output_len: int = 128
    device: str = "cuda"
    hf_peer: bool = True
    hf_batch_sizes: tuple[int, ...] = (1,)
    hf_compile: bool = True  # let transformers compile the static-cache decode (its default on CUDA), warm-up excluded
    cuda_graphs: bool = True
    async_steps: bool = True  # the engine's host/GPU overlap (EngineConfig.async_steps)
    block_size: int = 16
    out: Path | None = None  # default: benchmarks/results/e2e-<device>-<date>.json
    command: str = ""
    git_sha: str | None = None  # for trees copied without .git (the GPU machine)
    seed: int = 0
    repeats: int = 3  # timed runs per batch size; the median one is reported
    prefill_graph_tokens: int | None = None  # EngineConfig.prefill_graph_tokens (None: the engine's default, 0: off)
    weight_prefetch_mb: int | None = None  # EngineConfig.weight_prefetch_mb (None: the engine's default, 0: off)

    def __post_init__(self) -> None:
        from ingot.quant.schemes import PRESETS as SCHEMES

        for s in self.schemes:
            if s not in SCHEMES:
                raise ValueError(f"bench e2e: scheme {s!r}; expected one of {', '.join(SCHEMES)}")
        if not self.schemes:
            raise ValueError("bench e2e: no schemes")
        for name in ("batch_sizes", "hf_batch_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(b < 1 for b in sizes):
                raise ValueError(f"bench e2e: {name} must be positive integers, got {list(sizes)}")
        if self.repeats < 1:
            raise ValueError(f"bench e2e: repeats must be >= 1, got {self.repeats}")
        if self.input_len < 1 or self.output_len < 2:
            raise ValueError(f"bench e2e: input_len >= 1 and output_len >= 2 (TPOT needs two tokens), got "
                             f"{self.input_len}, {self.output_len}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"bench e2e: --layers must be >= 1, got {self.layers}")
        if self.model in NEEDS_LAYERS and self.layers is None:
            raise ValueError(f"bench e2e: {self.model}: {NEEDS_LAYERS[self.model]}")


def model_config(options: BenchE2EOptions) -> dict:
    """The preset's config (or the JSON file's), with num_hidden_layers cut to ``layers``."""
    if options.model in PRESETS:
        config = dict(PRESETS[options.model])
    else:
        path = Path(options.model)
        if not path.is_file():
            raise ValueError(f"bench e2e: --random-weights {options.model!r} is neither a preset "
                             f"({', '.join(PRESETS)}) nor a config.json file")
        config = json.loads(path.read_text())
    if options.layers is not None:
        if options.layers > config["num_hidden_layers"]:
            raise ValueError(f"bench e2e: --layers {options.layers} > the model's {config['num_hidden_layers']}")
        config["num_hidden_layers"] = options.layers
    return config


# ----------------------------------------------------------------------------------------------- measures


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_BYTES, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth, GB/s of bytes read + written (median of ``reps`` timed copies)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    del src, dst
    s = statistics.median(times)
    return {"bytes": 2 * nbytes, "seconds": s, "gbps": round(2 * nbytes / s / 1e9, 1),
            "note": "device-to-device copy; bytes = read + written; median of %d" % reps}


def decode_bytes_per_token(model, config: dict) -> dict:
    """Bytes a batch-1 decode step reads from weights: every tensor once, the embedding one row (unless tied to
    lm_head), routed experts scaled by num_experts_per_tok / n_routed_experts; rotary tables are not counted.
    Tensors that are plain attributes are not seen: a quantized DeepSeek's MLA reads a BF16 copy of kv_b_proj
    (2x its int8 bytes) that is counted as the stored int8 weight (~0.2% of a layer)."""
    embed = model.model.embed_tokens.weight
    tied = embed.data_ptr() == model.lm_head.weight.data_ptr()
    routed = config.get("n_routed_experts") or 0
    active = (config.get("num_experts_per_tok") or routed) / routed if routed else 1.0
    total, experts, seen = 0.0, 0.0, set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or "rotary" in name:
            continue
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if t is embed and not tied:
            nbytes = embed.shape[1] * embed.element_size()
        if ".mlp.experts." in name:
            experts += nbytes
            nbytes *= active
        total += nbytes
    return {"weights": int(total), "routed_expert_bytes_total": int(experts), "active_expert_fraction": active}


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _prompts(b: int, n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (b, n), generator=g).tolist()  # ids >= 10: clear of the special tokens


# ------------------------------------------------------------------------------------------------- engine


def bench_engine_batches(llm, options: BenchE2EOptions, vocab: int, device: torch.device) -> list[dict]:
    from ingot.engine import SamplingParams

    rows = []
    for b in options.batch_sizes:
        prompts = _prompts(b, options.input_len, vocab, options.seed + b)
        params = SamplingParams(max_tokens=options.output_len, ignore_eos=True)
        llm.generate(prompts, params)  # warm-up: prefill shapes compile
        _reset_peak(device)
        runs = []
        for _ in range(options.repeats):
            _sync(device)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            _sync(device)
            runs.append((time.perf_counter() - t0, outs))
        walls = [w for w, _ in runs]
        wall, outs = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]  # the median run (the lower middle)
        if any(len(o.token_ids) != options.output_len for o in outs):
            raise RuntimeError(f"bench e2e: batch {b}: a request stopped before {options.output_len} tokens")
        ttft = [o.ttft_s for o in outs]
        tpot = [(o.latency_s - o.ttft_s) / (options.output_len - 1) for o in outs]
        rows.append({
            "batch": b,
            "wall_s": round(wall, 4),
            "wall_s_runs": [round(w, 4) for w in walls],
            "output_tokens_per_s": round(b * options.output_len / wall, 2),
            "ttft_ms_median": round(1e3 * statistics.median(ttft), 3),
            "ttft_ms_max": round(1e3 * max(ttft), 3),
            "tpot_ms_median": round(1e3 * statistics.median(tpot), 4),
            "decode_tokens_per_s_per_seq": round(1 / statistics.median(tpot), 2),
            "peak_memory_bytes": _peak_memory(device),
            "preemptions": sum(o.num_preemptions for o in outs),
        })
        print(f"  batch {b:>4}: {rows[-1]['output_tokens_per_s']:>10.1f} tok/s, "
              f"TTFT {rows[-1]['ttft_ms_median']:.1f} ms, TPOT {rows[-1]['tpot_ms_median']:.3f} ms", flush=True)
    return rows


def bench_scheme(scheme: str, config: dict, options: BenchE2EOptions, device: torch.device, keep_model: bool = False):
    """One scheme's run dict (and the model when ``keep_model``: the transformers peer copies BF16 weights)."""
    from ingot.engine import LLM
    from ingot.engine.kv_cache import kv_bytes_per_token
    from ingot.models.loader import random_model

    before = _allocated(device)
    t0 = time.perf_counter()
    model = random_model(config, scheme, device, dtype=torch.bfloat16, seed=options.seed)
    _sync(device)
    build_s = time.perf_counter() - t0
    weights_alloc = None if before is None else _allocated(device) - before
    max_b = max(options.batch_sizes)
    max_len = options.input_len + options.output_len
    blocks = max_b * math.ceil(max_len / options.block_size) + max_b
    t0 = time.perf_counter()
    llm = LLM.from_model(model, None, eos_ids=(), max_num_seqs=max_b, max_model_len=max_len, num_kv_blocks=blocks,
                         block_size=options.block_size, cuda_graphs=options.cuda_graphs,
                         async_steps=options.async_steps, prefill_graph_tokens=options.prefill_graph_tokens,
                         weight_prefetch_mb=options.weight_prefetch_mb)
    setup_s = time.perf_counter() - t0
    per_token_kv = kv_bytes_per_token(model.kv_cache_spec(), llm.kv_cache.dtype)
    read = decode_bytes_per_token(model, config)
    kv_read = int(per_token_kv * (options.input_len + options.output_len / 2))
    kinds = sorted({m.method.kind for m in model.modules() if hasattr(m, "method")})
    print(f"{scheme}: linears {kinds}, weights {read['weights'] / 1e9:.2f} GB read per decode token", flush=True)
    run = {
        "scheme": scheme,
        "linear_kinds": kinds,
        "model_build_s": round(build_s, 2),
        "engine_setup_s": round(setup_s, 2),
        "weights_allocated_bytes": weights_alloc,
        "kv_cache_bytes": llm.kv_cache.nbytes,
        "cuda_graphs": llm.runner.graphs is not None,
        "cuda_graphs_error": llm.runner.graphs_error,
        "async_steps": llm.config.async_steps,
        "prefill_graphs": None if llm.runner.prefill is None else sorted(llm.runner.prefill.graphs),
        "weight_prefetch_bytes": llm.plan.weight_prefetch_bytes,
        "weight_prefetches_per_step": None if llm.runner.graphs is None else llm.runner.graphs.prefetched,
        "kv_bytes_per_token": per_token_kv,
        "decode_read": {**read, "kv_cache_batch1": kv_read, "total": read["weights"] + kv_read},
        "batches": bench_engine_batches(llm, options, int(config["vocab_size"]), device),
    }
    del llm
    if not keep_model:
        del model
        model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run, model


# ------------------------------------------------------------------------------------------------- peer


HF_UNSTABLE = 1.25  # two timings of one identical generate call further apart than this: something recompiled


def _hf_time(hf, ids, n: int, gen: dict, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
    _sync(device)
    dt = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {n}")
    return dt


def _hf_batch(hf, b: int, config: dict, options: BenchE2EOptions, device: torch.device, gen: dict) -> dict:
    """Warm up with the very calls that are timed (output_len first: its static cache also serves the 1-token call),
    then time each twice."""
    prompts = _prompts(b, options.input_len, int(config["vocab_size"]), options.seed + b)
    ids = torch.tensor(prompts, device=device)
    lengths = (options.output_len, 1)
    with torch.inference_mode():
        warm = {n: _hf_time(hf, ids, n, gen, device) for n in lengths}
        _reset_peak(device)
        timed = {n: [_hf_time(hf, ids, n, gen, device) for _ in range(2)] for n in lengths}
    full, first = min(timed[options.output_len]), min(timed[1])
    return {
        "batch": b,
        "wall_s": round(full, 4),
        "output_tokens_per_s": round(b * options.output_len / full, 2),
        "ttft_ms": round(1e3 * first, 3),
        "tpot_ms": round(1e3 * (full - first) / (options.output_len - 1), 4),
        "peak_memory_bytes": _peak_memory(device),
        "warmup_s": {str(n): round(t, 3) for n, t in warm.items()},
        "timed_s": {str(n): [round(t, 4) for t in ts] for n, ts in timed.items()},
        "stable": all(max(ts) <= HF_UNSTABLE * min(ts) for ts in timed.values()),
    }


def _unfused_state_dict(model) -> dict[str, torch.Tensor]:
    """A BF16 ingot model's tensors under checkpoint names: the engine's fused qkv_proj / gate_up_proj
    (``fuse_projections``) split back into q/k/v and gate/up row ranges (views, no copy)."""
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".qkv_proj"):
            sizes = model.get_submodule(prefix.rpartition(".")[0]).qkv_sizes
            for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes, dim=0)):
                state[f"{prefix[: -len('qkv_proj')]}{part}.{leaf}"] = t
        elif prefix.endswith(".gate_up_proj"):
            for part, t in zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=0)):
                state[f"{prefix[: -len('gate_up_proj')]}{part}.{leaf}"] = t
        else:
            state[name] = tensor
    return state


def bench_hf(config: dict, options: BenchE2EOptions, device: torch.device, weights=None) -> dict:
    """transformers generate (static cache) on the same architecture in BF16; ``weights``: an ingot BF16 model whose
    tensors are copied in by name."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return {"status": f"skipped: transformers is not installed ({e})"}
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    try:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    except Exception as e:  # an architecture this transformers cannot build
        return {"status": f"skipped: {type(e).__name__}: {str(e)[:300]}"}
    hf.eval()
    copied = None
    if weights is not None:
        try:
            result = hf.load_state_dict(_unfused_state_dict(weights), strict=False)
            copied = {"missing": len(result.missing_keys), "unexpected": len(result.unexpected_keys),
                      "missing_examples": result.missing_keys[:5]}
        except RuntimeError as e:  # a tensor of another shape under the same name: keep the random init
            copied = {"error": str(e)[:300]}
    gen = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
    note = "compile disabled (hf_compile=False)"
    if not options.hf_compile:
        gen["disable_compile"] = True
    try:
        rows = [_hf_batch(hf, b, config, options, device, gen) for b in options.hf_batch_sizes]
        compiled = hasattr(hf, "_compiled_call")  # transformers' get_compiled_call caches it on first use
        if options.hf_compile:
            note = ("not compiled (transformers compiles only on CUDA-like devices)" if not compiled else
                    "compiled; the compile ran in the untimed warm-up calls (identical to the timed ones)")
        if compiled and not all(r["stable"] for r in rows):
            unstable = [r["timed_s"] for r in rows if not r["stable"]]
            gen["disable_compile"] = True
            rows = [_hf_batch(hf, b, config, options, device, gen) for b in options.hf_batch_sizes]
            compiled = False
            note = (f"compile disabled: with it, repeated identical calls differed by more than {HF_UNSTABLE}x "
                    f"({unstable}: a recompile inside the timing), so these numbers are eager")
        for r in rows:
            print(f"transformers batch {r['batch']:>4}: {r['output_tokens_per_s']:>10.1f} tok/s, TPOT "
                  f"{r['tpot_ms']:.3f} ms ({note})", flush=True)
    except Exception as e:
        return {"status": f"error: {type(e).__name__}: {str(e)[:300]}", "transformers": transformers.__version__}
    finally:
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "transformers": transformers.__version__, "weights_copied": copied,
            "generate": {**gen, "min_new_tokens": "= max_new_tokens"}, "static_cache": True, "compiled": compiled,
            "compile_note": note, "batches": rows}


# ------------------------------------------------------------------------------------------------ report


def _batch(run: dict, b: int) -> dict | None:
    return next((r for r in run["batches"] if r["batch"] == b), None)


def ratios_and_targets(runs: list[dict], hf: dict, bandwidth: dict) -> tuple[dict, dict]:
    """Ratios to BF16 per scheme and batch, batch-1 roofline fractions, the transformers ratio; targets pass/fail."""
    bw = bandwidth["gbps"] * 1e9
    ratios: dict = {"vs_bf16_tokens_per_s": {}, "batch1_decode_fraction_of_roofline": {}}
    targets: dict = {}
    bf16 = next((r for r in runs if r["scheme"] == "bf16"), None)
    for run in runs:
        one = _batch(run, 1)
        if one is not None:
            roofline = bw / run["decode_read"]["total"]
            run["batch1_roofline_tokens_per_s"] = round(roofline, 2)
            frac = one["decode_tokens_per_s_per_seq"] / roofline
            ratios["batch1_decode_fraction_of_roofline"][run["scheme"]] = round(frac, 3)
            goal = TARGETS["batch1_decode_fraction_of_roofline"]
            targets[f"{run['scheme']} batch-1 decode >= {goal:.0%} of roofline"] = {
                "value": round(frac, 3), "target": goal, "pass": frac >= goal}
        if bf16 is not None and run is not bf16:
            per_batch = {}
            for r in run["batches"]:
                base = _batch(bf16, r["batch"])
                if base is not None:
                    per_batch[str(r["batch"])] = round(r["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
            ratios["vs_bf16_tokens_per_s"][run["scheme"]] = per_batch
            goal = TARGETS["vs_bf16_tokens_per_s"].get(run["scheme"])
            for b in TARGETS["vs_bf16_batches"]:
                if goal is not None and str(b) in per_batch:
                    targets[f"{run['scheme']} >= {goal}x BF16 tokens/s at batch {b}"] = {
                        "value": per_batch[str(b)], "target": goal, "pass": per_batch[str(b)] >= goal}
    if bf16 is not None and hf.get("status") == "ok":
        mine, peer = _batch(bf16, 1), next((r for r in hf["batches"] if r["batch"] == 1), None)
        if mine is not None and peer is not None:
            r = mine["output_tokens_per_s"] / peer["output_tokens_per_s"]
            ratios["bf16_vs_hf_generate_batch1"] = round(r, 3)
            goal = TARGETS["bf16_vs_hf_generate_batch1"]
            targets[f"BF16 engine >= {goal}x transformers generate at batch 1"] = {
                "value": round(r, 3), "target": goal, "pass": r >= goal}
    return ratios, targets


def format_table(results: dict) -> str:
    lines = [f"{'scheme':<16}{'batch':>6}{'tok/s':>12}{'x bf16':>8}{'TTFT ms':>10}{'TPOT ms':>10}{'peak GB':>9}"]
    vs = results["ratios"]["vs_bf16_tokens_per_s"]
    for run in results["runs"]:
        for r in run["batches"]:
            ratio = vs.get(run["scheme"], {}).get(str(r["batch"]), 1.0 if run["scheme"] == "bf16" else None)
            peak = r["peak_memory_bytes"]
            lines.append(
                f"{run['scheme']:<16}{r['batch']:>6}{r['output_tokens_per_s']:>12.1f}"
                f"{'' if ratio is None else f'{ratio:.2f}':>8}{r['ttft_ms_median']:>10.1f}{r['tpot_ms_median']:>10.3f}"
                f"{'' if peak is None else f'{peak / 1e9:.1f}':>9}"
            )
    for name, t in results["targets"].items():
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']}")
    return "\n".join(lines)


def run_bench_e2e(options: BenchE2EOptions) -> dict:
    """Run the benchmark, write the JSON, print a table; returns the results dict."""
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench e2e: --device cuda but torch.cuda.is_available() is False (use --device cpu for a "
                         "smoke run)")
    config = model_config(options)
    bandwidth = measure_bandwidth(device, BANDWIDTH_BYTES if device.type == "cuda" else 64 * 2**20)
    runs, hf = [], {"status": "skipped: --no-hf"}
    for scheme in options.schemes:
        peer_now = options.hf_peer and scheme == "bf16"
        run, model = bench_scheme(scheme, config, options, device, keep_model=peer_now)
        runs.append(run)
        if peer_now:
            hf = bench_hf(config, options, device, weights=model)
            del model
    if options.hf_peer and "bf16" not in options.schemes:
        hf = bench_hf(config, options, device)
    ratios, targets = ratios_and_targets(runs, hf, bandwidth)
    results = {
        **run_stamp("e2e", options.command, [options.device], options.git_sha),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "model_config": config,
        "bandwidth": bandwidth,
        "runs": runs,
        "hf_peer": hf,
        "ratios": ratios,
        "targets": targets,
        "targets_spec": TARGETS,
    }
    path = options.out or default_results_path("e2e", device_slug(results["device"]))
    write_results(path, results)
    print(format_table(results))
    print(path)
    return results
