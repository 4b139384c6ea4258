"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a budget of ``max_num_batched_tokens`` new tokens. Running sequences go first, in admission order:
each decodes one token or continues its (chunked) prefill. Then waiting sequences are admitted first-come
first-served while the budget, ``max_num_seqs`` and free cache blocks allow; a prompt longer than what is left of
the budget is prefilled in chunks over several steps. Prefill chunks and decodes share one batch.

When a running sequence needs a block and none is free, the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed (prompt plus the tokens it had
generated) when re-admitted. Its generated tokens are kept, so greedy output is unchanged by preemption.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ingot.engine.kv_cache import BlockAllocator
from ingot.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: sequences in a batch at most; max_num_batched_tokens: new tokens per step at most;
    max_model_len: prompt plus output tokens of one sequence at most; block_size: tokens per cache block."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {v!r}")


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """seq computes token_ids[start : start + num_new_tokens] this step (start = its num_computed_tokens then).
    samples: the chunk reaches the sequence's last token, so its logits give the next token (fixed when scheduled:
    the sequence grows afterwards)."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, n: int) -> "ScheduledSeq":
        return cls(seq, seq.num_computed_tokens, n, seq.num_computed_tokens + n == seq.num_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token (the CUDA-graph path)."""
        return bool(self.scheduled) and all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        if allocator.num_blocks * config.block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {allocator.num_blocks} blocks x {config.block_size} = "
                f"{allocator.num_blocks * config.block_size} tokens, fewer than max_model_len {config.max_model_len}: "
                "one sequence could never finish (lower max_model_len or give the cache more memory)"
            )
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"sequence {seq.seq_id}: prompt of {seq.num_tokens} tokens leaves no room for output under "
                f"max_model_len {self.config.max_model_len}"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size) - len(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and chunk lengths, allocating the blocks they need."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # Runs once per step over every running sequence (256 at full batch): attributes are read directly, and a
        # decode that stays inside its last block (15 steps in 16) allocates nothing.
        i, bs, running, allocator = 0, self.config.block_size, self.running, self.allocator
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.num_pending and self._ends_with_pending(seq):
                i += 1  # its last token is on the way: it finishes when the engine reads it, nothing to compute
                continue
            start, total = seq.num_computed_tokens, seq.num_tokens
            n = min(total - start, budget)
            need = -(-(start + n) // bs) - len(seq.block_table)
            if need > 0:
                while need > allocator.num_free and running[-1] is not seq:
                    victim = running[-1]  # the latest admitted, never one already scheduled (they sit before i)
                    self._preempt(victim)
                    preempted.append(victim)
                if need > allocator.num_free:  # seq is the last one running and still does not fit
                    self._preempt(seq)
                    preempted.append(seq)
                    break
                seq.block_table.extend(allocator.allocate(need))
            scheduled.append(ScheduledSeq(seq, start, n, start + n == total))
            budget -= n
            i += 1

        # Admit new work only when nothing was preempted: a freed block goes back to the sequences already running.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            need = self._blocks_needed(seq, seq.num_computed_tokens + n)
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_table.extend(self.allocator.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq.of(seq, n))
            budget -= n
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """The pending token is the sequence's last: max_tokens or max_model_len is reached with it."""
        return seq.num_output_tokens + seq.num_pending >= seq.params.max_tokens or \
            seq.num_tokens >= self.config.max_model_len

    def launched(self, output: SchedulerOutput) -> None:
        """A step was launched: its chunks count as computed, and each sequence that samples gets a pending token
        (so the next step can be scheduled before this one's tokens are read)."""
        for s in output.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            if s.samples:
                s.seq.num_pending += 1

    def update(self, output: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """After a step, synchronously: ``launched`` then append one sampled token to each sequence that sampled
        (``sampled`` in the order of ``output.scheduled`` rows with ``samples``). Returns those sequences."""
        sampling = [s.seq for s in output.scheduled if s.samples]
        if len(sampled) != len(sampling):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(sampling)} sampling sequences")
        self.launched(output)
        for seq, token in zip(sampling, sampled):
            seq.append_token(token)
        return sampling

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (stop condition met, or aborted): its blocks return to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_pending = 0  # a token still on the way (a step launched before the stop was seen) is dropped
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()
