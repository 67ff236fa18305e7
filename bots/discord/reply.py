"""How the bot's Discord replies are posted: as replies that ping nobody, split at Discord's
message limit, edited no faster than Discord allows. Shared by typed (adapter.py) and
spoken (voice/listening.py) turns."""

from __future__ import annotations

import logging

import discord

from bots.discord.format import MESSAGE_LIMIT
from bots.chat.split import split_text

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
# Discord does not publish its limits; message edits are counted per channel, about 5 in 5 seconds.
EDITS_PER_CHANNEL = (5, 5.0)


def render(text: str, final: bool) -> list[str]:
    """A reply as the Discord messages that show it (a `render` for ReplyView)."""
    return split_text(text, MESSAGE_LIMIT)


class ReplyMessages:
    """The bot's messages answering one message (a `Surface` for ReplyView): the first is a
    Discord reply to it, the others follow; nothing they say can ping anyone."""

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None):
        self.channel = channel
        self.reply_to = reply_to

    async def post(self, text: str, *, first: bool) -> discord.Message:
        reference = self.reply_to.to_reference(fail_if_not_exists=False) if first and self.reply_to else None
        return await self.channel.send(text, reference=reference, allowed_mentions=NO_PINGS)

    async def edit(self, message: discord.Message, text: str) -> discord.Message:
        return await message.edit(content=text, allowed_mentions=NO_PINGS)

    async def delete(self, message: discord.Message) -> None:
        await message.delete()


async def tell_privately(person: discord.abc.User, text: str, *, instead: discord.abc.Messageable,
                         about: discord.Message | None = None) -> None:
    """Tell only this person, in a direct message; when their DMs are closed, say it in `instead`
    (as a reply to `about`), where they can still see why. A failure is logged, never raised."""
    try:
        await person.send(text, allowed_mentions=NO_PINGS)
        return
    except discord.HTTPException as exc:
        log.info("discord: could not send %s a direct message (%s); telling them in channel %s",
                 person.id, exc, getattr(instead, "id", "?"))
    reference = about.to_reference(fail_if_not_exists=False) if about else None
    try:
        await instead.send(text, reference=reference, allowed_mentions=NO_PINGS)
    except discord.HTTPException as exc:
        log.warning("discord: could not tell %s why they got no reply: %s", person.id, exc)
