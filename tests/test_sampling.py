"""Sampling: transformers' own warpers' arithmetic, computed faster; unseeded draws follow the
distribution (seeded ones are `generate`'s own: tests/test_generator_archs.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from core.config.schema import Decoding
from core.engine.sampling import RowSampler, _warp, sample


def transformers_warpers(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.timeout(60)
def test_warping_keeps_what_transformers_keeps_however_the_scores_tie():
    """Top-p sorts a vocabulary's scores faster than torch.sort (and after top-k only the kept few);
    the result is transformers' own, bit for bit, also when equal scores meet at the top-k or top-p
    cut (scores rounded to a few values tie everywhere) and when a row has banned (-inf) tokens."""
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for rows, vocab, rounding in ((4, 49152, None), (8, 500, 2.0), (8, 500, 0.5), (8, 60, None)):
        scores = torch.randn(rows, vocab, generator=generator) * 4
        if rounding:
            scores = torch.round(scores * rounding) / rounding
        scores[0, : vocab // 2] = float("-inf")
        for temperature in (1.0, 0.7):
            for top_k in (0, 1, 5, 50, 59, 60):
                for top_p in (0.5, 0.9, 0.99, 1.0):
                    wanted = transformers_warpers(scores.clone(), temperature, top_k, top_p)
                    assert torch.equal(_warp(scores, temperature, top_k, top_p), wanted), (vocab, top_k, top_p)
                    checked += 1
    assert checked == 4 * 2 * 6 * 4


@pytest.mark.timeout(60)
def test_top_p_of_a_peaked_distribution_is_transformers_own():
    """A chat persona at a low temperature (the default: 0.3, top-p 0.9) keeps a handful of tokens:
    top-p settles such a row from its highest scores, without sorting the vocabulary. Bit for bit
    transformers' result, on rows whose cut lies among the few, rows with a cumulative sum a hair
    from the cut, equal scores on both sides of the cut, banned tokens, and flat rows (sorted)."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 49152, generator=generator) * 3
    rows[1::4] = torch.round(rows[1::4] * 2) / 2  # many equal scores, at the cut too
    rows[2::4, :1000] = float("-inf")  # banned tokens
    rows[3::8] *= 0.1  # flat: the cut lies far below the highest few
    peaked = 0
    # Cuts exactly at a cumulative sum, as transformers computes it (it removes that token), and a
    # hair either side of it: one row at a time, for the highest few tokens of peaked rows.
    for row in rows[0:48:6] / 0.3:
        ascending = row.sort().values.softmax(-1).cumsum(-1)
        for place in (-2, -3, -4):
            for nudge in (0.0, 2e-6, -2e-6):
                top_p = 1 - float(ascending[place]) + nudge
                wanted = transformers_warpers(row[None].clone(), 1.0, 0, top_p)
                assert torch.equal(_warp(row[None], 1.0, 0, top_p), wanted), (place, nudge)
                peaked += 1
    for temperature in (0.3, 0.7, 1.0):
        for top_p in (0.5, 0.9, 0.99):
            scores = rows / temperature
            wanted = transformers_warpers(rows.clone(), temperature, 0, top_p)
            assert torch.equal(_warp(rows, temperature, 0, top_p), wanted), (temperature, top_p)
            peaked += int((scores.softmax(-1).topk(64).values.sum(-1) > top_p + 1e-3).sum())
    assert peaked > 8 * 9 + 64 * 9 // 4  # many of these rows have their cut among the highest few
    for vocab in (1, 2, 3):  # fewer scores than the few
        tiny = torch.randn(3, vocab, generator=generator)
        assert torch.equal(_warp(tiny, 1.0, 0, 0.5), transformers_warpers(tiny.clone(), 1.0, 0, 0.5)), vocab


@pytest.mark.timeout(60)
def test_unseeded_draws_follow_the_warped_distribution():
    """An unseeded request draws among the tokens top-k/top-p keep, as often as their probabilities say."""
    logits = torch.full((1, 1000), -5.0)
    logits[0, [10, 500, 999]] = torch.tensor([2.0, 1.0, 0.0])
    row = RowSampler(Decoding(do_sample=True, temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, max_new_tokens=1), [1, 2])
    row.generator.manual_seed(0)
    draws = [sample([row], logits)[0] for _ in range(3000)]
    assert set(draws) <= {10, 500, 999}
    expected = logits[0, [10, 500, 999]].softmax(-1) * len(draws)
    for token, mean in zip((10, 500, 999), expected.tolist()):
        spread = (mean * (1 - mean / len(draws))) ** 0.5
        assert abs(draws.count(token) - mean) < 5 * spread, (token, draws.count(token), mean)
