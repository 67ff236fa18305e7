"""Slack formatting: what the model reads from a message, and how a reply is shown in Slack.

Incoming text carries Slack's markup (`<@U123>`, `<#C1|general>`, `<https://x|label>`, `&amp;`);
the model should read words. Outgoing text is escaped (`&`, `<`, `>`) so that nothing a model
writes can form a control sequence (`<!channel>`, `<@U123>`), and split to fit in messages
(`render`) without cutting an escape; `ThreadMessages` posts, edits and deletes them.
"""

from __future__ import annotations

import re
from typing import Mapping

from slack_sdk.web.async_client import AsyncWebClient

from bots.chat.split import split_text

MESSAGE_LIMIT = 4000  # characters of one message's text (Slack truncates far later, but advises this)
STREAMING_MARK = " …"  # shown after a reply that is still being written
PLACEHOLDER = "_thinking…_"  # shown until the first words of a reply

_USER = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL = re.compile(r"<#([CG][A-Z0-9]+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!([a-z]+)(?:\^[^|>]*)?(?:\|([^>]*))?>")  # <!here>, <!subteam^S1|@team>, <!date^..|x>
_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ENTITY = re.compile(r"&(?:amp|lt|gt);")  # what escape() writes: never cut in two
_SPACES = re.compile(r"[ \t]{2,}")


def mentioned_users(text: str) -> set[str]:
    """User ids mentioned in a message's text."""
    return {match[1] for match in _USER.finditer(text)}


def readable(text: str, names: Mapping[str, str], bot_user_id: str) -> str:
    """A message as a person reads it: the bot's own mention dropped, other mentions as @names."""
    text = _USER.sub(lambda m: "" if m[1] == bot_user_id else "@" + (names.get(m[1]) or m[2] or m[1]), text)
    text = _CHANNEL.sub(lambda m: "#" + (m[2] or m[1]), text)
    text = _SPECIAL.sub(lambda m: m[2] or "@" + m[1], text)
    text = _LINK.sub(lambda m: m[2] or m[1].removeprefix("mailto:"), text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return _SPACES.sub(" ", text).strip()


def escape(text: str) -> str:
    """Slack's required escaping: afterwards no `<...>` control sequence is left."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(text: str) -> str:
    """Escaped text with Markdown bold (`**x**`, as models and core messages write it) as Slack's `*x*`."""
    return _BOLD.sub(r"*\1*", escape(text))


def render(text: str, final: bool) -> list[str]:
    """A reply as Slack messages: escaped mrkdwn, a mark while it is still being written, split
    to Slack's limit."""
    return split_text(to_mrkdwn(text) + ("" if final else STREAMING_MARK), MESSAGE_LIMIT, unbreakable=_ENTITY)


class ThreadMessages:
    """The bot's messages showing one reply in a channel or thread (a `Surface` for ReplyView)."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str | None):
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts

    async def post(self, text: str, *, first: bool) -> str:
        response = await self._client.chat_postMessage(
            channel=self._channel, thread_ts=self._thread_ts, text=text, unfurl_links=False, unfurl_media=False,
        )
        return response["ts"]

    async def edit(self, ts: str, text: str) -> str:
        await self._client.chat_update(channel=self._channel, ts=ts, text=text)
        return ts

    async def delete(self, ts: str) -> None:
        await self._client.chat_delete(channel=self._channel, ts=ts)
