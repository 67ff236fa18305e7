"""What a person is told when a message gets no model reply: the ChatError family.

Every refusal of the service is one of these; adapters render `user_message` in their platform's
idiom (a reply, an ephemeral notice, an HTTP status) and never invent their own wording for them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from core.conversation import ConversationBusy, StoreUnavailable

log = logging.getLogger(__name__)

MEMORY_UNAVAILABLE = "I can't reach my memory right now; please try again in a moment."
BUSY = "I'm busy with a lot of conversations right now; try again in a moment."
CONVERSATION_BUSY = "I'm still answering an earlier message here; try again in a moment."
TIMED_OUT = "That took me too long to answer (a lot of conversations at once); try again in a moment."


class ChatError(Exception):
    """A request that ends without a model reply; `user_message` is what to tell the user."""

    outcome = "error"

    def __init__(self, user_message: str):
        super().__init__(user_message)
        self.user_message = user_message


class Busy(ChatError):
    """The generator cannot take or finish this in time: try again in a moment (HTTP: 503)."""

    outcome = "busy"


class TimedOut(Busy):
    """The reply ran past its deadline: busy, found out late (a refusal at once is plain Busy)."""

    outcome = "timeout"


class InputRejected(ChatError):
    outcome = "rejected"


class TooLong(InputRejected):
    """The message (or a system prompt) does not fit the persona's context."""


class OverBudget(ChatError):
    """Today's token budget of this person or server is spent (HTTP: 429)."""

    outcome = "over_budget"


class PersonaError(ChatError):
    outcome = "persona"


class ReplyFailed(ChatError):
    outcome = "error"


class MemoryUnavailable(ChatError):
    outcome = "store"


@contextmanager
def store_trouble(key: object) -> Iterator[None]:
    """Store failures as what the user is told: the memory is unreachable, or the conversation still busy."""
    try:
        yield
    except ConversationBusy:
        raise Busy(CONVERSATION_BUSY) from None
    except StoreUnavailable as exc:
        log.warning("no store for %s: %s", key, exc)
        raise MemoryUnavailable(MEMORY_UNAVAILABLE) from None
