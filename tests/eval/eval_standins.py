"""Stand-ins with the contract's shapes: CausalLM.score, a tokenizer, LLM.generate (imported by the eval tests)."""

from __future__ import annotations

import hashlib
import re

import torch

from ingot.eval.gsm8k import Generation


class WordTokenizer:
    """Words (with their leading space) hashed into ``vocab`` ids: " A" is one token, as in real BPE vocabularies."""

    bos_token_id = None
    pad_token_id = 0

    def __init__(self, vocab: int = 512):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        words = re.findall(r"\s*\S+|\s+", text)
        return [1 + int(hashlib.md5(w.encode()).hexdigest(), 16) % (self.vocab - 1) for w in words]


class PrefixMeanLM(torch.nn.Module):
    """A tiny causal LM: logits at t from the mean embedding of tokens 0..t and the embedding of token t.

    Depends on the whole prefix (so a window's start matters) and never on later tokens (so right padding is
    invisible), like a real decoder. score(int64 [B, T]) -> float32 [B, T, vocab].
    """

    def __init__(self, vocab: int = 512, dim: int = 16, seed: int = 0, noise: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, dim, generator=g)
        self.out = torch.randn(dim * 2, vocab, generator=g) / dim**0.5
        if noise:
            self.out = self.out + noise * torch.randn(self.out.shape, generator=torch.Generator().manual_seed(seed + 1))
        self.calls = 0

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert input_ids.dtype == torch.int64 and input_ids.dim() == 2
        self.calls += 1
        e = self.emb[input_ids]  # (B, T, dim)
        prefix = e.cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return (torch.cat([prefix, e], -1) @ self.out).float() * 3.0


class StandInModel:
    """The runner's EvalModel over a PrefixMeanLM and a WordTokenizer; generate() answers from ``answers``."""

    max_len = 4096

    def __init__(self, name: str = "stand-in", seed: int = 0, noise: float = 0.0, answers=None):
        self.name = name
        self.tokenizer = WordTokenizer()
        self.lm = PrefixMeanLM(seed=seed, noise=noise)
        self.answers = answers or (lambda prompt: " I do not know.")
        self.released = False

    def load(self):
        self.loaded = True

    def score(self, input_ids):
        return self.lm.score(input_ids)

    def generate(self, prompts, max_tokens, stop):
        return [Generation(self.answers(p), 7) for p in prompts]

    def release(self):
        self.released = True
