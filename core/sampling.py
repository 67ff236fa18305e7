"""Per-row decoding for a batch in which every row may have its own settings.

Each request keeps its own random generator, so a seeded request samples the same reply
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from core.config import Decoding


class RowSampler:
    """Decoding state of one request: settings, seen tokens, n-gram table, random stream."""

    def __init__(self, decoding: Decoding, prompt: list[int]):
        self.decoding = decoding
        self.generator = torch.Generator()
        if decoding.seed is not None:
            self.generator.manual_seed(decoding.seed)
        else:
            self.generator.seed()
        self.history = list(prompt)
        self.seen = set(prompt)
        self.ngrams: dict[tuple[int, ...], set[int]] = {}
        n = decoding.no_repeat_ngram_size
        if n:
            for i in range(len(prompt) - n + 1):
                self._add_ngram(i)

    def _add_ngram(self, start: int) -> None:
        n = self.decoding.no_repeat_ngram_size
        gram = self.history[start:start + n]
        self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def append(self, token: int) -> None:
        self.history.append(token)
        self.seen.add(token)
        n = self.decoding.no_repeat_ngram_size
        if n and len(self.history) >= n:
            self._add_ngram(len(self.history) - n)

    def banned(self) -> list[int]:
        n = self.decoding.no_repeat_ngram_size
        if not n or len(self.history) < n - 1:
            return []
        prefix = tuple(self.history[len(self.history) - n + 1:]) if n > 1 else ()
        return list(self.ngrams.get(prefix, ()))


def sample(rows: list[RowSampler], logits: torch.Tensor) -> list[int]:
    """Choose the next token of every row from its [batch, vocab] logits."""
    logits = logits.float()
    for i, row in enumerate(rows):
        penalty = row.decoding.repetition_penalty
        if penalty != 1.0 and row.seen:
            index = torch.tensor(list(row.seen), dtype=torch.long, device=logits.device)
            values = logits[i, index]
            logits[i, index] = torch.where(values < 0, values * penalty, values / penalty)
        banned = row.banned()
        if banned:
            logits[i, banned] = float("-inf")

    chosen = torch.empty(len(rows), dtype=torch.long)
    greedy = [i for i, row in enumerate(rows) if not row.decoding.do_sample]
    sampled = [i for i, row in enumerate(rows) if row.decoding.do_sample]
    if greedy:
        chosen[greedy] = logits[greedy].argmax(-1).cpu()
    if sampled:
        chosen[sampled] = _sample_rows([rows[i] for i in sampled], logits[sampled]).cpu()
    return chosen.tolist()


def _sample_rows(rows: list[RowSampler], logits: torch.Tensor) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([r.decoding.temperature for r in rows], device=device)
    logits = logits / temperature[:, None]
    top_k = [r.decoding.top_k for r in rows]
    vocab = logits.shape[-1]
    if all(k > 0 for k in top_k):
        kmax = min(max(top_k), vocab)
        values, index = logits.topk(kmax, dim=-1)
        ks = torch.tensor(top_k, device=device)
        values = values.masked_fill(torch.arange(kmax, device=device)[None, :] >= ks[:, None], float("-inf"))
    else:
        values, index = logits.sort(dim=-1, descending=True)
        for i, k in enumerate(top_k):
            if 0 < k < vocab:
                values[i, k:] = float("-inf")
    probs = values.softmax(-1)
    top_p = torch.tensor([r.decoding.top_p for r in rows], device=device)
    if bool((top_p < 1.0).any()):
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before > top_p[:, None], 0.0)
    cdf = probs.cumsum(-1)
    draws = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)
    pick = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
    return index.gather(1, pick).squeeze(1)
