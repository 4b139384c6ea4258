"""Sampler: greedy, seeds, top-k / top-p masks, stop-string search, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from ingot.engine.sampling import Sampler, SamplingParams, apply_top_k_top_p, find_stop


def probs_logits(*p):
    return torch.tensor([math.log(x) for x in p], dtype=torch.float32)


def test_params_validation_names_the_field():
    for kwargs, field in [
        ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"stop": [""]}, "stop"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_greedy_is_argmax_and_ignores_the_engine_seed():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 5
    a = Sampler(seed=1).sample(logits, params, [Sampler().new_state(p, torch.device("cpu")) for p in params])
    b = Sampler(seed=2).sample(logits, params, [Sampler().new_state(p, torch.device("cpu")) for p in params])
    assert a == b == logits.argmax(-1).tolist()


def test_top_k_top_p_masks():
    row = probs_logits(0.5, 0.3, 0.15, 0.05)
    logits = torch.stack([row, row, row, row, row.flip(0)])
    top_k = torch.tensor([2, 0, 0, 1, 0])
    top_p = torch.tensor([1.0, 0.75, 0.45, 1.0, 0.75])
    kept = apply_top_k_top_p(logits, top_k, top_p).isfinite()
    assert kept.tolist() == [
        [True, True, False, False],  # top-2
        [True, True, False, False],  # 0.5 + 0.3 reaches 0.75
        [True, False, False, False],  # 0.5 alone reaches 0.45
        [True, False, False, False],  # top-1
        [False, False, True, True],  # the same on a reversed row: masks follow the values, not the positions
    ]
    masked = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(masked[kept], logits[kept])  # kept logits are unchanged
    # the most likely token is kept even when top_p is tiny
    tiny_p = apply_top_k_top_p(row[None], torch.tensor([0]), torch.tensor([1e-6]))
    assert tiny_p.isfinite().tolist() == [[True] + [False] * 3]


def _draw(seed, logits, n, **kw):
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, seed=seed, **kw)
    state = sampler.new_state(p, torch.device("cpu"))
    return [sampler.sample(logits[None], [p], [state])[0] for _ in range(n)]


def test_seeded_requests_reproduce_and_differ_by_seed():
    logits = torch.zeros(1000)  # uniform: two seeds agreeing on 20 draws by chance is ~1e-60
    assert _draw(7, logits, 20) == _draw(7, logits, 20)
    assert _draw(7, logits, 20) != _draw(8, logits, 20)


def test_a_rows_draws_do_not_depend_on_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 200, generator=g)
    sampler = Sampler()
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=123)
    alone_state = sampler.new_state(seeded, torch.device("cpu"))
    alone = [sampler.sample(logits[1:2], [seeded], [alone_state])[0] for _ in range(10)]
    others = [SamplingParams(temperature=1.0, top_k=5), seeded, SamplingParams()]
    states = [sampler.new_state(p, torch.device("cpu")) for p in others]
    batched = [sampler.sample(logits, others, states)[1] for _ in range(10)]
    assert alone == batched


def test_sampled_frequencies_follow_temperature_and_top_k():
    logits = probs_logits(0.6, 0.3, 0.1)
    draws = _draw(0, logits, 3000)
    freq = [draws.count(i) / 3000 for i in range(3)]
    assert abs(freq[0] - 0.6) < 0.04 and abs(freq[1] - 0.3) < 0.04 and abs(freq[2] - 0.1) < 0.03
    assert set(_draw(0, logits, 300, top_k=2)) == {0, 1}
    hot = Sampler()  # temperature 0.1 sharpens 0.6 : 0.3 into ~1000 : 1
    p = SamplingParams(temperature=0.1, seed=3)
    st = hot.new_state(p, torch.device("cpu"))
    assert sum(hot.sample(logits[None], [p], [st])[0] == 0 for _ in range(300)) >= 295


def test_find_stop():
    assert find_stop("hello world", ("wor",), new_chars=5) == 6
    assert find_stop("hello world", ("xyz", "o w", "ld"), new_chars=11) == 4  # earliest wins
    assert find_stop("hello world", ("hello",), new_chars=2) is None  # ended before the new characters
    assert find_stop("ab", ("b",), new_chars=1) == 1
