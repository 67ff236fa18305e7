"""A local fake Discord for end-to-end tests.

Speaks the real wire protocol on 127.0.0.1 (ephemeral port), so an unmodified discord.py 2.7
client works against it once ``discord.http.Route.BASE = fake.api_url`` and (for a plain
``Client``) ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)``;
``fake.patch_discord_py()`` does both and restores them. ``AutoShardedClient`` finds the gateway
itself via ``GET /gateway/bot``.

* REST API v10 under ``fake.api_url``: every call is recorded in ``fake.requests``
  (``RestCall``); unknown routes answer 404 ``{"message": "Unknown", "code": 0}`` and land in
  ``fake.unknown_requests`` too. Bot token checked (401) except on interaction webhooks.
  Responses carry ``Content-Type: application/json`` exactly (discord.py parses nothing else).
* Gateway websocket (``discord_gateway.py``): READY + GUILD_CREATE, heartbeats, RESUME, intents.
* Rate limits per route and channel like Discord's (``fake.rate_limits``; by default message
  edits, 5 per 5 s per channel): ``X-RateLimit-*`` headers on every answer of a limited route
  (discord.py waits by them), and a 429 with ``retry_after`` past the limit (``fake.rate_limited``).
* Voice: the bot's voice state updates (gateway op 4) are answered with VOICE_STATE_UPDATE and,
  when it joins, VOICE_SERVER_UPDATE pointing at ``fake.voice_server`` (a FakeVoiceServer from
  discord_voice_server.py); ``user_joins_voice``/``user_leaves_voice`` move people around.
* Messages the bot creates are stored per channel (``fake.messages``, each with ``at``: when it was
  created, by ``time.monotonic()``; not on the wire) and echoed back over the gateway as
  MESSAGE_CREATE, as Discord does. Validation like Discord: empty message (50006),
  content over 2000 characters (50035), reply to an unknown message (50035), double interaction
  acknowledgement (40060).

All ``wait_*`` helpers wake up on every recorded change; no bare sleeps needed.

Layout: this module (state helpers, driving the bot, waiting, HTTP plumbing), discord_rest.py
(REST route handlers, messages, commands, interactions), discord_gateway.py (websocket),
discord_models.py (state objects and their JSON payloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import traceback
from collections import defaultdict
from typing import Any, Callable, Optional

from aiohttp import web

from .discord_gateway import Gateway
from .discord_models import (
    BOT_ROLE_PERMISSIONS, DM, EVERYONE_PERMISSIONS, GUILD_TEXT, GUILD_VOICE, PRIVATE_THREAD, PUBLIC_THREAD,
    FakeChannel, FakeGuild, FakeMember, FakeRole, FakeUser, FakeVoiceState, snowflake, snowflake_id,
)
from .discord_rest import DiscordError, FakeInteraction, RestCall, RestHandlers, WaitTimeout

__all__ = ["FakeDiscord", "FakeInteraction", "RestCall", "WaitTimeout", "FakeChannel", "FakeGuild",
           "FakeMember", "FakeRole", "FakeUser"]


def _route(pattern: str) -> re.Pattern:
    return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern))


class FakeDiscord(RestHandlers):
    def __init__(self, *, token: str = "fake-bot-token", bot_name: str = "FakeBot",
                 heartbeat_interval_ms: int = 41250, shard_count: int = 1):
        self.token = token
        self.bot_user = FakeUser(snowflake(), bot_name, bot=True)
        self.application_id = self.bot_user.id
        self.shard_count = shard_count  # what GET /gateway/bot recommends
        self.users: dict[int, FakeUser] = {self.bot_user.id: self.bot_user}
        self.guilds: dict[int, FakeGuild] = {}
        self.channels: dict[int, FakeChannel] = {}  # every channel, threads and DMs included
        self._dms: dict[int, FakeChannel] = {}  # user id -> DM channel
        self._bot_roles: dict[int, FakeRole] = {}  # guild id -> the bot's managed role
        self._message_index: dict[int, dict] = {}  # message id -> stored message
        self._attachments: dict[int, bytes] = {}
        # Recorded for assertions.
        self.requests: list[RestCall] = []
        self.unknown_requests: list[RestCall] = []
        self.server_errors: list[str] = []  # tracebacks of exceptions inside the fake's handlers
        self.messages: dict[int, list] = defaultdict(list)  # channel id -> messages, oldest first
        self.edits: list[dict] = []  # PATCH /channels/..: {"channel_id", "message_id", "body", "at"}
        self.deletions: list[dict] = []  # {"channel_id", "message_id"}
        self.typing: list[int] = []  # channel ids, one per POST /channels/{id}/typing
        self.reactions: list[dict] = []  # {"channel_id", "message_id", "emoji", "added"}
        self.threads_created: list[FakeChannel] = []
        self.dm_channels_created: list[FakeChannel] = []
        self.global_commands: list[dict] = []
        self.guild_commands: dict[int, list] = {}
        self.command_syncs: list[tuple] = []  # (guild id or None, PUT body)
        self.interactions: dict[int, FakeInteraction] = {}
        # "METHOD /route/{param}" -> (requests, per seconds), counted per channel (Discord's major parameter).
        self.rate_limits: dict[str, tuple[int, float]] = {
            "PATCH /channels/{channel_id}/messages/{message_id}": (5, 5.0)}
        self.rate_limited: list[RestCall] = []  # requests answered 429
        self._windows: dict[tuple, list] = {}  # (route, channel) -> [window start, requests in it]
        self.voice_server = None  # a FakeVoiceServer, for VOICE_SERVER_UPDATE
        self.gateway = Gateway(self, heartbeat_interval_ms)
        self._change = asyncio.Event()
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None
        self._routes = [(m, p, _route(p), h, p.startswith(("/interactions", "/webhooks"))) for m, p, h in [
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway_bot),
            ("GET", "/users/@me", lambda c: self._bot_user_payload()),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/applications/@me", self._get_application),
            ("POST", "/users/@me/channels", self._create_dm),
            ("GET", "/users/{user_id}", lambda c, user_id: self._user(user_id).payload()),
            ("GET", "/guilds/{guild_id}", lambda c, guild_id: self._guild(guild_id).payload()),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/roles", lambda c, guild_id: [
                r.payload() for r in self._guild(guild_id).roles.values()]),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/channels/{channel_id}", lambda c, channel_id: self._channel(channel_id).payload()),
            ("GET", "/channels/{channel_id}/messages", self._list_messages),
            ("POST", "/channels/{channel_id}/messages", self._create_message),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message),
            ("POST", "/channels/{channel_id}/typing", self._typing),
            ("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._react),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._react),
            ("POST", "/channels/{channel_id}/messages/{message_id}/threads", self._thread_from_message),
            ("POST", "/channels/{channel_id}/threads", self._thread_without_message),
            ("GET", "/applications/{app_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/commands", self._put_commands),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback),
            ("POST", "/webhooks/{app_id}/{token}", self._followup),
            ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._get_webhook_message),
            ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._edit_webhook_message),
            ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._delete_webhook_message),
        ]]

    # ==== lifecycle ===========================================================================

    async def start(self) -> "FakeDiscord":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._handle_rest)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/gateway/resume", self.gateway.handle)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._get_attachment)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self.gateway.close_all()
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "FakeDiscord":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """What ``discord.http.Route.BASE`` must be set to."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """Gateway URL (``DiscordWebSocket.DEFAULT_GATEWAY``); READY's resume URL is ``+ "/resume"``."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    @contextlib.contextmanager
    def patch_discord_py(self):
        """Points discord.py's ``Route.BASE`` and ``DEFAULT_GATEWAY`` at the fake; restores on exit."""
        import discord
        import yarl

        saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_url
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield self
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved

    # ==== state helpers =======================================================================

    def add_user(self, name: str, *, bot: bool = False, global_name: Optional[str] = None) -> FakeUser:
        user = FakeUser(snowflake(), name, bot=bot, global_name=global_name)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str, *, owner: Optional[FakeUser] = None, shard: Optional[tuple] = None) -> FakeGuild:
        """A guild with @everyone, the bot as a member holding its managed role (see
        ``bot_role``) and ``owner`` (a new user by default) as a member. ``shard``: (shard id,
        shard count) the guild's id must fall on."""
        owner = owner or self.add_user(f"{name}-owner")
        guild_id = snowflake()
        if shard is not None:  # Discord's rule: shard = (guild_id >> 22) % shard_count
            shard_id, count = shard
            guild_id += (((shard_id - (guild_id >> 22)) % count) << 22)
        guild = FakeGuild(guild_id, name, owner_id=owner.id)
        guild.roles[guild.id] = FakeRole(guild.id, guild.id, "@everyone", EVERYONE_PERMISSIONS)
        self.guilds[guild.id] = guild
        bot_role = self._new_role(guild, self.bot_user.name, BOT_ROLE_PERMISSIONS, managed_for_bot=True)
        self._bot_roles[guild.id] = bot_role
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, [bot_role.id])
        guild.members[owner.id] = FakeMember(owner, [])
        self.gateway.dispatch("GUILD_CREATE", guild.payload(), guild_id=guild.id)
        self._changed()
        return guild

    def bot_role(self, guild: FakeGuild) -> FakeRole:
        return self._bot_roles[guild.id]

    def add_role(self, guild: FakeGuild, name: str, *, permissions: int = 0,
                 managed_for_bot: bool = False, mentionable: bool = True) -> FakeRole:
        role = self._new_role(guild, name, permissions, managed_for_bot, mentionable)
        self.gateway.dispatch("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()},
                              guild_id=guild.id)
        self._changed()
        return role

    def _new_role(self, guild, name, permissions, managed_for_bot=False, mentionable=True) -> FakeRole:
        role = FakeRole(snowflake(), guild.id, name, permissions, position=len(guild.roles),
                        managed=managed_for_bot, bot_id=self.bot_user.id if managed_for_bot else None,
                        mentionable=mentionable)
        guild.roles[role.id] = role
        return role

    def add_member(self, guild: FakeGuild, user: FakeUser, *, roles=(), nick: Optional[str] = None) -> FakeMember:
        member = FakeMember(user, [snowflake_id(r) for r in roles], nick=nick)
        guild.members[user.id] = member
        self.gateway.dispatch("GUILD_MEMBER_ADD", dict(member.payload(), guild_id=str(guild.id)), guild_id=guild.id)
        self._changed()
        return member

    def add_text_channel(self, guild: FakeGuild, name: str, *, overwrites=(), topic=None) -> FakeChannel:
        return self._add_channel(FakeChannel(snowflake(), GUILD_TEXT, name, guild_id=guild.id, topic=topic,
                                             position=len(guild.channels), overwrites=list(overwrites)))

    def add_voice_channel(self, guild: FakeGuild, name: str, *, overwrites=()) -> FakeChannel:
        return self._add_channel(FakeChannel(snowflake(), GUILD_VOICE, name, guild_id=guild.id,
                                             position=len(guild.channels), overwrites=list(overwrites)))

    def add_thread(self, parent: FakeChannel, name: str, *, owner: Optional[FakeUser] = None,
                   private: bool = False) -> FakeChannel:
        """An existing (user-created) thread of a text channel."""
        thread = FakeChannel(snowflake(), PRIVATE_THREAD if private else PUBLIC_THREAD, name,
                             guild_id=parent.guild_id, parent_id=parent.id, owner_id=(owner or self.bot_user).id)
        return self._add_channel(thread)

    def _add_channel(self, channel: FakeChannel, *, newly_created: bool = False) -> FakeChannel:
        self.guilds[channel.guild_id].channels[channel.id] = channel
        self.channels[channel.id] = channel
        if channel.is_thread:
            self.gateway.dispatch("THREAD_CREATE", dict(channel.payload(), newly_created=newly_created),
                                  guild_id=channel.guild_id)
        else:
            self.gateway.dispatch("CHANNEL_CREATE", channel.payload(), guild_id=channel.guild_id)
        self._changed()
        return channel

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The DM channel between the bot and ``user`` (created on first use)."""
        if user.id not in self._dms:
            channel = FakeChannel(snowflake(), DM, None, recipient=user)
            self._dms[user.id] = self.channels[channel.id] = channel
        return self._dms[user.id]

    def guild_of(self, channel) -> Optional[FakeGuild]:
        return self.guilds.get(self._channel(channel).guild_id)

    def bot_messages(self, channel) -> list:
        """Messages the bot created in ``channel`` (interaction responses included), oldest first."""
        return [m for m in self.messages[snowflake_id(channel)] if int(m["author"]["id"]) == self.bot_user.id]

    def find_requests(self, method: Optional[str] = None, path: str = ".*") -> list:
        """Recorded REST calls whose method matches and whose path matches the regex ``path``."""
        return [c for c in self.requests
                if (method is None or c.method == method) and re.fullmatch(path, c.path)]

    # ==== voice ===============================================================================

    def user_joins_voice(self, channel, user: FakeUser) -> None:
        """``user`` joins (or moves to) the voice channel ``channel``: VOICE_STATE_UPDATE."""
        channel = self._channel(channel)
        guild = self.guilds[channel.guild_id]
        if user.id not in guild.members:
            self.add_member(guild, user)
        self._set_voice_state(guild, FakeVoiceState(guild.id, user.id, channel.id, secrets.token_hex(16)))

    def user_leaves_voice(self, guild: FakeGuild, user: FakeUser) -> None:
        """``user`` leaves voice; for the bot, a moderator disconnecting it (its voice websocket is closed
        with 4014, as Discord does)."""
        state = guild.voice_states.get(user.id)
        if state is not None:
            self._set_voice_state(guild, FakeVoiceState(guild.id, user.id, None, state.session_id))
        if user.id == self.bot_user.id and self.voice_server is not None:
            asyncio.ensure_future(self.voice_server.disconnect(guild.id))

    def voice_channel_of(self, guild: FakeGuild, user) -> Optional[int]:
        state = guild.voice_states.get(snowflake_id(user))
        return state.channel_id if state else None

    def move_voice_server(self, guild: FakeGuild, server) -> None:
        """Discord moves the guild's voice to another server: VOICE_SERVER_UPDATE with its endpoint."""
        self.voice_server = server
        state = guild.voice_states[self.bot_user.id]
        self._voice_server_update(guild, state.session_id)

    def _bot_voice_state(self, session, d: dict) -> None:
        """The bot asked (gateway op 4) to join, move within or leave a guild's voice."""
        guild = self.guilds.get(int(d["guild_id"]))
        if guild is None:
            return
        channel_id = int(d["channel_id"]) if d.get("channel_id") else None
        self._set_voice_state(guild, FakeVoiceState(guild.id, self.bot_user.id, channel_id, session.id,
                                                    bool(d.get("self_mute")), bool(d.get("self_deaf"))))
        if channel_id is not None and self.voice_server is not None:
            self._voice_server_update(guild, session.id)

    def _voice_server_update(self, guild: FakeGuild, session_id: str) -> None:
        token = self.voice_server.expect(guild.id, self.bot_user.id, session_id)
        self.gateway.dispatch("VOICE_SERVER_UPDATE", {"token": token, "guild_id": str(guild.id),
                                                      "endpoint": self.voice_server.endpoint}, guild_id=guild.id)

    def _set_voice_state(self, guild: FakeGuild, state: FakeVoiceState) -> None:
        if state.channel_id is None:
            guild.voice_states.pop(state.user_id, None)
        else:
            guild.voice_states[state.user_id] = state
        self.gateway.dispatch("VOICE_STATE_UPDATE", state.payload(guild.members.get(state.user_id)),
                              guild_id=guild.id)
        self._changed()

    # ==== driving the bot =====================================================================

    async def user_says(self, channel, user: FakeUser, content: str = "", *, mentions=(), mention_roles=(),
                        reference=None, attachments=(), mention_everyone: bool = False) -> dict:
        """Dispatches MESSAGE_CREATE as if ``user`` wrote ``content`` in ``channel`` and returns
        the message. ``<@id>``/``<@&id>`` in ``content`` count as mentions too. ``reference`` is a
        message (dict) or message id being replied to. ``attachments``: dicts with ``filename``
        and ``data`` (bytes, served by the fake at the attachment's ``url``), optional
        ``content_type``."""
        channel = self._channel(channel)
        guild = self.guilds.get(channel.guild_id)
        if guild is not None and user.id not in guild.members:
            self.add_member(guild, user)
        body = {"content": content, "mention_everyone": mention_everyone, "attachments": list(attachments)}
        if reference is not None:
            body["message_reference"] = {"message_id": str(snowflake_id(reference))}
        msg = self._new_message(channel, user, body, extra_mentions=mentions, extra_role_mentions=mention_roles)
        self._store_and_dispatch(msg)
        return msg

    def delete_message(self, message) -> None:
        """Deletes a message as a moderator would (MESSAGE_DELETE is dispatched; later edits get 404)."""
        msg = self._message(snowflake_id(message))
        self._delete_message(RestCall("DELETE", "(moderator)", None, {}, []), msg["channel_id"], msg["id"])
        self._changed()

    async def invoke_command(self, channel, user: FakeUser, name: str, options: Optional[dict] = None, *,
                             subcommand=None, focused: Optional[str] = None, locale: str = "en-US") -> FakeInteraction:
        """Dispatches INTERACTION_CREATE for the slash command ``name`` the bot registered (guild
        commands of the channel's guild first, then global ones). ``options`` maps option names to
        values (users/roles/channels as fake objects or ids; types come from the registered
        schema). ``subcommand``: "sub" or "group sub". With ``focused`` (an option name) it is an
        autocomplete interaction (type 4) instead."""
        channel = self._channel(channel)
        guild = self.guilds.get(channel.guild_id)
        command = self._registered_command(guild, name)
        path = subcommand.split() if isinstance(subcommand, str) else list(subcommand or [])
        schema, types = command.get("options", []), []
        for part in path:  # walk down "group sub" in the registered schema
            node = next((o for o in schema if o["name"] == part), None)
            if node is None:
                raise LookupError(f"/{name} has no subcommand {part!r}")
            types.append(node["type"])
            schema = node.get("options", [])
        resolved: dict = {}
        opts = [self._option(guild, schema, key, value, resolved, focused == key)
                for key, value in (options or {}).items()]
        for part, opt_type in reversed(list(zip(path, types))):
            opts = [{"type": opt_type, "name": part, "options": opts}]
        data = {"id": str(command["id"]), "name": name, "type": command.get("type", 1), "options": opts}
        if resolved:
            data["resolved"] = resolved
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return self._dispatch_interaction(channel, user, 4 if focused else 2, data, locale)

    async def autocomplete(self, channel, user: FakeUser, name: str, options: dict, focused: str, *,
                           subcommand=None) -> FakeInteraction:
        return await self.invoke_command(channel, user, name, options, subcommand=subcommand, focused=focused)

    async def drop_gateway(self, code: Optional[int] = 4000) -> int:
        """Closes the bot's gateway connection(s) with close code ``code`` (``None``: cut the TCP
        connection, the client sees 1006). Sessions stay resumable; events dispatched meanwhile
        are replayed on RESUME. Returns how many connections were dropped."""
        return await self.gateway.drop(code)

    def send_reconnect(self) -> None:
        self.gateway.send_reconnect()

    def invalidate_sessions(self) -> None:
        self.gateway.invalidate_sessions()

    # ==== waiting =============================================================================

    def _changed(self) -> None:
        event, self._change = self._change, asyncio.Event()
        event.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        """Waits until ``predicate()`` is truthy (re-checked on every recorded change), returns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = [(c.method, c.path, c.status) for c in self.requests[-8:]]
                raise WaitTimeout(f"timed out after {timeout}s waiting for {what or predicate}; "
                                  f"last REST calls: {recent}; unknown routes: "
                                  f"{[(c.method, c.path) for c in self.unknown_requests]}; "
                                  f"fake errors: {self.server_errors[-1:]}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._change.wait(), remaining)

    async def wait_for_message(self, channel, predicate: Optional[Callable[[dict], bool]] = None, *,
                               timeout: float = 10.0, after=None, from_bot: bool = True) -> dict:
        """The first message in ``channel`` (by the bot unless ``from_bot=False``) newer than
        ``after`` (a message or id) that satisfies ``predicate``; waits for it if needed."""
        cid, after_id = snowflake_id(channel), snowflake_id(after) if after is not None else 0

        def find():
            for m in self.messages[cid]:
                if int(m["id"]) > after_id and (not from_bot or int(m["author"]["id"]) == self.bot_user.id) \
                        and (predicate is None or predicate(m)):
                    return m
        return await self.wait_for(find, timeout, f"a message in channel {cid}")

    async def wait_for_connections(self, n: int, timeout: float = 10.0) -> int:
        """Waits until the gateway accepted ``n`` websocket connections in total."""
        return await self.wait_for(lambda: self.gateway.connection_count >= n and self.gateway.connection_count,
                                   timeout, f"{n} gateway connections")

    async def wait_for_ready(self, timeout: float = 10.0) -> None:
        """Waits until a session got READY and its GUILD_CREATEs (discord.py fires on_ready
        ``guild_ready_timeout`` = 2 s after the last GUILD_CREATE)."""
        await self.wait_for(lambda: any(s.ready for s in self.gateway.sessions.values()), timeout, "READY")

    async def wait_for_response(self, interaction: FakeInteraction, timeout: float = 10.0) -> dict:
        return await self.wait_for(lambda: interaction.response, timeout, f"a response to {interaction.id}")

    async def wait_for_followup(self, interaction: FakeInteraction, count: int = 1, timeout: float = 10.0) -> dict:
        await self.wait_for(lambda: len(interaction.followups) >= count, timeout, f"followup #{count}")
        return interaction.followups[count - 1]

    async def wait_for_request(self, method: str, path: str, timeout: float = 10.0) -> RestCall:
        return (await self.wait_for(lambda: self.find_requests(method, path), timeout, f"{method} {path}"))[0]

    async def expect_no_message(self, channel, *, within: float = 0.5, after=None) -> None:
        """Asserts the bot does not post in ``channel`` during ``within`` seconds."""
        with contextlib.suppress(WaitTimeout):
            msg = await self.wait_for_message(channel, timeout=within, after=after)
            raise AssertionError(f"unexpected bot message: {msg['content']!r}")

    # ==== REST plumbing =======================================================================

    async def _handle_rest(self, request: web.Request) -> web.StreamResponse:
        body, files = await self._read_body(request)
        call = RestCall(request.method, "/" + request.match_info["tail"], body, dict(request.query), files)
        self.requests.append(call)
        headers = {"Content-Type": "application/json"}
        try:
            for method, route, pattern, handler, tokenless in self._routes:
                match = pattern.fullmatch(call.path)
                if match and method == request.method:
                    if not tokenless and request.headers.get("Authorization") != f"Bot {self.token}":
                        raise DiscordError(401, 0, "401: Unauthorized")
                    limited = self._count(f"{method} {route}", match.groupdict().get("channel_id"), headers)
                    if limited is not None:
                        self.rate_limited.append(call)
                        status, payload = 429, limited
                        break
                    result = handler(call, **match.groupdict())
                    status, payload = result if isinstance(result, tuple) else (200, result)
                    break
            else:
                call.unknown = True
                self.unknown_requests.append(call)
                raise DiscordError(404, 0, "Unknown")
        except DiscordError as e:
            status, payload = e.status, {"message": e.message, "code": e.code}
            if e.errors:
                payload["errors"] = e.errors
        except Exception as e:  # a bug of the fake: 400 (not 5xx, which discord.py retries slowly)
            self.server_errors.append(traceback.format_exc())
            status, payload = 400, {"message": f"FakeDiscord internal error: {e!r}", "code": -1}
        call.status = status
        self._changed()
        if status == 204:
            return web.Response(status=204, headers={k: v for k, v in headers.items() if k != "Content-Type"})
        return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)

    def _count(self, route: str, channel_id: Optional[str], headers: dict) -> Optional[dict]:
        """Counts a request against its route's limit (fixed windows, as Discord's reset works) and
        adds the X-RateLimit headers; returns the 429 body when over the limit."""
        if route not in self.rate_limits:
            return None
        limit, per = self.rate_limits[route]
        now = time.monotonic()
        window = self._windows.setdefault((route, channel_id), [now, 0])
        if now >= window[0] + per:
            window[:] = [now, 0]
        reset_after = window[0] + per - now
        over = window[1] >= limit
        if not over:
            window[1] += 1
        headers.update({
            "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(limit - window[1]),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}", "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": f"fake-{abs(hash(route)) % 10**8:08d}"})
        if not over:
            return None
        headers.update({"Retry-After": str(max(1, round(reset_after))), "X-RateLimit-Scope": "user",
                        "Via": "1.1 google"})  # discord.py takes a 429 without Via for Cloudflare's
        return {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}

    @staticmethod
    async def _read_body(request: web.Request):
        files: list = []
        if request.content_type.startswith("multipart/"):
            body = None
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                else:
                    files.append({"field": part.name, "filename": part.filename,
                                  "content_type": part.headers.get("Content-Type"), "data": bytes(await part.read())})
            return body, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), files

    async def _get_attachment(self, request: web.Request) -> web.Response:
        data = self._attachments.get(int(request.match_info["attachment_id"]))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")
