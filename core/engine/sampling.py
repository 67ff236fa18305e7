"""Per-row decoding for a batch in which every row may have its own settings.

The arithmetic is transformers' own (`generate`'s processors and warpers, in its order), and each
request keeps its own random generator: a seeded request samples the same reply whatever else
shares its batch, and the same reply as `torch.manual_seed(seed); model.generate(...)`.
"""

from __future__ import annotations

from itertools import groupby

import numpy
import torch

from core.config.schema import Decoding


class RowSampler:
    """Decoding state of one request: settings, seen tokens, n-gram table, random stream."""

    def __init__(self, decoding: Decoding, prompt: list[int], device: torch.device | str = "cpu"):
        self.decoding = decoding
        self.generator = torch.Generator(device=device)
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

    @property
    def warping(self) -> tuple[float, int, float]:
        """The settings that shape the distribution; rows that share them are warped together."""
        d = self.decoding
        return d.temperature, d.top_k, d.top_p


def sample(rows: list[RowSampler], logits: torch.Tensor) -> list[int]:
    """Choose the next token of every row from its [batch, vocab] logits."""
    scores = logits.to(dtype=torch.float32, copy=True)
    for i, row in enumerate(rows):
        penalty = row.decoding.repetition_penalty
        if penalty != 1.0 and row.seen:
            index = torch.tensor(list(row.seen), dtype=torch.long, device=scores.device)
            values = scores[i, index]
            scores[i, index] = torch.where(values < 0, values * penalty, values / penalty)
        banned = row.banned()
        if banned:
            scores[i, banned] = float("-inf")

    chosen = [0] * len(rows)
    greedy = [i for i, row in enumerate(rows) if not row.decoding.do_sample]
    if greedy:
        for i, token in zip(greedy, scores[greedy].argmax(-1).tolist()):
            chosen[i] = token
    sampled = sorted((i for i, row in enumerate(rows) if row.decoding.do_sample), key=lambda i: rows[i].warping)
    for warping, group in groupby(sampled, key=lambda i: rows[i].warping):
        group = list(group)
        probs = _warp(scores[group], *warping).softmax(-1)
        for offset, i in enumerate(group):
            row = rows[i]
            if row.decoding.seed is None:
                chosen[i] = _draw(probs[offset], row.generator)
            else:
                chosen[i] = int(torch.multinomial(probs[offset:offset + 1], 1, generator=row.generator))
    return chosen


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs`, reading only the tokens that can be drawn (after top-k/top-p, a few).

    The same distribution as `torch.multinomial` over the whole vocabulary, which draws a random number
    per vocabulary entry (0.9 ms a row for GPT-2's 50,257; 30 ms a step for 32 rows). A seeded request
    keeps `torch.multinomial`'s own draws instead, so that it samples what `generate` samples."""
    candidates = probs.nonzero().squeeze(-1)
    return int(candidates[torch.multinomial(probs[candidates], 1, generator=generator)])


def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p as transformers' warpers compute them (one setting for all rows)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.size(-1))
        if top_p < 1.0 and k < scores.size(-1):
            top = torch.topk(scores, k + 1)
            beyond, kth = top.values[:, k], top.values[:, k - 1]
            if not bool(((beyond == kth) & torch.isfinite(beyond)).any()):  # no row keeps more than k
                return _top_p_of_the_few(scores, top_p, top.values[:, :k], top.indices[:, :k])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p < 1.0:
        if top_k:  # after top-k nearly every score is -inf, which torch.sort orders faster than NumPy does
            return _top_p(scores, top_p, torch.sort(scores, descending=False))
        return _top_p_alone(scores, top_p)
    return scores


# Top-p alone looks for its cut among each row's highest few first (a peaked distribution: a chat
# persona at a low temperature keeps a handful of tokens), and where the cut is not clearly there,
# sorts the row. "Clearly": no cumulative sum within NEAR_CUT of the cut (the sums come out of
# another order of additions than the sort's, ~1e-6 apart).
TOP_P_FEW = 64
NEAR_CUT = 1e-4


def _top_p_alone(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p without top-k: transformers' result, bit for bit. Sorting SmolLM2's 49,152 scores took
    ~1 ms a row (a 32-row step: 30 ms); a row whose cut lies clearly among its TOP_P_FEW highest
    scores is settled from those: each lower token is removed (the probability below it is under
    the cut), and each of the few is kept or removed by its cumulative sum, as the sort finds them."""
    cut = 1 - top_p
    few = min(TOP_P_FEW, scores.size(-1) - 1)
    if few < 1:
        return _top_p(scores, top_p, _sort(scores))
    probs = scores.softmax(-1)
    top = torch.topk(probs, few)
    ascending, where = top.values.flip(-1), top.indices.flip(-1)
    cumulative = (1 - top.values.sum(-1, keepdim=True)) + ascending.cumsum(-1)
    remove = cumulative <= cut
    remove[..., -1:] = False
    # Settled: the lowest of the few is removed (so is everything below it), no sum is near the cut,
    # and no kept token ties with a removed one (which of equal scores stays is the sort's choice).
    kept_from = remove.sum(-1, keepdim=True).clamp(max=few - 1)
    last_removed = ascending.gather(-1, (kept_from - 1).clamp(min=0))
    first_kept = ascending.gather(-1, kept_from)
    settled = ((cumulative[:, :1] <= cut - NEAR_CUT) & ((cumulative - cut).abs() >= NEAR_CUT).all(-1, keepdim=True)
               & (last_removed != first_kept) & torch.isfinite(cumulative).all(-1, keepdim=True)).squeeze(-1)
    kept = scores.gather(-1, where).masked_fill(remove, float("-inf"))
    out = scores.new_full(scores.shape, float("-inf")).scatter(1, where, kept)
    if not bool(settled.all()):
        rows = (~settled).nonzero().squeeze(-1)
        out[rows] = _top_p(scores[rows], top_p, _sort(scores[rows]))
    return out


def _top_p(scores: torch.Tensor, top_p: float, ordered: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Top-p given the scores in ascending order (values, indices)."""
    sorted_scores, order = ordered
    remove = _removed(sorted_scores, top_p)
    if _tie_at_the_cut(sorted_scores, remove):  # which of equal scores stays is torch.sort's choice
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = _removed(sorted_scores, top_p)
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _removed(sorted_scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper's arithmetic on ascending scores: which of them top-p removes."""
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return remove


def _top_p_of_the_few(scores: torch.Tensor, top_p: float, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p, when no row keeps more than k scores (`values`, descending, at `indices`).

    Instead of sorting the whole vocabulary (62 ms a step for 32 rows of GPT-2's, with the masking),
    the ascending row is built from the k kept scores with -inf before them: the very values
    torch.sort returns, so the softmax and sums over it, and the tokens kept, are transformers' own."""
    k = values.size(-1)
    ascending, where = values.flip(-1), indices.flip(-1)
    sorted_scores = scores.new_full(scores.shape, float("-inf"))
    sorted_scores[:, -k:] = ascending
    # The softmax over the whole row (its sum's rounding depends on where the values lie); the sums
    # over the k alone: CPU cumsum adds in order from zero, and the -inf scores before them add zeros.
    # Those are all removed, so the cut lies among the k or just before them.
    remove = sorted_scores.softmax(dim=-1)[:, -k - 1:].cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    if _tie_at_the_cut(sorted_scores[:, -k - 1:], remove):
        kept = scores.masked_fill(scores < values[:, -1:], float("-inf"))
        return _top_p(kept, top_p, torch.sort(kept, descending=False))
    return scores.new_full(scores.shape, float("-inf")).scatter(1, where, ascending.masked_fill(remove[:, 1:],
                                                                                                float("-inf")))


def _sort(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending, as torch.sort: on the CPU through NumPy's vectorised argsort (0.5 ms against torch's
    2.8 ms for SmolLM2's 49,152 scores here, a sixth of a decode step). The sorted values are the
    same, so is everything computed from them; only equal scores may come in another order."""
    if scores.device.type != "cpu":
        return torch.sort(scores, descending=False)
    order = torch.from_numpy(numpy.argsort(scores.numpy(), axis=-1))
    return scores.gather(-1, order), order


def _tie_at_the_cut(sorted_scores: torch.Tensor, remove: torch.Tensor) -> bool:
    """Whether, in some row, a removed token and a kept one have equal scores: which of them top-p keeps
    depends on how the sort ordered them, so torch.sort decides, as in `generate`."""
    cut = remove.sum(-1, keepdim=True)
    inside = (cut > 0) & (cut < sorted_scores.shape[-1])
    if not bool(inside.any()):
        return False
    cut = cut.clamp(1, sorted_scores.shape[-1] - 1)
    last_removed, first_kept = sorted_scores.gather(-1, cut - 1), sorted_scores.gather(-1, cut)
    return bool(((last_removed == first_kept) & inside).any())
