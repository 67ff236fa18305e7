"""Screened replies: one output-safety policy for every entry point, chat platforms and APIs alike.

A reply is shown only as far as it passed the screen (see core.safety.StreamScreen): complete
words, no pings, screened at most once per sentence, and the whole reply once at the end. A reply
that fails is regenerated once, then replaced by the fallback; a reader that cannot take text
back (a stream) instead gets the reply cut where the screened part ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence

from core.config.schema import Decoding, SafetySection
from core.engine.generator import Generation, GenerationStats
from core.safety import StreamScreen, degeneracy, is_offensive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyUpdate:
    """The reply so far (screened, safe to show); `final` once complete (and stored, for a conversation).

    The final update carries the generation's `stats`; `cut` is set when the screen stopped a reply
    whose beginning was already shown to a reader who cannot take text back, `replaced` when the
    screen put the fallback reply in the place of what the model wrote.
    """

    text: str
    final: bool = False
    stats: GenerationStats | None = None
    cut: bool = False
    replaced: bool = False


ReplyListener = Callable[[ReplyUpdate], Awaitable[None]]


async def relay(updates: AsyncIterator[ReplyUpdate], show: ReplyListener | None = None, *,
                also: Sequence[ReplyListener] = (), first: ReplyUpdate | None = None,
                where: object = "-") -> ReplyUpdate | None:
    """Follow a reply to its end, handing each update (`first`, if the caller took it already, then
    the rest) to `show` and to each of `also`, in order. A failure in `show` ends the reply (its
    reader is gone: generation stops) and is raised; one in `also` is logged and the reply goes on
    (a voice must never break the text). Returns the last update: final, unless the updates ended
    early. A ChatError from the service is raised as is."""
    latest = None

    async def hand_over(update: ReplyUpdate) -> None:
        if show is not None:
            await show(update)
        for listener in also:
            try:
                await listener(update)
            except Exception:  # noqa: BLE001
                log.exception("%s: a reply listener failed", where)

    try:
        if first is not None:
            latest = first
            await hand_over(first)
        if latest is None or not latest.final:
            async for update in updates:
                latest = update
                await hand_over(update)
    except BaseException:
        aclose = getattr(updates, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    return latest


async def screened_reply(
    generate: Callable[[Decoding], Awaitable[Generation]], safety: SafetySection, user_text: str,
    decoding: Decoding, *, retractable: bool = True, label: str = "",
) -> AsyncIterator[ReplyUpdate]:
    """Updates of a reply that `generate` produces, screened; the last one is final.

    `user_text` is the message replied to (a reply that only echoes it is degenerate).
    """
    screening = safety.on_offensive != "allow"
    for attempt in range(2):
        generation = await generate(decoding)
        screen = StreamScreen(screening)
        problem = None
        try:
            async for piece in generation:
                due = screen.feed(piece)
                if due is None:
                    continue
                problem = await _problem(due, user_text, safety, partial=True) if screen.checkpoint else None
                if problem:
                    break
                screen.show(due)
                yield ReplyUpdate(due)
        finally:
            generation.cancel()  # stops it if it is still running (a problem, or the reader left)
        text = screen.text
        problem = problem or await _problem(text, user_text, safety, screened=screen.shown)
        if problem is None:
            yield ReplyUpdate(text, final=True, stats=generation.stats)
            return
        log.info("discarding a %s reply %s (attempt %d)", problem, label, attempt + 1)
        if screen.shown and not retractable:
            yield ReplyUpdate(screen.shown, final=True, stats=generation.stats, cut=True)
            return
        if problem == "offensive" and safety.on_offensive == "fallback":
            break
        decoding = decoding.model_copy(
            update={"do_sample": True, "seed": None if decoding.seed is None else (decoding.seed + 1) % 2**64}
        )
    yield ReplyUpdate(safety.fallback_reply, final=True, stats=generation.stats, replaced=True)


async def _problem(
    text: str, user_text: str, safety: SafetySection, *, partial: bool = False, screened: str = ""
) -> str | None:
    """Why `text` must not be shown: degenerate (part of a reply can only be told to loop) or offensive
    (text screened before exactly as it is is not screened again)."""
    problem = degeneracy(text, user_text)
    if problem and (problem == "loop" or not partial):
        return problem
    if safety.on_offensive != "allow" and text != screened:
        if (await asyncio.to_thread(is_offensive, [text], safety.offensive_threshold))[0]:
            return "offensive"
    return None
