"""DeepSeek-V3 MLA decode attention (128 query heads over one 576-channel latent KV head, values its first 512) on the
GPU: microseconds per call, replayed in a CUDA graph, by KV splits and by where the splits are combined - by the
last-arriving program of each 16-head group inside the decode launch, or by ``_combine_kernel`` after it (one
program per head; ``attention._combined_apart`` patched to pick).

Cases: batch 1 with a 256-token block table (the e2e bench's input 128 + output 128) and a 4096-token one (contexts
256 to 4096), batch 8 and 64 at 256. "default" is the splits ``default_num_splits`` gives.

What it decided: MLA's combine launch and the splits rule (kernels/attention.py, WARPS_PER_SM, COMBINE_ELEMS).

Usage (GPU): PYTHONPATH=src python3 benchmarks/scripts/mla_decode_bench.py --out FILE.json [--git-sha SHA]
"""

from __future__ import annotations

import sys
from unittest import mock

import torch

from ingot.bench.common import gpu_script_args, graph_replay_us, run_stamp, write_results
from ingot.kernels import attention

HEADS, DK, DV, PAGE = 128, 576, 512, 16
REP_MS = 40
CASES = ((1, 256, (192, 256)), (1, 4096, (256, 1024, 4096)), (8, 256, (256,)), (64, 256, (256,)))  # B, table, ctx
SPLITS = ("default", 1, 2, 4, 8, 16, 32)
COMBINE = {"in_kernel": False, "apart": True}  # what attention._combined_apart answers (for splits > 1)


def combined_apart(apart: bool):
    """A stand-in for ``attention._combined_apart`` that answers ``apart`` wherever there are splits to combine."""
    return lambda group, head_dim_v, num_splits: apart and num_splits > 1


def main() -> int:
    args = gpu_script_args()
    torch.manual_seed(0)
    rows = []
    for b, capacity, contexts in CASES:
        width = capacity // PAGE
        cache = torch.randn(b * width + 1, PAGE, 1, DK, device="cuda", dtype=torch.bfloat16)
        tables = torch.arange(b * width, device="cuda", dtype=torch.int32).view(b, width)
        q = torch.randn(b, HEADS, DK, device="cuda", dtype=torch.bfloat16)
        for ctx in contexts:
            lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
            row = {"batch": b, "table_tokens": capacity, "context": ctx, "us": {}}
            for where, apart in COMBINE.items():
                with mock.patch.object(attention, "_combined_apart", combined_apart(apart)):
                    for splits in SPLITS:
                        n = None if splits == "default" else splits
                        if n and n * 32 > capacity:
                            continue
                        call = lambda: attention.paged_decode_attention(  # noqa: E731
                            q, cache, None, tables, lens, DK ** -0.5, DV, num_splits=n)
                        row["us"][f"{where} splits {splits}"] = graph_replay_us(call, REP_MS)
            rows.append(row)
            print(row, flush=True)
    write_results(args.out, {
        **run_stamp("mla_decode", "python3 " + " ".join(sys.argv), ["cuda"], args.git_sha),
        "timer": f"triton.testing.do_bench_cudagraph(rep={REP_MS} ms), median us per call",
        "heads": HEADS, "dk": DK, "dv": DV, "page": PAGE, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
