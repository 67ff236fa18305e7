"""One request inside the local engine: its prompt, stop tokens, sampler, streamed text, progress."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.engine import capacity
from core.engine.detokenize import ReplyText
from core.engine.generator import Generation
from core.engine.runner import BASE_ADAPTER
from core.engine.prefix_cache import Reuse
from core.engine.sampling import RowSampler


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for `LocalEngine.submit`: token ids, and the ids that end this persona's turn."""

    ids: list[int]
    stop_ids: frozenset[int]


@dataclass
class Request:
    generation: Generation
    prompt: list[int]
    stop_ids: frozenset[int]
    sampler: RowSampler
    text: ReplyText
    max_new_tokens: int
    adapter: str = BASE_ADAPTER
    position: int = 0  # tokens of this request in the cache
    tokens: list[int] = field(default_factory=list)  # generated so far (an end-of-turn token is not kept)
    started: bool = False  # prefilled and decoding
    ended: bool = False
    reuse: Reuse | None = None  # a prefix-cache hit, until prefilled
    scores: torch.Tensor | None = None  # the next-token scores its prompt ended with (for the prefix cache)

    def consume(self, token: int) -> str | None:
        """Take the next generated token and stream what it shows; the finish reason once it ends."""
        if token in self.stop_ids:
            self._emit(self.text.finish())
            return "stop"
        self.tokens.append(token)
        self.sampler.append(token)
        self.generation.stats.new_tokens = len(self.tokens)
        self._emit(self.text.add(token))
        if self.text.stopped:
            return "stop"
        if len(self.tokens) >= self.max_new_tokens:
            self._emit(self.text.finish())
            return "length"
        return None

    def _emit(self, piece: str) -> None:
        if piece:
            self.generation.push("text", piece)

    def work(self) -> capacity.Work:
        """What is left of it, for admission planning."""
        return capacity.Work(
            remaining=self.max_new_tokens - len(self.tokens),
            context=self.position if self.started else len(self.prompt),
            prefill=0 if self.started else len(self.prompt),
            deadline=self.generation.deadline,
        )
