"""Replies in flight: each conversation's answered in the order its messages arrived."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine, Hashable

from core.config.schema import Config

log = logging.getLogger(__name__)

class ReplyTasks:
    """Replies in flight: each in its own task, those of one conversation one at a time in the
    order their messages arrived (the order is taken when `spawn` is called, before any await).
    `stop` waits for them for a bounded time, then cancels what is left."""

    def __init__(self, where: str):
        self.where = where
        self._tasks: set[asyncio.Task] = set()
        self._last: dict[Hashable, asyncio.Future] = {}  # conversation -> when its newest reply is done

    def spawn(self, work: Coroutine[Any, Any, None], conversation: Hashable | None = None) -> None:
        """Run `work`; with `conversation`, after every reply spawned earlier for it."""
        loop = asyncio.get_running_loop()
        before = self._last.get(conversation) if conversation is not None else None
        done = loop.create_future()
        if conversation is not None:
            self._last[conversation] = done
        task = loop.create_task(self._run(work, before))
        self._tasks.add(task)

        def finished(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            work.close()  # a reply cancelled before it started must not warn "never awaited"
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: a reply task failed", self.where, exc_info=task.exception())
            if before is not None and not before.done():  # cancelled while waiting: keep the order
                before.add_done_callback(lambda _: release())
            else:
                release()

        def release() -> None:
            if not done.done():
                done.set_result(None)
            if self._last.get(conversation) is done:
                del self._last[conversation]

        task.add_done_callback(finished)

    @staticmethod
    async def _run(work: Coroutine[Any, Any, None], before: asyncio.Future | None) -> None:
        if before is not None:
            await asyncio.shield(before)
        await work

    def __len__(self) -> int:
        return len(self._tasks)

    async def stop(self, grace_s: float) -> None:
        """Let the replies in flight finish within `grace_s`; cancel the rest."""
        while self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            if late:
                log.warning("%s: cancelling %d reply task(s) still running after %.0fs", self.where, len(late), grace_s)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)


def finish_within_s(config: Config) -> float:
    """How long a reply in flight may still take: a generation ends by its timeout, then is shown."""
    return config.generator.request_timeout_s + 10
