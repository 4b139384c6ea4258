"""Weight prefetch in captured decode steps: while the small kernels between two linears run, the next linear's
weight is already being pulled into L2 (ingot.kernels.l2_prefetch) from a side stream.

A small-batch decode step is a chain of linears, each streaming its weight from HBM, with latency-bound kernels
between them (norms, rotary, attention, activation quantization) during which HBM idles. ``WeightPrefetch`` hooks
every ``Linear`` of the model while a decode graph is captured: after linear i runs, the side stream (forked from the
capture stream there) prefetches the first ``nbytes`` of linear i + 1's weight, in the order the warm-up forward
called them; the side stream joins back at the end of the forward, so the graph holds the prefetches as branches that
nothing waits on until the step ends. Prefetches are hints: outputs are the same bits with and without them.

Only the kinds it was measured to speed up are prefetched (PREFETCH_KINDS; engine NOTES; Llama-3-8B on the H100,
batch-1 TPOT): int8-channel 3.80 -> 3.66 ms, int8-block 3.77 -> 3.70 ms (session 16), int8-weight 3.657 -> 3.604 /
3.607 ms once its M = 1 GEMV was the Gluon kernel (session 18, runs off / on / off / on in one call; batch 16 5.160 /
5.135 -> 5.184 / 5.153). On the decode-like chain that chose the defaults bf16 went 177.0 -> 180.8 us per layer (its
weights are twice as large, and prefetching them evicted lines its own GEMMs were about to read), and int4-group got
slower with it in both sessions (3.006 -> 3.049 ms; with the Gluon GEMV 2.743 -> 2.797 / 2.752). fp8-block runs the
int8 block kernel's structure on e4m3 but was not measured, so it is not in the list.
"""

from __future__ import annotations

import contextlib

import torch

from ingot.kernels.l2_prefetch import l2_prefetch, supported
from ingot.layers.linear import Linear

DEFAULT_PREFETCH_MB = 16  # per linear (L2 is 50 MB on the H100); engine NOTES session 16: 16 ~ 24 > 32 end to end
PREFETCH_KINDS = ("int8-channel", "int8-block", "int8-weight")  # linears whose weights are prefetched
PREFETCH_MAX_BATCH = 16  # decode buckets up to this size get prefetches (at 64: int8-channel -1.1%, int8-block +2.6%)


def streamed_weight(linear: Linear) -> torch.Tensor:
    """The parameter a linear's GEMM streams from memory: its largest (``weight`` / ``weight_packed``)."""
    return max(linear.parameters(recurse=False), key=lambda p: p.numel() * p.element_size())


def prefetch_plan(order: list[Linear]) -> list[torch.Tensor | None]:
    """For the k-th linear call of a forward, the weight to prefetch after it: the (k + 1)-th call's, when that linear
    is of a PREFETCH_KINDS kind; None after the last call and before linears of other kinds."""
    nexts = [streamed_weight(nxt) if nxt.kind in PREFETCH_KINDS else None for nxt in order[1:]]
    return nexts + [None] if order else []


class WeightPrefetch:
    """Hooks for ``DecodeGraphs.capture``: ``recording()`` around the warm-up forward (the linears' call order),
    ``prefetching()`` around the captured forward (fork, prefetch, and the join at its end)."""

    def __init__(self, model: torch.nn.Module, nbytes: int, device: torch.device):
        if nbytes < 1:
            raise ValueError(f"WeightPrefetch: nbytes must be >= 1, got {nbytes}")
        self.linears = [m for m in model.modules() if isinstance(m, Linear)]
        self.nbytes, self.device = nbytes, torch.device(device)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.plan: list[torch.Tensor | None] = []
        self.prefetches = 0  # launched in the last prefetching() forward

    @staticmethod
    def active(device: torch.device, nbytes: int) -> bool:
        """Whether prefetching does anything here: nbytes > 0 on a GPU with the bulk prefetch (sm_90+)."""
        return nbytes > 0 and supported(device)

    @contextlib.contextmanager
    def _hooked(self, hook):
        handles = [m.register_forward_hook(hook) for m in self.linears]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def recording(self):
        """Record the order the forward inside calls the linears in; the plan follows from it."""
        order: list[Linear] = []
        with self._hooked(lambda module, args, output: order.append(module)):
            yield
        self.plan = prefetch_plan(order)

    @contextlib.contextmanager
    def prefetching(self):
        """After the k-th linear call of the forward inside, prefetch ``plan[k]`` on the side stream; join it at the
        end. A forward that calls more linears than were recorded prefetches nothing after the recorded ones."""
        main = torch.cuda.current_stream(self.device)
        calls = [0]
        self.prefetches = 0

        def hook(module, args, output):
            k = calls[0]
            calls[0] += 1
            w = self.plan[k] if k < len(self.plan) else None
            if w is None:
                return
            self.side.wait_stream(main)  # after this linear's GEMM, not before
            with torch.cuda.stream(self.side):
                l2_prefetch(w, self.nbytes)
            self.prefetches += 1

        with self._hooked(hook):
            yield
        if self.prefetches:
            main.wait_stream(self.side)
