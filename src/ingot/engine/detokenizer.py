"""Incremental detokenization: the text each new token adds, without re-decoding the whole output every step.

Decoding a token alone is wrong for byte-level BPE (a multi-byte character spans tokens) and for SentencePiece
(a leading space depends on the token before). So each step decodes a short window: the tokens since the last
emitted text (from ``prefix``) with and without the new ones, and emits the difference once it no longer ends in
an incomplete character (U+FFFD). The window starts with the last few prompt tokens so the first output token
sees its left context too. Cost per token: two decodes of a handful of tokens, whatever the output length.
"""

from __future__ import annotations

PROMPT_CONTEXT = 5  # prompt tokens kept as left context (vLLM uses 5 as well)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before `read` have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one output token; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""
