"""Discord's text rules: what the model reads of a message, Discord's limits, and what the bot
must be allowed to do (its invite)."""

from __future__ import annotations

import re

import discord

MESSAGE_LIMIT = 2000  # characters in one Discord message
THREAD_NAME_LIMIT = 100

_MENTION = re.compile(r"<(@!?|@&|#)(\d+)>")
_CUSTOM_EMOJI = re.compile(r"<a?:(\w+):\d+>")


def model_text(message: discord.Message, me: int, my_role: int | None) -> str:
    """The message as words: the bot's own mention (user or managed role) removed, other
    mentions turned into names, custom emoji into their names."""
    users = {user.id: user.display_name for user in message.mentions}
    roles = {role.id: role.name for role in message.role_mentions}
    guild = message.guild

    def name(match: re.Match) -> str:
        kind, ident = match.group(1), int(match.group(2))
        if kind == "#":
            channel = guild.get_channel_or_thread(ident) if guild else None
            return f"#{channel.name}" if channel else "#channel"
        if kind == "@&":
            if ident == my_role:
                return ""
            if ident in roles:
                return roles[ident]
            role = guild.get_role(ident) if guild else None
            return role.name if role else "a role"
        return "" if ident == me else users.get(ident, "someone")

    text = _CUSTOM_EMOJI.sub(r":\1:", _MENTION.sub(name, message.content))
    text = re.sub(r"[ \t]{2,}", " ", text)
    return "\n".join(line.strip() for line in text.strip().splitlines())


def thread_name(text: str) -> str:
    """A thread title from the message that opened it."""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    if len(first_line) > THREAD_NAME_LIMIT:
        first_line = first_line[: THREAD_NAME_LIMIT - 1].rstrip() + "…"
    return first_line or "Conversation"


def invite_permissions(auto_thread: bool, voice: bool = False) -> discord.Permissions:
    """Exactly what the bot uses: read and answer (replies need the history), react (the rate-limit
    notice), threads if it opens them, Connect and Speak if it speaks in voice channels."""
    permissions = discord.Permissions(
        view_channel=True, send_messages=True, send_messages_in_threads=True, read_message_history=True,
        add_reactions=True,
    )
    permissions.create_public_threads = auto_thread
    permissions.connect = permissions.speak = voice
    return permissions


def invite_url(application_id: int, auto_thread: bool, voice: bool = False) -> str:
    return discord.utils.oauth_url(
        application_id, permissions=invite_permissions(auto_thread, voice), scopes=("bot", "applications.commands")
    )
