"""A tiny causal LM that follows the ingot.models CausalLM contract, for fast engine tests on CPU.

Two layers of GQA attention (ingot.layers.attention.Attention: the paged cache path and the dense ``score`` path)
with a learned position embedding and a small MLP, float32, 64-token vocabulary. Random weights are scaled so the
greedy continuation is not a constant token."""

from __future__ import annotations

import torch
from torch import nn

from ingot.layers.attention import Attention


class ToyBlock(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.attn = Attention(heads, kv_heads, head_dim, head_dim, head_dim**-0.5)

    def forward(self, x, meta):
        lead = x.shape[:-1]
        q, k, v = self.qkv(x).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, dim=-1)
        q = q.view(*lead, self.heads, self.head_dim)
        k = k.view(*lead, self.kv_heads, self.head_dim)
        v = v.view(*lead, self.kv_heads, self.head_dim)
        x = x + self.o(self.attn(q, k, v, meta).reshape(*lead, -1))
        return x + self.mlp(x)


class ToyLM(nn.Module):
    def __init__(self, vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, max_pos=256, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = {"vocab_size": vocab, "max_position_embeddings": max_pos, "hidden_size": hidden}
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.blocks = nn.ModuleList(ToyBlock(hidden, heads, kv_heads, hidden // heads) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.mul_(8.0)
        self.eval()

    def _body(self, ids, pos, meta):
        x = self.embed(ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x, meta)
        return x

    def forward(self, input_ids, positions, meta):
        return self._body(input_ids, positions, meta)

    def compute_logits(self, hidden):
        return self.head(hidden).float()

    @torch.no_grad()
    def score(self, input_ids):
        pos = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        return self.compute_logits(self._body(input_ids, pos, None))

    def kv_cache_spec(self):
        return [b.attn.spec for b in self.blocks]

    def bind_kv_cache(self, caches):
        for block, (k, v) in zip(self.blocks, caches, strict=True):
            block.attn.bind_cache(k, v)


def greedy_reference(model, prompt: list[int], n: int, stop_ids=()) -> list[int]:
    """Plain greedy loop over model.score (no cache): the yardstick of the engine."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        nxt = int(model.score(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out
