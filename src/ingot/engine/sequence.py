"""Sequence: one request's tokens, status, cache blocks and progress through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ingot.engine.sampling import SamplingParams, SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its cache freed; it is recomputed when re-admitted)
    RUNNING = "running"  # holds cache blocks, scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler and runner see it.

    token_ids: prompt then generated tokens. num_pending: tokens sampled on the device but not read yet (at most 1
    when a step is scheduled, 2 while step t + 1 is queued and step t not read yet:
    the engine launches step t + 1 before it reads step t's tokens; the pending token is the last one, at position
    len(token_ids), and the next step takes it from the device). num_computed_tokens: how many of the num_tokens
    (token_ids plus pending) have their K/V in the cache (the next step computes the rest, the scheduler may cut
    that into chunks). block_table: cache block ids holding tokens [i * block_size, (i + 1) * block_size).
    Identity is the object (eq=False).
    """

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState = field(default_factory=SamplingState)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos, stop token or string), "length" (max_tokens or max_model_len)
    num_preemptions: int = 0
    num_pending: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt has no tokens")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler sees: token_ids plus the pending one."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens read so far (the pending one not counted)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a generated token (read from the device: it was the pending one, if one was)."""
        if self.num_pending:
            self.num_pending -= 1
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(int(token_id))
