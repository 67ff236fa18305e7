"""The chat commands every entry point offers, and who may switch a persona.

`server` (a server's settings, core/servers.py) is offered only where there are servers (Discord,
Slack): their help says so with `HelpStyle.servers`.

What a command does lives in ChatService.command; what it is called and how its help reads on a
platform (`/reset` on Discord, `/ttt reset` on Slack, `/reset` in a terminal) is the platform's
`HelpStyle`; the help itself is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Literal, Mapping

RESET, PERSONA, PERSONAS, FORGET_ME, USAGE, HELP = "reset", "persona", "personas", "forget-me", "usage", "help"
SERVER = "server"

# Each command with what it does, as the help says it (a platform may say it differently: HelpStyle.notes).
MEANINGS = {
    RESET: "forgets this conversation",
    PERSONA: "shows or switches who I am here (`{persona} NAME` switches)",
    PERSONAS: "lists who I can be",
    FORGET_ME: "deletes everything you wrote to me",
    USAGE: "shows how many tokens you and this server used today (and the daily budgets)",
    SERVER: "shows or changes this server's settings (for its admins)",
    HELP: "shows this",
}


@dataclass(frozen=True)
class HelpStyle:
    """How one entry point says its help: how to talk to the bot there, how a command is written
    (`written.format(name)`), what a command means there where it differs, its own extras, and
    whether it has servers (and so the `server` command)."""

    talk: str
    written: str = "`/{}`"
    notes: Mapping[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    servers: bool = False


GENERIC = HelpStyle("Talk to me by mentioning me or messaging me directly.", written="`{}`")


def help_text(style: HelpStyle = GENERIC) -> str:
    """The help of an entry point: how to talk, then each command with what it does there."""
    persona = style.written.format(PERSONA)
    parts = [
        f"{style.written.format(name)} {style.notes.get(name, meaning).format(persona=persona.strip('`'))}"
        for name, meaning in MEANINGS.items() if name != SERVER or style.servers
    ]
    return f"{style.talk} {', '.join([*parts, *style.extra])}."


@dataclass(frozen=True)
class SwitchPolicy:
    """Who may switch a persona with `persona NAME`: everyone, only admins, or admins and the people
    or roles listed (`listed`). `admins` and `listed_as` are how the platform names them."""

    rule: Literal["everyone", "admins", "listed"]
    listed: Collection[object] = ()
    admins: str = "admins"
    listed_as: str = "the people this bot's settings name"

    def allows(self, *, admin: bool, holds: Collection[object] = (), private: bool = False) -> bool:
        """Admins may always switch, and anyone in a private conversation; others as the rule says
        (`holds`: the person's own ids, e.g. their user id or their roles)."""
        if private or admin or self.rule == "everyone":
            return True
        return self.rule == "listed" and any(ident in self.listed for ident in holds)

    def refusal(self) -> str:
        if self.rule == "listed":
            return f"Only {self.admins} and {self.listed_as} can switch my persona here."
        return f"Only {self.admins} can switch my persona here."
