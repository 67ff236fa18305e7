"""Showing a reply on a chat platform, the same way on every platform.

The life of a reply here: `stream_reply` takes the service's growing reply and keeps a
`ReplyView` (the message(s) showing it) in step: at most one update per interval, edits paid from
the platform's `EditBudget` (edits.py), long text cut by the platform's `render` (split.py). When
the reply fails before it is stored, the view shows why; when showing the stored reply fails, it
is retried and then posted anew (the conversation goes on from it, so the user must see it).
Before that, `take_message` asks the service to admit the message and says why when it does not,
and reads the text files it brings into it (files.py).
Adapters bring only their platform's rules: a `Surface` (post, edit, delete), a `render` (limits,
escaping) and the numbers of their rate buckets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable, Protocol, Sequence

from bots.chat.edits import EditBudget
from bots.chat.files import Download, read_files
from core.admission import Message
from core.conversation import ConversationKey
from core.errors import ChatError
from core.replies import ReplyListener, ReplyUpdate, relay
from core.service import ChatService

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong on my side. Please try again."
FINAL_RETRY_DELAYS_S = (0.25, 1.0)  # then the stored reply is posted as new message(s)

Render = Callable[[str, bool], list[str]]  # (reply text, final) -> the pieces to show


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

    async def notify(self, notice: str) -> None:
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
    view: ReplyView, updates: AsyncIterator[ReplyUpdate], *, interval_s: float, listeners: Sequence[ReplyListener] = ()
) -> None:
    """Show a reply as it grows (at most one update per `interval_s`; 0: only the final text).

    Every update also goes to each listener, unthrottled and in order (a failing listener is
    logged and never breaks the text reply). A ChatError is shown as its user message, anything
    else as an apology; the stored reply is delivered whatever it takes (`ReplyView.deliver`).
    """
    latest: ReplyUpdate | None = None
    changed = asyncio.Event()

    async def keep(update: ReplyUpdate) -> None:
        nonlocal latest
        latest = update
        changed.set()

    pumping = asyncio.create_task(relay(updates, keep, also=listeners, where=view.where))
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
        await view.notify(exc.user_message)
        return
    except Exception:  # noqa: BLE001
        log.exception("%s: replying failed", view.where)
        await view.notify(APOLOGY)
        return
    finally:
        pumping.cancel()
    if latest is None or not latest.final:
        log.error("%s: the reply ended without a final text", view.where)
        await view.notify(APOLOGY)
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


async def take_message(
    service: ChatService, view: ReplyView, text: str, *, key: ConversationKey, author_id: str,
    slow_down: Callable[[float], Awaitable[None]], tell: Callable[[str], Awaitable[None]],
    files: Sequence[Download] = (),
) -> Message | None:
    """The message (with the text files it brings read into it) if the service takes it from this
    person in this conversation now; else None, once the reason is said: a refused message in
    `view`, going too fast through `slow_down(wait_s)` (once a window), a spent budget through
    `tell(notice)` (only this person sees it; once a day). Files that are not read are mentioned
    through `tell` too; the message is answered without them."""
    admission = await service.admit(text, key=key, author_id=author_id, files=len(files), where=view.where)
    if admission.notice is not None:
        await view.notify(admission.notice)
    elif admission.slow_down is not None:
        await slow_down(admission.slow_down)
    elif admission.private_notice is not None:
        await tell(admission.private_notice)
    message = admission.message
    if message is None or not files:
        return message
    blocks, notes = await read_files(files, service.max_attachment_bytes)
    if notes:
        await tell(" ".join(notes))
    message = service.attach(message, blocks)
    return message if message.text else None
