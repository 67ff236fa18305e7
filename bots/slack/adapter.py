"""The Slack adapter: Socket Mode (default) or the Events API over HTTP, on the shared ChatService.

Listeners only acknowledge and hand over (Slack wants an ack within 3 seconds), taking the
message's place in its conversation as it arrives; the life of a reply then reads top to bottom
in `SlackAdapter._answer`: answered once (across replicas), access, words, rate and budget checks,
the text files shared with it read in, a placeholder in the thread, the reply streamed into it by
edits (bots/chat/view.py).

Where it answers: an `app_mention` in the thread of the mention; every DM (in its thread when
threaded); a follow-up in a thread it already answered in, without a new mention
(`slack.thread_followups`). One conversation per thread, and per DM; a thread inherits the
persona chosen for its channel (`/ttt persona` in the channel). Every conversation, DMs included,
is in the workspace's server: its settings (`/ttt server ...`, for workspace admins and owners)
and budgets apply.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from aiohttp import WSMessage, WSMsgType, web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack.format import PLACEHOLDER, ThreadMessages, mentioned_users, readable, render, to_mrkdwn
from bots.chat.edits import EditBudget
from bots.chat.files import Download
from bots.chat.ordering import ReplyTasks, finish_within_s
from bots.chat.view import ReplyView, stream_reply, take_message
from core.config.loading import Settings
from core.config.schema import SlackSection
from core.conversation import ConversationKey, StoreUnavailable
from core import commands
from core.files import AttachedFile
from core.service import ChatService

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://slack.com/api/"
NOT_HERE = "Sorry, I'm not available to you here."
CHANNEL_RESET = (
    "In a channel every thread is its own conversation: mention me in a new message for a fresh start. "
    "(`reset` forgets a direct-message conversation.)"
)
# Message subtypes that are a person writing; edits, joins, bot posts and the like are not answered.
ANSWERED_SUBTYPES = {None, "thread_broadcast", "file_share"}
# chat.update is limited per workspace: about 50 a minute (Slack's tier 3).
EDITS_PER_WORKSPACE = (50, 60.0)
# Slack retries an event for a few minutes (and sends a mention twice: app_mention and message.*).
ANSWERED_FOR_S = 3600.0


def help_text(command: str) -> str:
    """What `/ttt help` says, naming the configured slash command."""
    return commands.help_text(commands.HelpStyle(
        "Mention me in a channel (I answer in its thread) or message me directly; in a thread I've "
        "answered in, just keep talking.",
        written=f"`{command} {{}}`",
        notes={commands.RESET: "forgets a direct-message conversation (in a channel, each thread is its own)",
               commands.PERSONA: "shows or switches who I am here (in a channel: for its threads; "
                                 "`{persona} NAME` switches)",
               commands.SERVER: "shows or changes this workspace's settings (for workspace admins and owners)"},
        servers=True,
    ))


def create_adapter(service: ChatService, settings: Settings) -> "SlackAdapter":
    return SlackAdapter(service, settings)


@dataclass(frozen=True)
class Place:
    """Where a reply goes, and so which conversation a message belongs to."""

    channel: str
    thread_ts: str | None  # None: the DM itself, not a thread in it
    is_dm: bool
    team: str  # the workspace: the conversation's server

    @classmethod
    def of(cls, event: dict, team: str) -> "Place":
        channel = event["channel"]
        if event.get("channel_type") == "im" or channel.startswith("D"):
            return cls(channel, event.get("thread_ts"), True, team)
        return cls(channel, event.get("thread_ts") or event["ts"], False, team)

    @property
    def key(self) -> ConversationKey:
        """A thread's conversation inherits its channel's (or DM's) persona."""
        if self.thread_ts:
            return ConversationKey("slack", f"{self.channel}/{self.thread_ts}", parent=self.channel, server=self.team)
        return ConversationKey("slack", self.channel, server=self.team)


class SlackAdapter:
    """Answers Slack messages through the ChatService; `url` is the events URL in HTTP mode."""

    name = "slack"

    def __init__(
        self, service: ChatService, settings: Settings, *, ping_interval: float = 10.0,
        edit_budget: EditBudget | None = None,
    ):
        cfg = settings.config.slack
        secrets = settings.secrets
        self.service = service
        self.config: SlackSection = cfg
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
        self.team_id = ""
        self._names: dict[str, str] = {}
        rule = "listed" if cfg.persona_switch == "users" else cfg.persona_switch
        self._switch = commands.SwitchPolicy(rule, cfg.persona_switch_users, admins="workspace admins")
        self._replies = ReplyTasks("slack")
        self._edits = edit_budget or EditBudget(*EDITS_PER_WORKSPACE)
        self._handler: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._listen(self.app)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        auth = await _accepted(self.client.auth_test(), "SLACK_BOT_TOKEN")
        self.bot_user_id, self.team_id = auth["user_id"], auth.get("team_id", "")
        if self.config.mode == "socket":
            # connect_async() retries a rejected app token forever: ask once so that it fails here.
            await _accepted(self.client.apps_connections_open(app_token=self._app_token), "SLACK_APP_TOKEN")
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
        """Stop taking events, then let the replies in flight finish (for a bounded time)."""
        if self._handler is not None:
            await self._handler.close_async()
            self._handler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._replies.stop(finish_within_s(self.service.config))
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
        # bolt acks events before it runs these listeners; they only take the message's place in
        # its conversation (before any await: that is its arrival) and hand the work to a task.
        @app.event("app_mention")
        async def on_mention(event: dict) -> None:
            if not _from_bot(event):
                place = Place.of(event, self.team_id)
                self._replies.spawn(self._answer(event, place, followup=False), conversation=place.key)

        @app.event("message")
        async def on_message(event: dict) -> None:
            if _from_bot(event) or event.get("subtype") not in ANSWERED_SUBTYPES:
                return
            place = Place.of(event, self.team_id)
            # In channels only follow-ups in threads are ours here: mentions come as app_mention events.
            followup = not place.is_dm
            if followup and (not event.get("thread_ts") or not self.config.thread_followups):
                return
            self._replies.spawn(self._answer(event, place, followup=followup), conversation=place.key)

        @app.command(self.config.slash_command)
        async def on_command(ack, command: dict, respond) -> None:
            await ack()
            self._replies.spawn(self._command(command, respond))

    # ---- the life of a reply ---------------------------------------------------------------

    async def _answer(self, event: dict, place: Place, *, followup: bool) -> None:
        """Runs after the earlier messages of the conversation were answered."""
        user = event.get("user", "")
        if followup and not await self._took_part(place):
            return
        # Once per message: Slack retries deliveries and sends a mention twice (app_mention and
        # message.*), possibly to different replicas.
        try:
            first = await self.service.first_delivery("slack-message", f"{place.channel}/{event['ts']}", ANSWERED_FOR_S)
        except StoreUnavailable as exc:  # answer anyway: the reply says the memory is unreachable
            log.warning("%s: message %s not claimed, the store is unavailable: %s", place.key, event["ts"], exc)
            first = True
        if not first:
            return
        if not self._allowed(place.channel, user, place.is_dm):
            log.info("not answering %s in %s: slack.allowed_users/allowed_channels", user, place.channel)
            return
        if not followup:  # a mention: the thread is the bot's from now on, on every replica
            try:
                await self.service.take_part(place.key)
            except StoreUnavailable as exc:
                log.warning("%s: not marked as taken up, the store is unavailable: %s", place.key, exc)
        view = ReplyView(ThreadMessages(self.client, place.channel, place.thread_ts), render, self._edits,
                         self.team_id, str(place.key))

        async def slow_down(wait_s: float) -> None:  # only they see it
            notice = f"You're writing faster than I can answer: try again in {math.ceil(wait_s)} seconds."
            await self._ephemeral(place, user, notice)

        async def tell(text: str) -> None:
            await self._ephemeral(place, user, text)

        taken = await take_message(
            self.service, view, await self._readable(event.get("text") or ""),
            key=place.key, author_id=user, slow_down=slow_down, tell=tell, files=self._files(event),
        )
        if taken is None:
            return
        author = await self._name(user)
        await view.begin(PLACEHOLDER)
        updates = self.service.respond(place.key, author, taken, adapter="slack", author_id=user)
        await stream_reply(view, updates, interval_s=self.config.stream_edit_interval_s)

    def _files(self, event: dict) -> list[Download]:
        """The files shared with a message, fetched with the bot token (Slack's files are private)."""
        token = {"Authorization": f"Bearer {self.client.token}"}
        return [
            Download(AttachedFile(f.get("name") or f.get("title") or "file", int(f.get("size") or 0),
                                  f.get("mimetype")), url, token)
            for f in event.get("files") or () if (url := f.get("url_private_download") or f.get("url_private"))
        ]

    async def _took_part(self, place: Place) -> bool:
        """Whether the bot answers in this thread (its turns are stored, so this survives restarts)."""
        try:
            return await self.service.took_part(place.key)
        except StoreUnavailable as exc:  # not knowing, stay out of a thread rather than barge in
            log.warning("%s: cannot tell whether I answer in this thread: %s", place.key, exc)
            return False

    def _allowed(self, channel: str, user: str, is_dm: bool) -> bool:
        cfg = self.config
        if cfg.allowed_users and user not in cfg.allowed_users:
            return False
        return is_dm or not cfg.allowed_channels or channel in cfg.allowed_channels

    async def _readable(self, text: str) -> str:
        names = {user: await self._name(user) for user in mentioned_users(text) - {self.bot_user_id}}
        return readable(text, names, self.bot_user_id)

    async def _name(self, user: str) -> str:
        """The user's display name (users.info, cached); the id when Slack will not say."""
        if user in self._names:
            return self._names[user]
        info = await self._user_info(user)
        if info is None:
            return user
        profile = info.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or info.get("name") or user
        self._names[user] = name
        return name

    async def _user_info(self, user: str) -> dict | None:
        try:
            return (await self.client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning("users.info %s failed: %s", user, exc.response.get("error"))
            return None

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
        if name != commands.FORGET_ME and not self._allowed(channel, user, is_dm):  # anyone may have their words deleted
            text = NOT_HERE
        elif name == commands.RESET and not is_dm:
            text = CHANNEL_RESET
        elif name == commands.PERSONA and argument.strip() and not await self._may_switch_persona(user, is_dm):
            text = self._switch.refusal()
        else:
            text = await self.service.command(
                ConversationKey("slack", channel, server=self.team_id), name, argument,
                help_text=help_text(self.config.slash_command), author_id=user,
                admin=name == commands.SERVER and await self._is_admin(user),
            )
        await respond(text=to_mrkdwn(text), response_type="ephemeral")

    async def _may_switch_persona(self, user: str, is_dm: bool) -> bool:
        """Workspace admins and owners may always switch; others as `persona_switch` says. DMs: anyone."""
        return self._switch.allows(admin=False, holds={user}, private=is_dm) or await self._is_admin(user)

    async def _is_admin(self, user: str) -> bool:
        """A workspace admin or owner (users.info)."""
        info = await self._user_info(user) or {}
        return any(info.get(flag) for flag in ("is_admin", "is_owner", "is_primary_owner"))


async def _accepted(call, secret: str):
    """The answer to a call that shows whether Slack takes `secret`; a refusal as one clear line."""
    try:
        return await call
    except SlackApiError as exc:
        raise RuntimeError(f"Slack rejected {secret} ({exc.response.get('error')})") from None


def _from_bot(event: dict) -> bool:
    # bolt already drops this bot's own events; other bots are ignored too (no bot-to-bot loops).
    return bool(event.get("bot_id") or event.get("subtype") == "bot_message")


def _api_url(configured: str | None) -> str:
    # slack_sdk joins method names onto the base URL, which must end with "/".
    return (configured or DEFAULT_API_URL).rstrip("/") + "/"
