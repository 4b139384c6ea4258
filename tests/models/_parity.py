"""Helpers of the model parity tests: fill an ingot model from a transformers model, and drive ingot's paged forward
the way an engine does (KV block pool, block tables, slot mappings, mixed prefill/decode steps, padded rows)."""

from __future__ import annotations

import re

import torch

from ingot.layers.attention import AttnMetadata


def hf_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The HF model's state dict with checkpoint names: transformers 5 fuses each MoE layer's experts into
    ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]; checkpoints (and ingot) name them
    per expert: ``mlp.experts.{e}.{gate,up,down}_proj.weight``."""
    out = {}
    for name, t in hf_model.state_dict().items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)  # transformers: gate, up = linear(x, gate_up_proj[e]).chunk(2)
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = gate
                out[f"{m.group(1)}.{e}.up_proj.weight"] = up
            else:
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
    return out


def load_from_hf(model, hf_model) -> None:
    """Copy every weight of ``hf_model`` into the ingot ``model`` (bf16 Linears have plain ``weight``s), strictly:
    a missing or unexpected name fails."""
    model.load_state_dict(hf_state_dict(hf_model), strict=True)
    model.process_weights_after_loading()


class PagedRunner:
    """Runs ``CausalLM.forward`` over a paged KV cache it owns: blocks handed out in shuffled order (a sequence's
    blocks are not contiguous), the cache pre-filled with NaN (so reading an unwritten slot poisons the output)."""

    def __init__(self, model, num_blocks: int = 48, block_size: int = 4, max_blocks: int = 12, seed: int = 0):
        self.model, self.bs, self.max_blocks = model, block_size, max_blocks
        dtype, device = model.dtype, model.lm_head.weight.device
        caches = []
        for s in model.kv_cache_spec():
            k = torch.full((num_blocks, block_size, s.num_kv_heads, s.head_dim_k), float("nan"), dtype=dtype, device=device)
            v = None if s.shared_kv else torch.full((*k.shape[:3], s.head_dim_v), float("nan"), dtype=dtype, device=device)
            caches.append((k, v))
        model.bind_kv_cache(caches)
        self.caches = caches
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, work: list[tuple[int, list[int]]], pad_rows: int = 0) -> list[torch.Tensor]:
        """work: (sequence id, its new tokens) per batch row; pad_rows padded rows (slot -1, seq_len 0) after them.
        Returns each row's logits float32 [len(new tokens), vocab]."""
        ids, pos, meta = self.prepare(work, pad_rows)
        logits = self.model.compute_logits(self.model(ids, pos, meta))
        cu = meta.cu_query_lens.tolist()
        return [logits[cu[i] : cu[i + 1]] for i in range(len(work))]

    def prepare(self, work: list[tuple[int, list[int]]], pad_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """Allocate blocks for the new tokens and build the step's (input_ids, positions, AttnMetadata)."""
        ids, pos, slots, cu, seq_lens, tables = [], [], [], [0], [], []
        for seq, tokens in work:
            start, blocks = self.lens.get(seq, 0), self.blocks.setdefault(seq, [])
            for i, t in enumerate(tokens):
                p = start + i
                if p // self.bs == len(blocks):
                    blocks.append(self.free.pop())
                ids.append(t)
                pos.append(p)
                slots.append(blocks[p // self.bs] * self.bs + p % self.bs)
            self.lens[seq] = start + len(tokens)
            cu.append(cu[-1] + len(tokens))
            seq_lens.append(self.lens[seq])
            tables.append(blocks + [0] * (self.max_blocks - len(blocks)))
        for _ in range(pad_rows):
            ids.append(0)
            pos.append(0)
            slots.append(-1)
            cu.append(cu[-1] + 1)
            seq_lens.append(0)
            tables.append([0] * self.max_blocks)
        device = self.model.lm_head.weight.device
        meta = AttnMetadata(
            cu_query_lens=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            max_query_len=max(b - a for a, b in zip(cu, cu[1:])),
            max_seq_len=max(seq_lens),
        )
        return torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta


def paged_vs_hf(model, hf_model, prompts: list[list[int]], decode_steps: int = 3) -> tuple[float, int, int]:
    """Drive ``model`` through an engine-like schedule and compare every new token's logits with ``hf_model``'s full
    forward over the same tokens. Returns (max |logit diff|, top-1 agreements, tokens compared).

    Schedule: step 1 prefills sequence 0 whole and the first half of sequence 1 (prefill path, several sequences);
    step 2 mixes the rest of sequence 1 (a chunk over cached context) with one decode token of sequence 0 and the
    whole of sequence 2; then ``decode_steps`` pure decode steps of every sequence plus one padded row (the
    fixed-shape decode path). Next tokens are HF's greedy choices.
    """
    runner = PagedRunner(model)
    seqs = [list(p) for p in prompts]
    fed = [0] * len(seqs)  # tokens of each sequence given to ingot so far
    stats = {"diff": 0.0, "agree": 0, "n": 0}

    def hf_logits(i):
        with torch.no_grad():
            return hf_model(torch.tensor([seqs[i]], device=hf_model.device)).logits[0].float()

    def check(i, got):  # got: ingot logits of the tokens fed[i] - len(got) .. fed[i] - 1 of sequence i
        ref = hf_logits(i)[fed[i] - got.shape[0] : fed[i]].to(got.device)
        stats["diff"] = max(stats["diff"], (ref - got).abs().max().item())
        stats["agree"] += int((ref.argmax(-1) == got.argmax(-1)).sum())
        stats["n"] += got.shape[0]
        if fed[i] == len(seqs[i]):  # caught up: extend with HF's greedy next token
            seqs[i].append(int(ref[-1].argmax()))

    def run(work, pad_rows=0):
        rows = [(i, seqs[i][fed[i] : fed[i] + n]) for i, n in work]
        for i, n in work:
            fed[i] += n
        for (i, _), got in zip(work, runner.step(rows, pad_rows)):
            check(i, got)

    half = len(seqs[1]) // 2
    run([(0, len(seqs[0])), (1, half)])
    run([(1, len(seqs[1]) - half), (0, 1), (2, len(seqs[2]))])
    for _ in range(decode_steps):
        run([(i, 1) for i in range(len(seqs))], pad_rows=1)
    return stats["diff"], stats["agree"], stats["n"]
