"""Showing a reply on a chat platform, the same way on every platform.

The life of a reply here: `ReplyTasks` runs it in its conversation's arrival order; `stream_reply`
takes the service's growing reply and keeps a `ReplyView` (the message(s) showing it) in step:
at most one update per interval, edits paid from the platform's `EditBudget`, long text cut by
`split_text`. When the reply fails before it is stored, the view shows why; when showing the
stored reply fails, it is retried and then posted anew (the conversation goes on from it, so the
user must see it). Adapters bring only their platform's rules: a `Surface` (post, edit, delete),
a `render` (limits, escaping) and the numbers of their rate buckets.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Protocol, Sequence

from core.config import Config
from core.conversation import StoreUnavailable
from core.replies import ReplyUpdate
from core.service import MEMORY_UNAVAILABLE, ChatError, ChatService, InputRejected, MemoryUnavailable

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong on my side. Please try again."
FINAL_RETRY_DELAYS_S = (0.25, 1.0)  # then the stored reply is posted as new message(s)

Listener = Callable[[ReplyUpdate], Awaitable[None]]
Render = Callable[[str, bool], list[str]]  # (reply text, final) -> the pieces to show


# ---- splitting ----------------------------------------------------------------------------------

# Where a long text may be cut, best first; group 1 is the whitespace the cut removes.
_BOUNDARIES = (
    re.compile(r"(\n[ \t]*\n(?:[ \t]*\n)*)"),  # paragraph
    re.compile(r"(\n)"),  # line
    re.compile(r"[.!?…]+[\"')\]*_~]*([ \t]+)"),  # sentence
    re.compile(r"([ \t]+)"),  # word
)
_FENCE = re.compile(r"^ {0,3}(`{3,})([^`\n]*)$", re.MULTILINE)  # a code fence line: ``` or ```python
_CLOSE_AT_START = re.compile(r"[ \t]*`{3,}[ \t]*(?:\n|$)")


def split_text(text: str, limit: int, *, unbreakable: re.Pattern | None = None) -> list[str]:
    """Pieces of at most `limit` characters, cut at a paragraph, line, sentence or word boundary
    (in that order of preference, never in the first half of a piece), else mid-word.

    Code fences stay balanced: a piece that ends inside a code block closes it, and the next one
    reopens it with the same language. `unbreakable` matches what must never be cut (a platform's
    escapes, such as Slack's `&amp;`); fence lines are never cut either.
    """
    pieces: list[str] = []
    fence: str | None = None  # the fence line ("```python") open where the previous piece ended
    rest = text.strip()
    while rest:
        # Reopen with the language, unless that leaves too little room (tiny limits).
        head = (fence if len(fence) <= limit // 4 else _ticks(fence)) + "\n" if fence else ""
        open_at_end = _fence_after(rest, fence)
        if len(head) + len(rest) + (len(_closing(open_at_end)) if open_at_end else 0) <= limit:
            pieces.append(head + rest + (_closing(open_at_end) if open_at_end else ""))
            break
        # Room for closing whatever block the cut may leave open.
        closings = [_closing(m.group(1)) for m in _FENCE.finditer(rest)] + ([_closing(fence)] if fence else [])
        reserve = max(map(len, closings), default=0)
        end, resume = _cut(rest, max(1, limit - len(head) - reserve), unbreakable)
        fence = _fence_after(rest, fence, end)  # fence lines are whole lines of the text, never cut
        body, at_line_start, rest = rest[:end].rstrip(), rest[resume - 1 : resume] == "\n", rest[resume:]
        if fence is not None:
            body += _closing(fence)
            closing = _CLOSE_AT_START.match(rest) if at_line_start else None
            if closing:  # the block ends right here: the added fence stands for its own
                rest, fence = rest[closing.end():], None
        pieces.append(head + body)
        rest = rest.lstrip("\n") if fence else rest.lstrip()
    return pieces


def _cut(text: str, room: int, unbreakable: re.Pattern | None) -> tuple[int, int]:
    """Where a piece of at most `room` characters of `text` ends, and where the next one starts."""
    protected = [m.span() for m in _FENCE.finditer(text, 0, room + 1)]
    if unbreakable is not None:
        protected += [m.span() for m in unbreakable.finditer(text, max(0, room - 64), room + 64)]

    def inside(position: int) -> bool:
        return any(start < position < end for start, end in protected)

    for boundary in _BOUNDARIES:
        cuts = [
            m.span(1) for m in boundary.finditer(text, 0, room + 16)
            if room // 2 < m.start(1) <= room and not inside(m.start(1))
        ]
        if cuts:
            return cuts[-1]
    end = room
    for start, stop in protected:
        if 0 < start < end < stop:
            end = start
    return end, end


def _fence_after(text: str, fence: str | None, end: int | None = None) -> str | None:
    """The fence line still open at `end` of `text` (default: its end), given the one open at its start."""
    for match in _FENCE.finditer(text, 0, len(text) if end is None else end + 1):
        if end is not None and match.end() > end:
            break
        if fence is None:
            fence = match.group(1) + "".join(match.group(2).split()[:1])  # ``` and the language
        elif not match.group(2).strip() and len(match.group(1)) >= len(_ticks(fence)):
            fence = None
    return fence


def _ticks(fence: str) -> str:
    return fence[: len(fence) - len(fence.lstrip("`"))]


def _closing(fence: str) -> str:
    return "\n" + _ticks(fence)


# ---- the rate of edits ----------------------------------------------------------------------------


class EditBudget:
    """Message edits allowed per rate bucket (Slack: a workspace; Discord: a channel).

    At most `limit` edits in any `window_s` seconds per bucket, spread out evenly after a small
    burst (a generic cell-rate algorithm), so that replies streaming at once slow down together
    instead of running into the platform's limit. Waiters are served in the order they asked.
    """

    def __init__(self, limit: int, window_s: float):
        if limit < 2:
            raise ValueError("an edit budget needs a limit of at least 2")
        self.limit, self.window_s = limit, window_s
        self._burst = limit // 10
        # (burst + 1) at once, then one per interval: never more than `limit` in any window.
        self._interval = window_s / (limit - self._burst - 1)
        self._next: dict[Hashable, float] = {}  # bucket -> when its schedule is next free

    async def take(self, bucket: Hashable) -> None:
        """Wait until one more edit in `bucket` fits, and count it."""
        now = asyncio.get_running_loop().time()
        if len(self._next) > 10_000:
            self._next = {key: at for key, at in self._next.items() if at > now}
        scheduled = max(self._next.get(bucket, now), now)
        self._next[bucket] = scheduled + self._interval
        wait = scheduled - self._burst * self._interval - now
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:  # not needed after all: give the slot back if none came after
                if self._next.get(bucket) == scheduled + self._interval:
                    self._next[bucket] = scheduled
                raise


# ---- the message(s) showing a reply -----------------------------------------------------------------


class Surface(Protocol):
    """How a platform posts, edits and deletes the bot's messages for one reply."""

    async def post(self, text: str, *, first: bool) -> Any:
        """Post a new message (`first`: the reply's first one); returns its handle."""

    async def edit(self, handle: Any, text: str) -> Any:
        """Change a message's text; returns its (possibly new) handle."""

    async def delete(self, handle: Any) -> None:
        """Delete a message."""


class ReplyView:
    """The message(s) showing one reply, kept in step with it: pieces are posted, edited when they
    change and deleted when a shorter text no longer needs them. Edits are paid from `budget`."""

    def __init__(self, surface: Surface, render: Render, budget: EditBudget, bucket: Hashable, where: str):
        self.surface = surface
        self.render = render
        self.budget = budget
        self.bucket = bucket
        self.where = where  # for the log
        self.shown: list[tuple[Any, str]] = []  # (handle, text) of each message, in order

    async def begin(self, placeholder: str) -> None:
        """Show `placeholder` (platform text, shown as is) until the reply has words."""
        try:
            await self._show([placeholder])
        except Exception as exc:  # noqa: BLE001 - the reply itself may still get through
            log.warning("%s: could not post the placeholder: %s", self.where, exc)

    async def show(self, text: str, *, final: bool, paid: bool = False) -> None:
        """Show the reply so far (`final`: as stored; `paid`: one edit was taken from the budget
        already); raises what the platform raises."""
        await self._show(self.render(text, final), paid)

    async def say(self, notice: str) -> None:
        """Say why there is no reply, replacing whatever was shown; a failure is only logged."""
        try:
            await self.show(notice, final=True)
        except Exception:  # noqa: BLE001
            log.exception("%s: could not say that the reply failed", self.where)

    async def deliver(self, text: str) -> None:
        """Show the stored reply, whatever it takes: retried, then posted as new message(s)."""
        for delay in (*FINAL_RETRY_DELAYS_S, None):
            try:
                await self.show(text, final=True)
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: showing the stored reply failed: %s", self.where, exc)
            if delay is not None:
                await asyncio.sleep(delay)
        stale, self.shown = self.shown, []
        try:
            await self.show(text, final=True)
        except Exception:  # noqa: BLE001
            log.exception("%s: could not deliver a stored reply", self.where)
            return
        log.info("%s: posted the stored reply anew", self.where)
        for handle, _ in stale:  # best effort: they show an unfinished reply
            try:
                await self.surface.delete(handle)
            except Exception:  # noqa: BLE001
                pass

    async def _show(self, pieces: list[str], paid: bool = False) -> None:
        for i, piece in enumerate(pieces):
            if i == len(self.shown):
                self.shown.append((await self.surface.post(piece, first=not self.shown), piece))
            elif self.shown[i][1] != piece:
                if paid:
                    paid = False
                else:
                    await self.budget.take(self.bucket)
                self.shown[i] = (await self.surface.edit(self.shown[i][0], piece), piece)
        while len(self.shown) > len(pieces):  # a final text can be shorter than the stream was
            await self.surface.delete(self.shown[-1][0])
            self.shown.pop()


async def stream_reply(
    view: ReplyView, updates: AsyncIterator[ReplyUpdate], *, interval_s: float, listeners: Sequence[Listener] = ()
) -> None:
    """Show a reply as it grows (at most one update per `interval_s`; 0: only the final text).

    Every update also goes to each listener, unthrottled and in order (a failing listener is
    logged and never breaks the text reply). A ChatError is shown as its user message, anything
    else as an apology; the stored reply is delivered whatever it takes (`ReplyView.deliver`).
    """
    latest: ReplyUpdate | None = None
    changed = asyncio.Event()

    async def pump() -> None:
        nonlocal latest
        async for update in updates:
            latest = update
            changed.set()
            for listener in listeners:
                try:
                    await listener(update)
                except Exception:  # noqa: BLE001
                    log.exception("%s: a reply listener failed", view.where)

    pumping = asyncio.create_task(pump())
    try:
        while interval_s > 0:
            # At most one update per interval, the first one too: a quick reply is shown once, whole.
            await asyncio.wait({pumping}, timeout=interval_s)
            if await _first_done(pumping, changed.wait()) is pumping:
                break
            changed.clear()
            paying = asyncio.ensure_future(view.budget.take(view.bucket))
            if await _first_done(pumping, paying) is pumping:
                paying.cancel()  # the final text is there: no partial edit now
                break
            try:
                await view.show(latest.text, final=False, paid=True)
            except Exception as exc:  # noqa: BLE001 - a lost partial update is not worth the reply
                log.warning("%s: a streamed update failed; carrying on: %s", view.where, exc)
        await pumping
    except ChatError as exc:  # the service has logged why
        await view.say(exc.user_message)
        return
    except Exception:  # noqa: BLE001
        log.exception("%s: replying failed", view.where)
        await view.say(APOLOGY)
        return
    finally:
        pumping.cancel()
    if latest is None or not latest.final:
        log.error("%s: the reply ended without a final text", view.where)
        await view.say(APOLOGY)
        return
    await view.deliver(latest.text)


async def _first_done(task: asyncio.Future, other: Awaitable) -> asyncio.Future:
    """Wait for `task` or `other`; returns `task` if it is done by then (`other` is cancelled),
    else `other`."""
    other = asyncio.ensure_future(other)
    await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        other.cancel()
        return task
    return other


# ---- taking a message ---------------------------------------------------------------------------------


async def admitted(
    service: ChatService, view: ReplyView, text: str, *, platform: str, author_id: str, per_minute: int,
    slow_down: Callable[[float], Awaitable[None]],
) -> str | None:
    """The message's words if the service takes them from this person now; else None, once the
    reason is said: a rejected message in `view` (it does not count against the rate limit), a
    refusal for going too fast through `slow_down(wait_s)`, once per window."""
    try:
        text = service.validate(text)
        rate = await service.check_rate(platform, author_id, per_minute)
    except InputRejected as exc:
        service.record_refusal(platform, "?", exc.outcome, key=view.where)
        await view.say(exc.user_message)
        return None
    except StoreUnavailable as exc:
        log.warning("%s: no rate check, the store is unavailable: %s", view.where, exc)
        service.record_refusal(platform, "?", MemoryUnavailable.outcome, key=view.where)
        await view.say(MEMORY_UNAVAILABLE)
        return None
    if rate.allowed:
        return text
    service.record_refusal(platform, "?", "rate_limited", key=view.where)
    if rate.notify:
        await slow_down(rate.wait_s)
    return None


# ---- replies in flight ------------------------------------------------------------------------------


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
