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
