"""Conversations: keys, turns, and the interface of the store that keeps them (core/stores/).

Everything a conversation needs beyond one process's memory goes through the store interface:
turns, the chosen persona, event dedupe (`claim`), rate-limit counters (`count_event`), standing
choices and server settings (`preferences`), tokens generated per day (`add_tokens`) and
per-conversation ordering (`lock`), so that a server store (PostgreSQL) can stand in for
several replicas.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import AsyncContextManager, Literal, Protocol, Sequence

Role = Literal["user", "bot"]


class StoreUnavailable(Exception):
    """The store cannot be reached right now (a server store lost its database); try again later."""


class ConversationBusy(StoreUnavailable):
    """The conversation's earlier reply held it longer than the store's bounded lock wait."""


class StoreUnusable(Exception):
    """The database cannot be used at all (unwritable, not a database, damaged); the message names its path."""


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation lives: a platform and a scope in it (channel, thread, DM, session).

    `parent` is the enclosing scope whose settings it inherits (a thread's channel); `server` the
    platform's id of the server it is in (a Discord guild, a Slack workspace), None outside any
    (a Discord DM, the web page, a terminal). Neither is part of the conversation's identity.
    """

    platform: str
    scope: str
    parent: str | None = field(default=None, compare=False)
    server: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.platform}:{self.scope}"

    @property
    def parent_key(self) -> "ConversationKey | None":
        return ConversationKey(self.platform, self.parent, server=self.server) if self.parent else None

    @property
    def server_id(self) -> str:
        """The server whose settings and budgets apply, as the store knows it: `platform:server`; the
        conversations outside any server count together as their platform's own (`discord`, `web`)."""
        return f"{self.platform}:{self.server}" if self.server else self.platform

    @classmethod
    def parse(cls, text: str) -> "ConversationKey":
        platform, _, scope = text.partition(":")
        return cls(platform, scope)


@dataclass(frozen=True)
class Turn:
    role: Role
    author: str
    text: str
    time: float = field(default_factory=time.time)
    persona: str | None = None
    author_id: str | None = None  # the platform's id of a user turn's author ("forget me" finds it)


class ConversationStore(Protocol):
    async def recent_turns(self, key: ConversationKey, limit: int) -> list[Turn]:
        """The newest `limit` turns, oldest first."""

    async def add_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Append turns atomically; durable when this returns."""

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns (its settings stay)."""

    async def persona(self, key: ConversationKey) -> str | None:
        """The persona chosen for this conversation, if any."""

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        """Choose the conversation's persona (None: back to the default)."""

    async def forget_author(self, platform: str, author_id: str) -> int:
        """Delete every turn this person wrote on this platform, in every conversation, and the
        bot's replies to them; the number of turns deleted."""

    async def delete_before(self, cutoff: float) -> int:
        """Delete turns older than `cutoff` (a UNIX time), and the token counts of the days before
        its (UTC) day; the number of turns deleted."""

    async def add_tokens(self, server: str, person: str, day: datetime.date, tokens: int) -> None:
        """Count `tokens` generated for `person` ("" for nobody in particular) in `server` on `day`;
        atomic, so replicas counting at once lose nothing."""

    async def tokens_used(self, server: str, person: str, day: datetime.date) -> tuple[int, int]:
        """The tokens counted on `day` for (`person` in `server`, everyone in `server`)."""

    async def preferences(self, namespace: str) -> dict[str, str]:
        """Every preference kept in `namespace`, ident -> value (a person's standing choices, such as
        not being listened to in voice channels; a server's settings)."""

    async def set_preference(self, namespace: str, ident: str, value: str | None) -> None:
        """Keep (or with None, drop) a preference; durable when this returns."""

    async def claim(self, namespace: str, ident: str, ttl_s: float) -> bool:
        """Insert-if-absent with an expiry: True for the first claim of (namespace, ident) within
        `ttl_s`, False for every later one (event dedupe, once-per-window notices)."""

    async def count_event(self, namespace: str, ident: str, limit: int, window_s: float) -> float:
        """Rate limiting: count an event and return 0 when fewer than `limit` were counted in the
        last `window_s`; else count nothing and return the seconds until one would be allowed."""

    def lock(self, key: ConversationKey) -> AsyncContextManager[None]:
        """Hold the conversation: one reply at a time, in the order callers asked; raises
        ConversationBusy after the store's bounded wait."""

    async def health(self) -> dict:
        """A small JSON-able report: {"backend": ..., "ok": bool, ...} ("problem" when not ok)."""

    async def close(self) -> None:
        """Flush and release."""


def current_session(turns: Sequence[Turn], idle_seconds: float, now: float | None = None) -> list[Turn]:
    """The turns since the conversation last went idle for longer than `idle_seconds`."""
    now = time.time() if now is None else now
    kept: list[Turn] = []
    later = now
    for turn in reversed(turns):
        if later - turn.time > idle_seconds:
            break
        kept.append(turn)
        later = turn.time
    return kept[::-1]
