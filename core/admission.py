"""Admission: whether the service takes a message now, and what to say when it does not.

A message is taken when its words are readable text within `service.max_input_chars` (or it
brings files), its author is within the rate limits (their platform's, and their server's own when
it is stricter) and within today's token budgets (core/budgets.py). Words that are refused get a
notice in the conversation (and do not count against the rate limit); a person over the rate
limit is told to slow down once per window, one whose budget is spent is told privately once a
day; after that both are refused silently, so that a flood gets one notice, not one per message.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.conversation import ConversationStore
from core.errors import InputRejected

EMPTY = "I didn't catch any words there. Say something after the mention!"
UNREADABLE = "That message holds something that is not text I can read."


def too_long(limit: int) -> str:
    return f"That message is a bit long for me: please keep it under {limit} characters."


@dataclass(frozen=True)
class Message:
    """Words the service has taken: checked once, by `validate` (directly or through admission)."""

    text: str


@dataclass(frozen=True)
class Admission:
    """The service's answer to a message: `message` when taken; otherwise `notice` (say it in the
    conversation), `slow_down` (seconds until one more would be taken, set only for the first
    refusal of a window: tell the person, then stay silent) or `private_notice` (tell only this
    person: set for the first refusal of the day for a spent budget, then silence)."""

    message: Message | None = None
    notice: str | None = None
    slow_down: float | None = None
    private_notice: str | None = None


def readable(text: str) -> bool:
    """Whether `text` is text that can be stored and shown (no lone surrogates: JSON "\ud800", or
    undecodable bytes read from a terminal)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(text: str | None, max_chars: int, *, files: int = 0) -> Message:
    """The message as the service takes it (stripped; its words may be empty when it brings `files`);
    raises InputRejected (nothing counted or stored)."""
    text = (text or "").strip()
    if not text and not files:
        raise InputRejected(EMPTY)
    if len(text) > max_chars:
        raise InputRejected(too_long(max_chars))
    if not readable(text):
        raise InputRejected(UNREADABLE)
    return Message(text)


@dataclass(frozen=True)
class RateDecision:
    """Whether a person may send another message now; when not, whether to tell them (once a window)."""

    wait_s: float
    notify: bool = False

    @property
    def allowed(self) -> bool:
        return self.wait_s <= 0


async def check_rate(store: ConversationStore, platform: str, author_id: str, per_minute: int, *,
                     server: str = "", server_per_minute: int = 0) -> RateDecision:
    """Count a message of this person against their platform's limit and, when `server_per_minute`
    is set, against `server`'s own (0 = no limit); when over a limit, `notify` is True only for the
    first refusal in the window. Raises StoreUnavailable when the store cannot count."""
    wait = 0.0
    for namespace, limit in ((f"rate:{platform}", per_minute), (f"rate:{server}", server_per_minute)):
        if limit > 0 and wait <= 0:
            wait = await store.count_event(namespace, author_id, limit, 60.0)
    if wait <= 0:
        return RateDecision(0.0)
    return RateDecision(wait, await store.claim(f"rate-notice:{platform}", author_id, wait))
