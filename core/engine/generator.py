"""The generator's interface, whatever runs the model: a request in, streamed text out.

Backends: `core.engine.local.LocalEngine` (a transformers model on this machine, continuously
batched) and `core.engine.remote.OpenAIEngine` (an OpenAI-compatible server). This module
imports no torch, so a deployment whose personas all run on a remote server never loads it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from pydantic import ValidationError

from core.config.schema import Decoding
from core.conversation import Turn


class GeneratorBusy(Exception):
    """The generator cannot take this request now (queue full, or it could not finish in time)."""


class GenerationFailed(Exception):
    """This request could not be generated (others are unaffected)."""


class GenerationTimeout(GenerationFailed):
    """The request ran past its deadline."""


class GenerationCancelled(GenerationFailed):
    """The caller gave up on this request."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    new_tokens: int = 0
    queue_wait_s: float = 0.0
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = ""
    joined_running_batch: bool = False  # it joined a batch that was already decoding


class Generation:
    """One request's output: iterate for text pieces, or await `text()`; `cancel()` stops it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout if timeout else None
        self.cancelled = False
        self.stats = GenerationStats()
        self._done = False
        self._pieces: list[str] = []
        self._on_cancel: list[Callable[[], None]] = []

    def push(self, kind: str, value: Any) -> None:
        """Called from the worker thread: "text" (a piece), "done" (stats) or "error" (an exception)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the loop has closed: nobody is listening any more

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        for callback in self._on_cancel:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) when the reader gives up: a backend that waits on I/O
        stops at once instead of noticing the flag at its next piece."""
        self._on_cancel.append(callback)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while not self._done:
                remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic()) + 1.0
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                    # races with an arriving piece, and the reader would go on as if never cancelled.
                    async with asyncio.timeout(remaining):
                        kind, value = await self._events.get()
                except TimeoutError:
                    raise GenerationTimeout("the reply took too long") from None
                if kind == "text":
                    self._pieces.append(value)
                    yield value
                elif kind == "done":
                    self._done = True
                else:
                    self._done = True
                    raise value
        finally:
            if not self._done:
                self.cancel()

    async def text(self) -> str:
        async for _ in self:
            pass
        return "".join(self._pieces)


class Engine:
    """What every backend offers: prepare a prompt from turns, submit it, close.

    `prepare` may block (tokenizing): callers run it off the event loop. Its result is opaque to
    callers and only ever handed back to the same engine's `submit`.
    """

    name: str

    def prepare(self, fmt: str, turns: Sequence[Turn], system_prompt: str, budget: int) -> Any:
        raise NotImplementedError

    def submit(self, prompt: Any, decoding: Decoding, timeout: float | None = None, adapter: str | None = None) -> Generation:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def checked_decoding(decoding: Decoding) -> Decoding:
    """The request's decoding settings, validated again (copies made with `model_copy` skip validation);
    a bad value raises GenerationFailed that names it."""
    try:
        return Decoding.model_validate(decoding.model_dump())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}={error.get('input')!r}: {error['msg']}" for error in exc.errors()
        )
        raise GenerationFailed(f"invalid decoding settings: {problems}") from None
