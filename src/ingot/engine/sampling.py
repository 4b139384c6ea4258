"""Sampling: what a request asks for (SamplingParams), how the next token is drawn (Sampler), and when a sequence
stops (eos, max_tokens, stop strings).

Greedy (temperature 0) is argmax and deterministic. Otherwise logits / temperature, then top-k, then top-p masks,
then one draw per row from its own torch.Generator: a request with a seed gets the same tokens whatever else runs
in the batch (the draw of a row never depends on another row's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings.

    max_tokens: new tokens at most (finish_reason "length"). temperature: 0 = greedy. top_p: nucleus mass kept
    (1.0 = all). top_k: most likely tokens kept (0 = all). seed: per-request generator seed (None: drawn from the
    engine's generator). stop: strings that end the output (excluded from the text; finish_reason "stop").
    ignore_eos: keep going past eos tokens (benchmarks with fixed output lengths). stop_token_ids: extra ids that
    end the output like eos.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingState:
    """Per-sequence sampler state: the generator of a sampled (non-greedy) request, made once."""

    generator: torch.Generator | None = field(default=None, repr=False)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p sets with -inf.

    logits: float32 [n, V] (already divided by temperature); top_k: int64 [n] (0 = off); top_p: float32 [n]
    (1.0 = off). The top-p set is the smallest set of most likely tokens whose probability reaches top_p (the most
    likely token is always kept). Returns a new float32 [n, V].
    """
    n, vocab = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand(n, vocab)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    drop = ranks >= k[:, None]  # outside the top k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop |= mass_before >= top_p[:, None]  # already reached top_p without this token
    drop[:, 0] = False
    masked_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked_sorted)


class Sampler:
    """Draws the next token of each row from float32 logits [n, V]."""

    def __init__(self, seed: int = 0):
        self._engine_gen = torch.Generator().manual_seed(seed)  # seeds requests that bring none

    def new_state(self, params: SamplingParams, device: torch.device) -> SamplingState:
        if params.greedy:
            return SamplingState()
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._engine_gen))
        return SamplingState(torch.Generator(device=device).manual_seed(seed))

    def sample_tokens(self, logits: torch.Tensor, params: list[SamplingParams],
                      states: list[SamplingState]) -> torch.Tensor:
        """logits float32 [n, V] (one row per sequence that samples), params/states per row -> int64 [n] token ids
        on the logits' device, not read back: the caller reads them when it needs them (``TokenReadback``)."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} must be [n, V] with n = {len(params)} params and states")
        out = logits.argmax(dim=-1)  # greedy rows are final; sampled rows are overwritten below
        rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
        if rows:
            dev = logits.device
            idx = host_to_device(rows, torch.int64, dev)
            temps = host_to_device([params[i].temperature for i in rows], torch.float32, dev)
            top_k = host_to_device([params[i].top_k for i in rows], torch.int64, dev)
            top_p = host_to_device([params[i].top_p for i in rows], torch.float32, dev)
            scaled = logits.index_select(0, idx).float() / temps[:, None]
            if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)
            for j, i in enumerate(rows):  # one draw per row from its own generator: independent of the batch
                out[i] = torch.multinomial(probs[j], 1, generator=states[i].generator)[0]
        return out

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], states: list[SamplingState]) -> list[int]:
        """``sample_tokens``, read back at once (a sync): n token ids."""
        if not params:
            return []  # a prefill chunk that ends no prompt: nothing to read back
        return self.sample_tokens(logits, params, states).tolist()


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without waiting for the device: on CUDA through pinned memory
    and a non-blocking copy (a pageable copy may wait for the work queued before it, which would stall the host
    while a step runs)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class TokenReadback:
    """Sampled ids on their way to the host: on CUDA a non-blocking copy into pinned memory and an event, so the host
    can queue the next step before it waits for these ids; on CPU the tensor itself."""

    def __init__(self, tokens: torch.Tensor):
        self.device_tokens = tokens  # int64 [n]: the next step's input ids of these sequences
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tokens, None

    def read(self) -> list[int]:
        """The ids (waits for the copy: the step's one device-to-host read)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """Index in ``text`` where the earliest stop string begins, looking only where the last ``new_chars`` characters
    could complete one (earlier text was checked before); None if none."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best
