"""LLM: load a checkpoint, then generate or stream text for many prompts at once (continuous batching).

    llm = LLM("path/to/model")                      # any format ingot reads; CUDA if present, else CPU
    outs = llm.generate(["Hello", "2 + 2 ="], SamplingParams(max_tokens=32))
    for delta in llm.stream(["Tell me a story"], SamplingParams(max_tokens=200, temperature=0.7, seed=1)):
        print(delta.text, end="")

One step of the loop: Scheduler.schedule -> ModelRunner.execute -> Sampler.sample_tokens (queued on the device) ->
Scheduler.launched; then the previous step's tokens are read -> appended -> stop checks (eos ids, stop token ids,
stop strings, max_tokens, max_model_len) -> incremental text.

Overlap (``EngineConfig.async_steps``, on by default): step t + 1 is scheduled and queued before step t's tokens
are read, so the host's bookkeeping (reading, stop checks, text, scheduling, input buffers) runs while the GPU
computes instead of between two steps. A sequence whose sampled token is not read yet has a pending token
(``Sequence.num_pending``); the next step takes it from the device (``runner.PendingTokens``). What it costs: a
sequence that stops on eos, a stop id or a stop string (only seen when read) has already been scheduled once more;
that row's work is discarded (max_tokens and max_model_len are known ahead, and cost nothing). Outputs are the same
as without overlap: each row's computation and its sampling generator are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ingot.engine.config import EngineConfig, eos_token_ids, plan_engine
from ingot.engine.detokenizer import IncrementalDetokenizer
from ingot.engine.kv_cache import KVCache
from ingot.engine.decode_graphs import PendingTokens
from ingot.engine.runner import ModelRunner, RunnerConfig
from ingot.engine.sampling import Sampler, SamplingParams, TokenReadback, find_stop
from ingot.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ingot.engine.sequence import Sequence

@dataclass
class RequestOutput:
    """A finished request. text excludes stop strings and special tokens; token_ids are all generated ids (the eos
    or stop token included). Times in seconds from the request's arrival."""

    index: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft_s: float | None = None
    latency_s: float | None = None
    num_preemptions: int = 0


