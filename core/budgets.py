"""Token budgets: how many tokens a person and a server may have generated today, and what is left.

The limits in force are the stricter of the host's (`limits:` in config.yaml, the ceiling) and the
server's own (`/server budget`); 0 means none. A day is a UTC day: every count starts again at
00:00 UTC. The counts themselves are kept by the store (`add_tokens`, `tokens_used`), so that
replicas share them.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.config.schema import Decoding

if TYPE_CHECKING:  # the stores use this module's days; they stay below the engine
    from core.engine.generator import Generation

RESETS = "it resets at 00:00 UTC"


def utc_day(when: float | None = None) -> datetime.date:
    """The UTC day of a UNIX time (default: now)."""
    return datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.timezone.utc).date()


def seconds_left_today(now: float | None = None) -> float:
    """Seconds until the next 00:00 UTC."""
    now = time.time() if now is None else now
    midnight = datetime.datetime.combine(utc_day(now) + datetime.timedelta(days=1), datetime.time(),
                                         datetime.timezone.utc)
    return max(1.0, midnight.timestamp() - now)


def stricter(host: int, own: int) -> int:
    """The limit in force of two limits where 0 means none."""
    return min(limit for limit in (host, own) if limit) if host or own else 0


@dataclass(frozen=True)
class Budget:
    """Today's tokens for one person in one server, against the limits in force (0: none)."""

    person_used: int
    person_limit: int
    server_used: int
    server_limit: int

    @property
    def remaining(self) -> int | None:
        """Tokens that may still be generated today (never below 0); None when no limit applies."""
        left = [limit - used for limit, used in ((self.person_limit, self.person_used),
                                                 (self.server_limit, self.server_used)) if limit]
        return max(0, min(left)) if left else None

    @property
    def spent(self) -> str | None:
        """Which budget is spent ("person" or "server"), or None while tokens remain."""
        if self.person_limit and self.person_used >= self.person_limit:
            return "person"
        if self.server_limit and self.server_used >= self.server_limit:
            return "server"
        return None

    def notice(self) -> str:
        """What the person is told (once a day) when a budget is spent."""
        if self.spent == "server":
            return f"This server has used today's {self.server_limit} tokens; {RESETS}."
        return f"You have used today's {self.person_limit} tokens here; {RESETS}."

    def report(self) -> str:
        """`/usage`: the person's tokens today and the server's, against the budgets."""
        return (f"Today (UTC) you have used {_against(self.person_used, self.person_limit)} here; this server has "
                f"used {_against(self.server_used, self.server_limit)}. Budgets reset at 00:00 UTC.")


def _against(used: int, limit: int) -> str:
    return f"{used} of {limit} tokens" if limit else f"{used} tokens (no daily limit)"


class Spending:
    """The generations of one reply (a regenerated reply has several), against what it may still
    spend today (`allowance`, None: no limit): each is capped by what is left when it starts, and
    none is cut once it runs."""

    def __init__(self, allowance: int | None = None):
        self.allowance = allowance
        self._generations: list[Generation] = []

    def capped(self, decoding: Decoding) -> Decoding:
        """`decoding` with `max_new_tokens` no more than what is left (at least 1)."""
        if self.allowance is None:
            return decoding
        left = max(1, self.allowance - self.tokens)
        return decoding if decoding.max_new_tokens <= left else decoding.model_copy(update={"max_new_tokens": left})

    def add(self, generation: Generation) -> None:
        self._generations.append(generation)

    @property
    def tokens(self) -> int:
        """Tokens generated so far, by every generation of the reply."""
        return sum(generation.stats.new_tokens for generation in self._generations)
