"""Recent key/value caches, reused when a new prompt starts with the same tokens.

Keyed by tokens (and the LoRA adapter that computed them), not by conversation: a stored
conversation, `ttt chat` and a stateless /v1 client that resends its history all continue from
the cache. Each finished request leaves its prompt plus reply; the next turn's prompt starts with
them, so only the new message is prefilled. A reset, a persona switch or trimmed history simply
shares fewer tokens. Memory is bounded; the least recently used entries go first.
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
    request now owns it (may append to it in place)."""

    state: RowState
    tokens: int
    owned: bool


@dataclass
class _Entry:
    adapter: str
    tokens: torch.Tensor  # int64, on the CPU
    state: RowState


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
        is always left to prefill (its logits start the reply). A state reused whole is taken out of
        the cache: the request continues it in place, and stores its own when it ends."""
        query = torch.tensor(prompt, dtype=torch.long)
        best, best_length = None, 0
        for key, entry in self._entries.items():
            if entry.adapter != adapter:
                continue
            usable = entry.state.reusable(min(_common(entry.tokens, query), len(prompt) - 1))
            if usable > best_length:
                best, best_length = key, usable
        if best is None or best_length < MIN_REUSE_TOKENS:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += best_length
        state = self._entries[best].state
        if best_length == state.length:
            self._drop(best)
            return Reuse(state, best_length, owned=True)
        self._entries.move_to_end(best)
        return Reuse(state, best_length, owned=False)

    def store(self, adapter: str, tokens: list[int], state: RowState) -> None:
        """Keep `state` (the keys/values of `tokens`), evicting the least recently used to fit."""
        size = state.nbytes
        if size > self.budget_bytes or len(tokens) < MIN_REUSE_TOKENS:
            return
        stored = torch.tensor(tokens, dtype=torch.long)
        if all(w is None for w in state.windows):
            # An entry this one extends serves no prompt better than this one does.
            for key in [k for k, e in self._entries.items()
                        if e.adapter == adapter and _common(e.tokens, stored) == len(e.tokens)]:
                self._drop(key)
        self._entries[self._next_id] = _Entry(adapter, stored, state)
        self._next_id += 1
        self.bytes += size
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).state.nbytes


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two token tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