@dataclass
class StreamDelta:
    """What a request produced in one engine step: new text and ids; finish_reason set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Launched:
    """A step queued on the device whose sampled tokens are not read yet."""

    out: SchedulerOutput
    sampling: list[Sequence]  # the sequences that sample, in the order of the sampled ids
    tokens: TokenReadback


@dataclass
class _Request:
    index: int
    seq: Sequence
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    holdback: int = 0  # characters kept back while streaming: the start of a stop string may be forming
    stops: tuple[str, ...] = field(default=())


class LLM:
    """Generation over a paged KV cache with continuous batching.

    path: a model directory (loaded with ingot.models.loader.load_model; tokenizer and generation_config.json from
    the same directory). Keyword arguments are EngineConfig's fields (device, dtype, mem_fraction, max_num_seqs,
    max_model_len, max_num_batched_tokens, block_size, num_kv_blocks, cuda_graphs, async_steps, fp8_fallback, seed); how they
    resolve for the model and device: ingot.engine.config.plan_engine.
    """

    def __init__(self, path: str | Path, **engine_kwargs):
        from transformers import AutoTokenizer

        from ingot.models.loader import load_model

        config = EngineConfig(**engine_kwargs)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(Path(path), device=device, dtype=config.dtype, fp8_fallback=config.fp8_fallback)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._setup(model, tokenizer, eos_token_ids(Path(path), tokenizer), config)

    @classmethod
    def from_model(cls, model, tokenizer=None, eos_ids: tuple[int, ...] = (), **engine_kwargs) -> "LLM":
        """An engine over an already built model (random weights for benchmarks). Without a tokenizer, prompts must
        be token ids and outputs carry no text."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, tuple(eos_ids), EngineConfig(**engine_kwargs))
        return llm

    def _setup(self, model, tokenizer, eos_ids: tuple[int, ...], config: EngineConfig) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.device = next(model.parameters()).device
        if callable(getattr(model, "fuse_projections", None)):  # q/k/v and gate/up as one GEMM each
            model.fuse_projections()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the unfused copies: free memory sizes the KV cache
        plan = plan_engine(model, config, self.device)
        max_model_len, bs = plan.max_model_len, plan.block_size
        self.config, self.plan, self.max_model_len = config, plan, max_model_len
        self.kv_cache = KVCache(model.kv_cache_spec(), plan.num_blocks, bs, plan.cache_dtype, self.device)
        sched = SchedulerConfig(plan.max_num_seqs, plan.max_num_batched_tokens, max_model_len, bs)
        self.scheduler = Scheduler(sched, self.kv_cache.allocator)
        runner = RunnerConfig(plan.max_num_seqs, max_model_len, config.cuda_graphs, plan.prefill_graph_tokens,
                              plan.weight_prefetch_bytes)
        self.runner = ModelRunner(model, self.kv_cache, runner)
        self.sampler = Sampler(config.seed)
        self._next_id = 0
        self._inflight: _Launched | None = None  # async_steps: the step queued last, its tokens not read yet

    # ------------------------------------------------------------------------------------------- requests

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this LLM has no tokenizer: give prompts as lists of token ids")
            return list(self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ([{"role": "user", "content": ...}, ...]) through the tokenizer's chat
        template, ending with the assistant's turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _add(self, index: int, prompt, params: SamplingParams) -> _Request:
        ids = self.encode(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index}: {len(ids)} tokens, max_model_len is {self.max_model_len}")
        seq = Sequence(self._next_id, ids, params, self.sampler.new_state(params, self.device))
        self._next_id += 1
        self.scheduler.add(seq)
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        stops = params.stop
        return _Request(index, seq, detok, holdback=max((len(s) for s in stops), default=1) - 1, stops=stops)

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        seq, params = req.seq, req.seq.params
        if (not params.ignore_eos and token in self.eos_ids) or token in params.stop_token_ids:
            return "stop"
        if req.detok is not None:
            new = req.detok.add(token)
            req.text += new
            if req.stops and new:
                cut = find_stop(req.text, req.stops, len(new))
                if cut is not None:
                    req.text = req.text[:cut]
                    return "stop"
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _launch(self, out: SchedulerOutput, pending: PendingTokens | None) -> _Launched:
        """Queue a step and its sampling on the device (nothing here waits for it)."""
        logits = self.runner.execute(out, pending)
        sampling = [s.seq for s in out.scheduled if s.samples]
        tokens = self.sampler.sample_tokens(logits, [q.params for q in sampling], [q.sampling for q in sampling])
        self.scheduler.launched(out)
        return _Launched(out, sampling, TokenReadback(tokens))

    def _land(self, step: _Launched, requests: dict[int, _Request]) -> list[_Request]:
        """Read a launched step's tokens (the step's one read from the device), append them and check the stops;
        returns the requests that got a token. A sequence finished meanwhile (a stop seen in the step before)
        drops its token."""
        if not step.sampling:
            return []  # a prefill chunk that ends no prompt: nothing to read back
        touched = []
        for seq, token in zip(step.sampling, step.tokens.read()):
            if seq.is_finished:
                continue
            seq.append_token(token)
            req = requests[seq.seq_id]
            reason = self._finish_reason(req, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            touched.append(req)
        return touched

    def _step(self, requests: dict[int, _Request]) -> list[_Request]:
        """One engine step: schedule and queue the next step, then read the step before it (async_steps), or read
        this one (no overlap). Returns the requests that got a token; everything but the one read is host
        bookkeeping over Python lists."""
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        step = None
        if out.scheduled:
            pending = None if prev is None else PendingTokens(prev.tokens.device_tokens, prev.sampling)
            step = self._launch(out, pending)
        elif prev is None:
            raise RuntimeError("the scheduler found nothing to run while sequences are unfinished")
        touched = [] if prev is None else self._land(prev, requests)
        if step is not None and self.config.async_steps:
            self._inflight = step
        elif step is not None:
            touched = self._land(step, requests)
        return touched

    def _start(self, prompts, params) -> dict[int, _Request]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        if self.scheduler.has_unfinished():
            raise RuntimeError("LLM: another generation is still running on this engine")
        requests: dict[int, _Request] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, plist)):
                req = self._add(i, prompt, p)
                requests[req.seq.seq_id] = req
        except BaseException:
            self._abort(requests)
            raise
        return requests

    def _abort(self, requests: dict[int, _Request]) -> None:
        if self._inflight is not None:  # its tokens are dropped; its sequences are finished below
            self._inflight.tokens.read()
            self._inflight = None
        for req in requests.values():
            if not req.seq.is_finished:
                self.scheduler.finish(req.seq, "abort")

    def _run(self, requests: dict[int, _Request]) -> Iterator[list[_Request]]:
        """Step until every request is finished, yielding the requests that got a token in each step."""
        try:
            while self.scheduler.has_unfinished() or self._inflight is not None:
                yield self._step(requests)
        finally:  # a consumer that stops early (or an error) must not leave sequences holding cache blocks
            self._abort(requests)

    @staticmethod
    def _delta(req: _Request) -> StreamDelta:
        done = req.seq.is_finished
        visible = len(req.text) if done else max(req.emitted_chars, len(req.text) - req.holdback)
        text = req.text[req.emitted_chars : visible]
        ids = req.seq.token_ids[req.seq.num_prompt_tokens + req.emitted_tokens :]
        req.emitted_chars, req.emitted_tokens = visible, req.seq.num_output_tokens
        return StreamDelta(req.index, text, ids, req.seq.finish_reason if done else None)

    # ------------------------------------------------------------------------------------------- public

    def stream(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[StreamDelta]:
        """Run the prompts to completion, yielding each request's new text and token ids after every step that gave
        it a token; its last delta carries finish_reason. While stop strings are set, text lags by
        len(longest stop) - 1 characters (a stop string may be forming), released when the request ends."""
        run = self._run(self._start(prompts, params))
        try:
            for touched in run:
                for req in touched:
                    yield self._delta(req)
        finally:
            run.close()  # at once, not at garbage collection: an early exit frees the cache blocks now

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (one SamplingParams for all, or one each); outputs in prompt order."""
        requests = self._start(prompts, params)
        for _ in self._run(requests):  # no per-step deltas: only the finished requests are read
            pass
        outputs = []
        for req in sorted(requests.values(), key=lambda r: r.index):
            seq = req.seq
            outputs.append(RequestOutput(
                index=req.index,
                prompt_token_ids=seq.prompt_token_ids,
                text=req.text,
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
                latency_s=None if seq.finish_time is None else seq.finish_time - seq.arrival_time,
                num_preemptions=seq.num_preemptions,
            ))
        return outputs
