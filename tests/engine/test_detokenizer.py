"""IncrementalDetokenizer: the streamed pieces of any output join into decode(output), on both paths (the tokenizers
library's DecodeStream and the two-window fallback), multi-byte characters split across tokens included."""

from __future__ import annotations

import pytest

from ingot.engine.detokenizer import IncrementalDetokenizer

TEXT = "def f(x):\n    return x  # héllo wörld, 日本語 🙂 ok.\nThe  end"


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir))


@pytest.mark.parametrize("stream", [True, False])
def test_pieces_join_into_the_full_decode(tokenizer, stream):
    ids = tokenizer.encode(TEXT)
    for cut in (1, 7, len(ids) // 2):
        prompt, out = ids[:cut], ids[cut:]
        d = IncrementalDetokenizer(tokenizer, prompt)
        assert (d._stream is not None) is True  # a fast tokenizer: the streaming decoder
        if not stream:
            d._stream = None
        pieces = [d.add(t) for t in out]
        assert "".join(pieces) == tokenizer.decode(out)
        assert "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("stream", [True, False])
def test_an_id_beyond_the_vocabulary_adds_no_text(tokenizer, stream):
    """A model's padded vocabulary rows (random-weight models can sample them): no error, no text, the rest intact."""
    ids = tokenizer.encode("Hello there, general")
    d = IncrementalDetokenizer(tokenizer, ids[:1])
    if not stream:
        d._stream = None
    text = d.add(ids[1]) + d.add(len(tokenizer) + 1000)
    text += "".join(d.add(t) for t in ids[2:])
    assert text == tokenizer.decode(ids[1:])
