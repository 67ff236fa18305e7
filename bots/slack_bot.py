"""The Slack adapter: Socket Mode (default) or the Events API over HTTP, on the shared ChatService.

Listeners only acknowledge and hand over (Slack wants an ack within 3 seconds); the life of a
reply then reads top to bottom in `SlackAdapter._answer`: access and rate checks, the message
as words, a placeholder in the thread, the reply streamed into it by edits.

Where it answers: an `app_mention` in the thread of the mention; every DM (in its thread when
threaded); a follow-up in a thread it already answered in, without a new mention
(`slack.thread_followups`). One conversation per thread, and per DM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Hashable

from aiohttp import WSMessage, WSMsgType, web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack_format import LiveReply, mentioned_users, readable, stream_reply, to_mrkdwn
from core.config import Settings
from core.conversation import ConversationKey
from core.service import ChatError, ChatService
from core.ratelimit import RateLimiter

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://slack.com/api/"
APOLOGY = "Sorry, something went wrong on my side. Please try again."
NOT_HERE = "Sorry, I'm not available to you here."
CHANNEL_RESET = (
    "In a channel every thread is its own conversation: mention me in a new message for a fresh start. "
    "(`reset` forgets a direct-message conversation.)"
)
# Message subtypes that are a person writing; edits, joins, bot posts and the like are not answered.
ANSWERED_SUBTYPES = {None, "thread_broadcast", "file_share"}


def create_adapter(service: ChatService, settings: Settings) -> "SlackAdapter":
    return SlackAdapter(service, settings)


@dataclass(frozen=True)
class Place:
    """Where a reply goes, and so which conversation a message belongs to."""

    channel: str
    thread_ts: str | None  # None: the DM itself, not a thread in it
    is_dm: bool

    @classmethod
    def of(cls, event: dict) -> "Place":
        channel = event["channel"]
        if event.get("channel_type") == "im" or channel.startswith("D"):
            return cls(channel, event.get("thread_ts"), True)
        return cls(channel, event.get("thread_ts") or event["ts"], False)

    @property
    def key(self) -> ConversationKey:
        return ConversationKey("slack", f"{self.channel}/{self.thread_ts}" if self.thread_ts else self.channel)

    @property
    def channel_key(self) -> ConversationKey:
        """Where `/ttt persona` is kept for the channel (slash commands do not know threads)."""
        return ConversationKey("slack", self.channel)


class SlackAdapter:
    """Answers Slack messages through the ChatService; `url` is the events URL in HTTP mode."""

    name = "slack"

    def __init__(self, service: ChatService, settings: Settings, *, ping_interval: float = 10.0):
        cfg = settings.config.slack
        secrets = settings.secrets
        self.service = service
        self.config = cfg
        self.client = AsyncWebClient(token=secrets.get("SLACK_BOT_TOKEN"), base_url=_api_url(cfg.api_base_url))
        self.client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
        http = cfg.mode == "http"
        self.app = AsyncApp(
            name="talk-to-transformers",
            client=self.client,
            signing_secret=secrets.get("SLACK_SIGNING_SECRET") or "",
            request_verification_enabled=http,
        )
        self._app_token = secrets.get("SLACK_APP_TOKEN")
        self._ping_interval = ping_interval
        self.bot_user_id = ""
        self._names: dict[str, str] = {}
        # (channel, ts) of messages answered: Slack retries a delivery (same event_id) when an ack
        # is late, and a mention arrives twice (app_mention and message.channels).
        self._messages = RecentKeys()
        self._threads = RecentKeys()  # threads being answered, before their first turn is stored
        self._limiter = RateLimiter(cfg.rate_limit_per_minute)
        self._tasks: set[asyncio.Task] = set()
        self._handler: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._listen(self.app)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        auth = await self.client.auth_test()
        self.bot_user_id = auth["user_id"]
        if self.config.mode == "socket":
            # connect_async() retries a rejected app token forever: ask once so that it fails here.
            await self.client.apps_connections_open(app_token=self._app_token)
            self._handler = AsyncSocketModeHandler(self.app, self._app_token, ping_interval=self._ping_interval)
            self._handler.client.on_message_listeners.append(self._on_socket_message)
            self._handler.client.on_close_listeners.append(self._on_socket_close)
            await self._handler.connect_async()
            where = "Socket Mode"
        else:
            runner = web.AppRunner(self.app.web_app(path=self.config.http_path), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, self.config.http_host, self.config.http_port).start()
            except BaseException:
                await runner.cleanup()
                raise
            self._runner = runner
            where = self.url
        self.service.metrics.adapter_up.labels(self.name).set(1)
        log.info("slack adapter up as %s (%s) via %s", auth.get("user"), self.bot_user_id, where)

    async def stop(self) -> None:
        """Stop taking events, then let the replies in flight finish."""
        if self._handler is not None:
            await self._handler.close_async()
            self._handler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self.service.metrics.adapter_up.labels(self.name).set(0)

    @property
    def url(self) -> str:
        """The Events API URL being served (HTTP mode, once started)."""
        port = self._runner.addresses[0][1] if self._runner else self.config.http_port
        return f"http://{self.config.http_host}:{port}{self.config.http_path}"

    async def _on_socket_message(self, message: WSMessage) -> None:
        if message.type == WSMsgType.TEXT and json.loads(message.data).get("type") == "hello":
            self.service.metrics.adapter_up.labels(self.name).set(1)

    async def _on_socket_close(self, message: WSMessage) -> None:
        self.service.metrics.adapter_up.labels(self.name).set(0)

    # ---- listeners: acknowledge, hand over -------------------------------------------------

    def _listen(self, app: AsyncApp) -> None:
        # bolt acks events before it runs these listeners; they only hand the work to a task.
        @app.event("app_mention")
        async def on_mention(event: dict) -> None:
            if not _from_bot(event):
                self._spawn(self._answer(event, Place.of(event)))

        @app.event("message")
        async def on_message(event: dict) -> None:
            if not _from_bot(event):
                self._spawn(self._on_message(event))

        @app.command(self.config.slash_command)
        async def on_command(ack, command: dict, respond) -> None:
            await ack()
            self._spawn(self._command(command, respond))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_message(self, event: dict) -> None:
        if event.get("subtype") not in ANSWERED_SUBTYPES:
            return
        place = Place.of(event)
        if not place.is_dm:
            # In channels only follow-ups are ours here: mentions come as app_mention events (and the
            # same message seen twice is answered once, see _answer).
            if not event.get("thread_ts") or not self.config.thread_followups or not await self._took_part(place):
                return
        await self._answer(event, place)

    async def _took_part(self, place: Place) -> bool:
        """Whether the bot answers in this thread (its turns are stored, so this survives restarts)."""
        return place.key in self._threads or bool(await self.service.store.recent_turns(place.key, 1))

    # ---- the life of a reply ---------------------------------------------------------------

    async def _answer(self, event: dict, place: Place) -> None:
        user = event.get("user", "")
        if not self._messages.add((place.channel, event["ts"])):
            return
        if not self._allowed(place.channel, user, place.is_dm):
            log.info("not answering %s in %s: slack.allowed_users/allowed_channels", user, place.channel)
            return
        wait = self._limiter.check(user)
        if wait:
            notice = f"You're writing faster than I can answer: try again in {math.ceil(wait)} seconds."
            await self._ephemeral(place, user, notice)
            return
        self._threads.add(place.key)
        text = await self._readable(event.get("text") or "")
        author = await self._name(user)
        reply = LiveReply(self.client, place.channel, place.thread_ts)
        await reply.start()
        try:
            persona = await self._channel_persona(place)
            updates = self.service.respond(place.key, author, text, adapter="slack", persona=persona)
            await stream_reply(reply, updates, self.config.stream_edit_interval_s)
        except ChatError as exc:
            await reply.show(exc.user_message, final=True)
        except Exception:
            log.exception("reply in %s failed", place.key)
            await reply.show(APOLOGY, final=True)

    def _allowed(self, channel: str, user: str, is_dm: bool) -> bool:
        cfg = self.config
        if cfg.allowed_users and user not in cfg.allowed_users:
            return False
        return is_dm or not cfg.allowed_channels or channel in cfg.allowed_channels

    async def _channel_persona(self, place: Place) -> str | None:
        """A thread speaks with the persona chosen for its channel (`/ttt persona`), if any."""
        if place.key == place.channel_key:
            return None
        chosen = await self.service.store.persona(place.channel_key)
        return chosen if chosen in {p.name for p in self.service.persona_list()} else None

    async def _readable(self, text: str) -> str:
        names = {user: await self._name(user) for user in mentioned_users(text) - {self.bot_user_id}}
        return readable(text, names, self.bot_user_id)

    async def _name(self, user: str) -> str:
        """The user's display name (users.info, cached); the id when Slack will not say."""
        if user in self._names:
            return self._names[user]
        try:
            info = (await self.client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning("users.info %s failed: %s", user, exc.response.get("error"))
            return user
        profile = info.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or info.get("name") or user
        self._names[user] = name
        return name

    async def _ephemeral(self, place: Place, user: str, text: str) -> None:
        try:
            await self.client.chat_postEphemeral(channel=place.channel, user=user, thread_ts=place.thread_ts, text=text)
        except SlackApiError as exc:
            log.warning("chat.postEphemeral in %s failed: %s", place.channel, exc.response.get("error"))

    # ---- slash command ---------------------------------------------------------------------

    async def _command(self, command: dict, respond) -> None:
        channel, user = command["channel_id"], command["user_id"]
        is_dm = channel.startswith("D")
        name, _, argument = (command.get("text") or "").strip().partition(" ")
        name = name.lower() or "help"
        if not self._allowed(channel, user, is_dm):
            text = NOT_HERE
        elif name == "reset" and not is_dm:
            text = CHANNEL_RESET
        else:
            text = await self.service.command(ConversationKey("slack", channel), name, argument)
        await respond(text=to_mrkdwn(text), response_type="ephemeral")


class RecentKeys:
    """A bounded set of recently seen keys, oldest forgotten first."""

    def __init__(self, size: int = 10_000):
        self._size = size
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> bool:
        """Remember `key`; False when it was already there."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys


def _from_bot(event: dict) -> bool:
    # bolt already drops this bot's own events; other bots are ignored too (no bot-to-bot loops).
    return bool(event.get("bot_id") or event.get("subtype") == "bot_message")


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception:
        log.exception("handling a Slack event failed")


def _api_url(configured: str | None) -> str:
    # slack_sdk joins method names onto the base URL, which must end with "/".
    return (configured or DEFAULT_API_URL).rstrip("/") + "/"
