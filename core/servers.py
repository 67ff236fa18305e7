"""Servers: what a server's admins choose for it, the words that change it, and today's budgets.

`/server persona NAME|clear`, `/server prompt TEXT|clear`, `/server rate-limit N`,
`/server budget person|server N` and `/server show` on Discord; the same words after `/ttt server`
on Slack. The settings are kept in the store (preferences of the namespace `server:<server id>`),
so every replica applies them at once. The host's config.yaml is the ceiling: a server can set a
stricter limit than the host's, never a looser one. `Servers` is the service's part that reads
and keeps them, and counts the tokens of each server and person (core/budgets.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from core.admission import readable
from core.budgets import Budget, seconds_left_today, stricter, utc_day
from core.config.schema import Config
from core.conversation import ConversationKey, ConversationStore
from core.errors import PersonaError

log = logging.getLogger(__name__)

PERSONA, PROMPT, RATE_LIMIT, BUDGET, SHOW, CLEAR = "persona", "prompt", "rate-limit", "budget", "show", "clear"
PERSON_BUDGET, SERVER_BUDGET = "budget-person", "budget-server"  # their names in the store
WORDS = "persona NAME|clear, prompt TEXT|clear, rate-limit N, budget person|server N, show"
LARGEST = 10**12  # a number beyond any real limit (and within the stores' integers)
SHOWN_PROMPT_CHARS = 1000

NO_SERVER = "Server settings belong to a server: use this in a Discord server or a Slack workspace."
ADMINS_ONLY = "Only this server's admins can see or change its settings."


class BadSetting(Exception):
    """Words that change no setting; the message says what was wrong."""


def namespace(server_id: str) -> str:
    """Where a server's settings are kept in the store's preferences."""
    return f"server:{server_id}"


@dataclass(frozen=True)
class Limits:
    """Messages per person per minute and tokens per person and per server per day; 0: none."""

    rate_limit: int = 0
    person_budget: int = 0
    server_budget: int = 0


@dataclass(frozen=True)
class ServerSettings:
    """A server's own choices; unset ones leave the host's in force."""

    persona: str | None = None
    prompt: str | None = None
    own: Limits = Limits()

    @classmethod
    def from_preferences(cls, values: dict[str, str]) -> "ServerSettings":
        return cls(values.get(PERSONA), values.get(PROMPT), Limits(
            _number(values.get(RATE_LIMIT)), _number(values.get(PERSON_BUDGET)), _number(values.get(SERVER_BUDGET))))

    def limits(self, host: Limits) -> Limits:
        """The limits in force here: the stricter of the host's and the server's own."""
        return Limits(*(stricter(h, o) for h, o in zip(
            (host.rate_limit, host.person_budget, host.server_budget),
            (self.own.rate_limit, self.own.person_budget, self.own.server_budget))))


@dataclass(frozen=True)
class Change:
    """One setting to keep (`value` None: drop it, back to the host's)."""

    name: str
    value: str | None


class Servers:
    """The servers a service answers in: their settings and today's budgets, in the store. Methods
    that read or write the store raise StoreUnavailable when it cannot be reached."""

    def __init__(self, config: Config, store: ConversationStore):
        self.config = config
        self.store = store

    def host_limits(self, platform: str) -> Limits:
        """The host's limits on a platform (config.yaml: `<platform>.rate_limit_per_minute` and `limits:`)."""
        section = getattr(self.config, platform, None)
        limits = self.config.limits
        return Limits(getattr(section, "rate_limit_per_minute", 0), limits.tokens_per_person_per_day,
                      limits.tokens_per_server_per_day)

    async def settings(self, key: ConversationKey) -> ServerSettings:
        """The settings of the conversation's server (none outside a server)."""
        if key.server is None:
            return ServerSettings()
        return ServerSettings.from_preferences(await self.store.preferences(namespace(key.server_id)))

    async def budget(self, key: ConversationKey, author_id: str | None,
                     settings: ServerSettings | None = None, *, counted: bool = False) -> Budget:
        """Today's tokens of this person in the conversation's server, against the limits in force
        (nobody's own budget without an `author_id`). Where no limit applies the counts are read only
        when `counted` (/usage): admission needs no store round trip then."""
        settings = settings or await self.settings(key)
        limits = settings.limits(self.host_limits(key.platform))
        person_limit = limits.person_budget if author_id else 0
        if not (counted or person_limit or limits.server_budget):
            return Budget(0, 0, 0, 0)
        mine, everyone = await self.store.tokens_used(key.server_id, author_id or "", utc_day())
        return Budget(mine, person_limit, everyone, limits.server_budget)

    async def first_refusal_today(self, key: ConversationKey, author_id: str) -> bool:
        """True the first time today (on any replica) this person is refused here for a spent budget."""
        return await self.store.claim("budget-notice", f"{key.server_id}/{author_id}/{utc_day()}",
                                      seconds_left_today())

    async def count_tokens(self, key: ConversationKey, author_id: str | None, tokens: int) -> None:
        """Count tokens generated today for this person in the conversation's server."""
        await self.store.add_tokens(key.server_id, author_id or "", utc_day(), tokens)

    async def command(self, key: ConversationKey, words: str, *, admin: bool, author_id: str | None,
                      persona_named: Callable[[str], str], default_persona: str) -> str:
        """Show or change the settings of the conversation's server, and say what happened.
        `persona_named(name)` is the name of a persona that can be served (else PersonaError)."""
        if key.server is None:
            return NO_SERVER
        if not admin:
            return ADMINS_ONLY
        host = self.host_limits(key.platform)
        try:
            change = parse(words, host, self.config.service.max_input_chars)
            if change is None:
                return describe(await self.settings(key), host, default_persona)
            if change.name == PERSONA and change.value is not None:
                change = Change(PERSONA, persona_named(change.value))
        except BadSetting as exc:
            return str(exc)
        except PersonaError as exc:
            return exc.user_message
        await self.store.set_preference(namespace(key.server_id), change.name, change.value)
        log.info("server %s: %s %s by %s", key.server_id, change.name, "set" if change.value else "cleared", author_id)
        return confirm(change)


def parse(words: str, host: Limits, max_prompt_chars: int) -> Change | None:
    """The change these words ask for (None: show the settings); raises BadSetting for anything else.
    A persona's name is checked by the caller, which knows the personas."""
    setting, _, rest = words.strip().partition(" ")
    setting, rest = setting.lower(), rest.strip()
    if setting in ("", SHOW):
        return None
    if setting == PERSONA:
        if not rest:
            raise BadSetting("Name the persona this server's channels answer as (or `clear` for the host's default).")
        return Change(PERSONA, None if rest.lower() == CLEAR else rest)
    if setting == PROMPT:
        if not rest:
            raise BadSetting("Give the prompt's text (or `clear` to remove it).")
        if rest.lower() == CLEAR:
            return Change(PROMPT, None)
        if len(rest) > max_prompt_chars:
            raise BadSetting(f"That prompt has {len(rest)} characters; keep it to {max_prompt_chars}.")
        if not readable(rest):
            raise BadSetting("That prompt holds something that is not text I can read.")
        return Change(PROMPT, rest)
    if setting == RATE_LIMIT:
        return Change(RATE_LIMIT, _limit(rest, host.rate_limit, "messages per person per minute"))
    if setting == BUDGET:
        which, _, number = rest.partition(" ")
        which = which.lower()
        if which not in ("person", "server"):
            raise BadSetting("Say which budget: `budget person N` (tokens a day for each person) or "
                             "`budget server N` (for everyone together).")
        ceiling = host.person_budget if which == "person" else host.server_budget
        unit = "tokens per person per day" if which == "person" else "tokens per day for the server"
        return Change(PERSON_BUDGET if which == "person" else SERVER_BUDGET, _limit(number.strip(), ceiling, unit))
    raise BadSetting(f"There is no server setting {setting!r}. The settings: {WORDS}.")


def confirm(change: Change) -> str:
    """What the admin is told once a change is kept."""
    value = change.value
    if change.name == PERSONA:
        return (f"Done: this server's channels that have not chosen a persona answer as **{value}**." if value
                else "Done: this server's channels that have not chosen a persona answer as the host's default.")
    if change.name == PROMPT:
        return "Done: the server prompt is set." if value else "Done: the server prompt is removed."
    what = {RATE_LIMIT: "the rate limit", PERSON_BUDGET: "each person's daily budget",
            SERVER_BUDGET: "the server's daily budget"}[change.name]
    unit = "messages per person per minute" if change.name == RATE_LIMIT else "tokens"
    return f"Done: {what} here is now {value} {unit}." if value else f"Done: {what} here is the host's."


def describe(settings: ServerSettings, host: Limits, default_persona: str) -> str:
    """`/server show`: each setting, and the host's where it applies."""
    persona = f"**{settings.persona}**" if settings.persona else f"the host's default (**{default_persona}**)"
    prompt = settings.prompt or ""
    if len(prompt) > SHOWN_PROMPT_CHARS:  # the whole answer must fit one chat message
        prompt = f"{prompt[:SHOWN_PROMPT_CHARS]}… ({len(prompt)} characters)"
    prompt = f'"{prompt}" (for chat-format personas)' if prompt else "none"
    lines = [
        f"- persona: {persona}",
        f"- prompt: {prompt}",
        f"- rate-limit: {_own(settings.own.rate_limit, host.rate_limit, 'messages per person per minute')}",
        f"- budget person: {_own(settings.own.person_budget, host.person_budget, 'tokens per person per day')}",
        f"- budget server: {_own(settings.own.server_budget, host.server_budget, 'tokens per day')}",
    ]
    return "This server's settings:\n" + "\n".join(lines)


def _own(own: int, host: int, unit: str) -> str:
    hosts = f"{host} {unit}" if host else "no limit"
    return f"{own} {unit} (the host's: {hosts})" if own else f"the host's ({hosts})"


def _limit(text: str, ceiling: int, unit: str) -> str | None:
    """A limit the server may set (None: back to the host's); raises BadSetting."""
    try:
        number = int(text)
    except ValueError:
        raise BadSetting(f"Give a whole number of {unit} (0: the host's limit).") from None
    if number < 0 or number > LARGEST:
        raise BadSetting(f"Give a whole number of {unit} from 0 (the host's limit) to {LARGEST}.")
    if ceiling and number > ceiling:
        raise BadSetting(f"The host allows at most {ceiling} {unit}: choose from 1 to {ceiling} "
                         "(0: the host's limit).")
    return str(number) if number else None


def _number(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
