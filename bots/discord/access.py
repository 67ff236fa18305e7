"""Where and for whom the bot works on Discord: the access lists of `discord:` in config.yaml."""

from __future__ import annotations

import discord

from core.config.schema import DiscordSection


class Access:
    """Where and for whom the bot works: every non-empty allow list must match, no block list may."""

    def __init__(self, config: DiscordSection):
        self.config = config

    def allows(self, user: discord.abc.User, guild_id: int | None, channel) -> bool:
        c = self.config
        if not _passes(user.id, c.allowed_users, c.blocked_users):
            return False
        if guild_id is None:
            return c.dms
        if not _passes(guild_id, c.allowed_guilds, c.blocked_guilds):
            return False
        # A thread counts as its parent channel too, a channel as its category.
        places = {getattr(channel, attr, None) for attr in ("id", "parent_id", "category_id")} - {None}
        if not _passes_any(places, c.allowed_channels, c.blocked_channels):
            return False
        roles = {role.id for role in getattr(user, "roles", ())}
        return _passes_any(roles, c.allowed_roles, c.blocked_roles)


def _passes(ident: int, allowed: list[int], blocked: list[int]) -> bool:
    return ident not in blocked and (not allowed or ident in allowed)


def _passes_any(idents: set[int], allowed: list[int], blocked: list[int]) -> bool:
    return not idents & set(blocked) and (not allowed or bool(idents & set(allowed)))
