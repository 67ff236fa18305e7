"""Slack formatting: what the model reads from a message, and how a reply is shown in Slack.

Incoming text carries Slack's markup (`<@U123>`, `<#C1|general>`, `<https://x|label>`, `&amp;`);
the model should read words. Outgoing text is escaped (`&`, `<`, `>`) so that nothing a model
writes can form a control sequence (`<!channel>`, `<@U123>`), is split to fit in messages, and
grows by edits of a placeholder (`LiveReply`, `stream_reply`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import AsyncIterator, Mapping

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from core.service import ReplyUpdate

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 4000  # characters of one message's text (Slack truncates far later, but advises this)
STREAMING_MARK = " …"  # shown after a reply that is still being written
PLACEHOLDER = "_thinking…_"  # shown until the first words of a reply

_USER = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL = re.compile(r"<#([CG][A-Z0-9]+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!([a-z]+)(?:\^[^|>]*)?(?:\|([^>]*))?>")  # <!here>, <!subteam^S1|@team>, <!date^..|x>
_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
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


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Pieces of at most `limit` characters, cut at a line break or space where one is near the end.

    A cut never falls inside an escape (`&amp;`), so every piece is valid on its own.
    """
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit + 1)
        if cut < 0:
            cut = text.rfind(" ", limit // 2, limit + 1)
        if cut < 0:
            cut = limit
            entity = text.rfind("&", cut - 4, cut)
            if entity >= 0 and ";" not in text[entity:cut]:
                cut = entity
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    pieces.append(text)
    return [piece for piece in pieces if piece]


class LiveReply:
    """The message(s) showing one reply: a placeholder first, then edited as the reply grows."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str | None):
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._shown: list[tuple[str, str]] = []  # (ts, text) of each message, in order

    async def start(self) -> None:
        await self._post(PLACEHOLDER)

    async def show(self, text: str, *, final: bool = False) -> None:
        """Show `text` (plain; escaped here), split over as many messages as Slack's limit needs."""
        pieces = split_message(to_mrkdwn(text) + ("" if final else STREAMING_MARK))
        for i, piece in enumerate(pieces):
            if i == len(self._shown):
                await self._post(piece)
            elif self._shown[i][1] != piece:
                ts = self._shown[i][0]
                await self._client.chat_update(channel=self._channel, ts=ts, text=piece)
                self._shown[i] = (ts, piece)
        for ts, _ in self._shown[len(pieces):]:  # a final text can be shorter than the stream was
            await self._client.chat_delete(channel=self._channel, ts=ts)
        del self._shown[len(pieces):]

    async def _post(self, text: str) -> None:
        response = await self._client.chat_postMessage(
            channel=self._channel, thread_ts=self._thread_ts, text=text,
            unfurl_links=False, unfurl_media=False,
        )
        self._shown.append((response["ts"], text))


async def stream_reply(reply: LiveReply, updates: AsyncIterator[ReplyUpdate], interval: float) -> None:
    """Show a growing reply with at most one edit per `interval` seconds; the final text at once.

    Raises what the updates raise (ChatError).
    """
    latest: ReplyUpdate | None = None
    changed = asyncio.Event()

    async def pump() -> None:
        nonlocal latest
        async for update in updates:
            latest = update
            changed.set()

    pumping = asyncio.create_task(pump())
    try:
        while True:
            waiting = asyncio.create_task(changed.wait())
            await asyncio.wait({pumping, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if pumping.done():
                break
            changed.clear()
            try:
                await reply.show(latest.text)
            except SlackApiError as exc:  # a missed edit is not worth the reply: the next one catches up
                log.warning("streaming edit failed: %s", exc.response.get("error"))
            await asyncio.wait({pumping}, timeout=interval)
        pumping.result()
        await reply.show(latest.text, final=True)
    finally:
        pumping.cancel()
