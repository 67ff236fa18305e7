"""Recent key/value caches, reused when a new prompt starts with the same tokens.

Keyed by tokens (and the LoRA adapter that computed them), not by conversation: a stored
conversation, `ttt chat` and a stateless /v1 client that resends its history all continue from
the cache. Each finished request leaves its prompt plus reply; the next turn's prompt starts with
them, so only the new message is prefilled. A reset, a persona switch or trimmed history simply
shares fewer tokens. Memory is bounded; the least recently used entries go first.

The same prompt again (a retry, a stateless client asking twice) starts from the scores that
chose the first reply's first token, kept with its entry: its prompt is not computed again, so
a greedy reply is the first one, whatever rounding a pass of another size would have brought.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from core.engine.kv_cache import RowState

MIN_REUSE_TOKENS = 32  # a shorter match saves less than it costs to prefill the row apart from the others
SPARE_TOKENS = 256  # room kept after a stored state, for the next turn's message and reply to append in place


def default_prefix_cache_mb(device: str) -> int:
    """An eighth of the machine's memory on CPU (at most 2 GiB), a tenth of the GPU's on CUDA."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 10 // 2**20
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(2048, ram // 8 // 2**20)


@dataclass(frozen=True)
class Reuse:
    """A prefix-cache hit: the stored state, how many tokens of it the prompt reuses, and whether the
    request now owns it (may append to it in place); for the very prompt stored, its next-token scores."""

    state: RowState
    tokens: int
    owned: bool
    scores: torch.Tensor | None = None


@dataclass(frozen=True)
class Stored:
    """What a finished request leaves: the keys/values of its prompt and reply, and the scores its
    prompt ended with."""

    tokens: list[int]
    state: RowState
    prompt_length: int
    scores: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.scores.numel() * self.scores.element_size()


@dataclass
class _Entry:
    adapter: str
    tokens: torch.Tensor  # int64, on the CPU
    stored: Stored


class PrefixCache:
    """Used by the engine's worker thread only."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, prompt: list[int]) -> Reuse | None:
        """The stored state sharing the longest usable prefix with `prompt`; at least one prompt token
        is left to prefill (its logits start the reply), unless `prompt` is a stored prompt, whose
        scores are reused. A state reused whole is taken out of the cache: the request continues it
        in place, and stores its own when it ends."""
        query = torch.tensor(prompt, dtype=torch.long)
        best, best_length, scores = None, 0, None
        for key, entry in self._entries.items():
            if entry.adapter != adapter:
                continue
            common = _common(entry.tokens, query)
            stored = entry.stored
            if (common == len(prompt) == stored.prompt_length
                    and stored.state.reusable(len(prompt)) == len(prompt)):
                best, best_length, scores = key, len(prompt), stored.scores
                break
            usable = stored.state.reusable(min(common, len(prompt) - 1))
            if usable > best_length:
                best, best_length = key, usable
        if best is None or best_length < MIN_REUSE_TOKENS:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += best_length
        state = self._entries[best].stored.state
        if best_length == state.length:
            self._drop(best)
            return Reuse(state, best_length, owned=True, scores=scores)
        self._entries.move_to_end(best)
        return Reuse(state, best_length, owned=False, scores=scores)

    def store(self, adapter: str, stored: Stored) -> None:
        """Keep what a finished request left, evicting the least recently used to fit."""
        size = stored.nbytes
        if size > self.budget_bytes or len(stored.tokens) < MIN_REUSE_TOKENS:
            return
        tokens = torch.tensor(stored.tokens, dtype=torch.long)
        if all(w is None for w in stored.state.windows):
            # An entry this one extends serves no prompt better than this one does (the same prompt
            # again excepted: it is recomputed from this entry, rounding and all).
            for key in [k for k, e in self._entries.items()
                        if e.adapter == adapter and _common(e.tokens, tokens) == len(e.tokens)]:
                self._drop(key)
        self._entries[self._next_id] = _Entry(adapter, tokens, stored)
        self._next_id += 1
        self.bytes += size
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).stored.nbytes


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two token tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
