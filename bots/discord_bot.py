"""Discord adapter: mentions, DMs and replies to the bot in; streamed, split, ping-free replies out.

The life of a message reads top to bottom in `DiscordAdapter`: `on_message` decides whether the
bot is addressed, checks access and the rate limit and turns the message into words; `_answer`
generates under the conversation's lock and streams the reply into message edits. Slash commands
are in discord_commands.py, Discord's text rules in discord_format.py.

Voice (bots/discord_voice.py, when `voice.enabled`) is a sibling of the text path on the same
client and service: it adds /join /leave /skip to `tree`, the voice_states intent, Connect and
Speak to the invite, and speaks the replies `_answer` writes in channels linked to a voice channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import discord
import yarl
from discord import app_commands

from bots.discord_commands import add_commands, conversation_key, sync_commands
from bots.discord_format import invite_url, model_text, split_message, thread_name
from core.config import DiscordSection, Settings
from core.conversation import KeyedLocks
from core.service import ChatError, ChatService
from core.ratelimit import RateLimiter

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
APOLOGY = "Sorry, something went wrong on my side. Please try again."
ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def create_adapter(service: ChatService, settings: Settings) -> "DiscordAdapter":
    return DiscordAdapter(service, settings)


def intents(voice: bool = False) -> discord.Intents:
    """Guilds (channels, roles, threads), messages in guilds and DMs, and their text
    (Message Content is a privileged intent: switch it on in the developer portal); voice states
    when the bot speaks in voice channels."""
    wanted = discord.Intents.none()
    wanted.guilds = wanted.guild_messages = wanted.dm_messages = wanted.message_content = True
    wanted.voice_states = voice
    return wanted


class DiscordAdapter:
    name = "discord"

    def __init__(self, service: ChatService, settings: Settings, *, guild_ready_timeout: float = 2.0):
        self.service = service
        self.config: DiscordSection = settings.config.discord
        self.token = settings.secrets.get("DISCORD_TOKEN")
        self.access = Access(self.config)
        self.rate_limit = RateLimiter(self.config.rate_limit_per_minute)
        # AutoShardedClient also for one shard: it asks Discord how many shards to run
        # (shard_count None) or runs the configured number, with one code path.
        voice_enabled = settings.config.voice.enabled
        self.client = discord.AutoShardedClient(
            intents=intents(voice_enabled), shard_count=self.config.shard_count, allowed_mentions=NO_PINGS,
            guild_ready_timeout=guild_ready_timeout,
        )
        self.tree = app_commands.CommandTree(self.client)
        add_commands(self.tree, service, self.config, self.command_refusal)
        self.voice = None
        if voice_enabled:  # imported only then: it needs the voice extra
            from bots.discord_voice import DiscordVoice

            self.voice = DiscordVoice(self.client, self.tree, service, settings, self.command_refusal)
        self._accepting = False
        self._tasks: set[asyncio.Task] = set()
        self._locks = KeyedLocks()
        self._gateway_task: asyncio.Task | None = None
        self._replaced_endpoints: tuple[str, yarl.URL] | None = None
        self._listen()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, publish the slash commands, connect; returns once every shard is ready."""
        if not self.token:
            raise RuntimeError("DISCORD_TOKEN is not set")
        try:
            if self.config.api_base_url:
                self._use_api(self.config.api_base_url.rstrip("/"))
            await self.client.login(self.token)
            if self.config.api_base_url:
                # The gateway is wherever that API says: GET {base}/gateway/bot (also used after a
                # session is invalidated, and by a configured shard_count).
                _, gateway, _ = await self.client.http.get_bot_gateway()
                discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
            await sync_commands(self.tree, self.config.command_guilds)
            self._accepting = True
            self._gateway_task = asyncio.create_task(self.client.connect(), name="discord-gateway")
            self._gateway_task.add_done_callback(self._gateway_ended)
            ready = asyncio.create_task(self.client.wait_until_ready())
            await asyncio.wait({self._gateway_task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                self._gateway_task.result()  # raises why the connection ended
                raise RuntimeError("the Discord gateway closed before the bot was ready")
        except discord.LoginFailure:
            await self._close_client()
            raise RuntimeError(
                "Discord rejected DISCORD_TOKEN (reset it on the Bot page of the developer portal)"
            ) from None
        except discord.PrivilegedIntentsRequired:
            await self._close_client()
            raise RuntimeError(
                "Discord refused the Message Content intent: switch it on under Bot > Privileged Gateway Intents"
            ) from None
        except BaseException:
            await self._close_client()
            raise
        log.info(
            "discord: logged in as %s in %d guild(s), %d shard(s); invite: %s",
            self.client.user, len(self.client.guilds), self.client.shard_count or 1,
            invite_url(self.client.application_id, self.config.auto_thread, voice=self.voice is not None),
        )
        if self.voice is not None:
            self.voice.start()

    async def stop(self) -> None:
        """Take no new messages, let replies in flight finish, disconnect."""
        self._accepting = False
        if self._tasks:
            grace_s = self.service.config.generator.request_timeout_s + 10  # a generation ends by then
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.voice is not None:
            await self.voice.stop()
        await self._close_client()

    async def _close_client(self) -> None:
        self._accepting = False
        await self.client.close()
        if self._gateway_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._gateway_task
        self.service.metrics.adapter_up.labels("discord").set(0)
        if self._replaced_endpoints is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._replaced_endpoints
            self._replaced_endpoints = None

    def _gateway_ended(self, task: asyncio.Task) -> None:
        if self._accepting and not task.cancelled() and task.exception() is not None:
            log.error("discord: the gateway connection ended for good", exc_info=task.exception())
            self._accepting = False

    def _use_api(self, base_url: str) -> None:
        # discord.py has no per-client API address: Route.BASE is a class attribute read for every
        # request (interaction callbacks and webhooks included), so this process talks to one API.
        self._replaced_endpoints = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = base_url

    def _listen(self) -> None:
        client, up = self.client, self.service.metrics.adapter_up.labels("discord")

        @client.event
        async def on_message(message: discord.Message) -> None:
            self.on_message(message)

        @client.event
        async def on_ready() -> None:
            up.set(1)

        @client.event
        async def on_resumed() -> None:
            up.set(1)

        @client.event
        async def on_shard_ready(shard_id: int) -> None:
            up.set(1)

        @client.event
        async def on_disconnect() -> None:
            up.set(0)  # discord.py reconnects (and resumes) by itself

    # ---- the life of a message -------------------------------------------------------------

    def on_message(self, message: discord.Message) -> None:
        """Decide at once (in arrival order) whether and how to answer; the answer runs in its own task."""
        if not self._accepting or not self._addressed(message):
            return
        if not self.access.allows(message.author, message.guild.id if message.guild else None, message.channel):
            return
        me = self.client.user.id
        my_role = message.guild.self_role if message.guild else None
        text = model_text(message, me, my_role.id if my_role else None)
        if not text:
            return
        wait = self.rate_limit.check(str(message.author.id))
        if wait:
            notice = (
                f"Easy there! I answer up to {self.rate_limit.per_minute} messages a minute per person; "
                f"try again in {int(wait) + 1} s."
            )
            self._spawn(ReplyMessages(message.channel, message, 0).fail(notice))
            return
        self._spawn(self._answer(message, text))

    def _addressed(self, message: discord.Message) -> bool:
        """Mentioned (the bot or its role), in a DM, a reply to the bot, or in a thread it opened."""
        if message.author.bot or message.webhook_id or message.type not in ANSWERED_TYPES:
            return False  # never bots (itself included), webhooks or system messages
        if message.guild is None:
            return True
        me = self.client.user.id
        if any(user.id == me for user in message.mentions):
            return True
        my_role = message.guild.self_role
        if my_role is not None and any(role.id == my_role.id for role in message.role_mentions):
            return True
        replied_to = message.reference.resolved if message.reference else None
        if isinstance(replied_to, discord.Message) and replied_to.author.id == me:
            return True
        channel = message.channel
        return self.config.auto_thread and isinstance(channel, discord.Thread) and channel.owner_id == me

    async def _answer(self, message: discord.Message, text: str) -> None:
        """Generate under the conversation's lock with the typing indicator on; stream, split, or apologise."""
        channel, reply_to = message.channel, message
        if self.config.auto_thread and isinstance(channel, discord.TextChannel):
            channel, reply_to = await self._open_thread(message, text)
        key = conversation_key(channel.id)
        # The service orders the turns of a conversation; this lock also keeps its replies in order
        # on Discord (a split reply's last piece lands before the next reply starts).
        async with self._locks.hold(key):
            reply = ReplyMessages(channel, reply_to, self.config.stream_edit_interval_s)
            spoken = await self.voice.listener(channel) if self.voice is not None else None  # voice never raises
            try:
                async with channel.typing():
                    updates = self.service.respond(key, message.author.display_name, text, adapter="discord")
                    async for update in updates:
                        if spoken is not None:
                            await spoken.on_update(update)
                        await reply.show(update.text, final=update.final)
            except ChatError as exc:  # the service has logged why (with the traceback of a failure)
                await reply.fail(exc.user_message)
            except Exception:
                log.exception("discord: replying in %s failed", key)
                await reply.fail(APOLOGY)
            finally:
                if spoken is not None:
                    spoken.abandon_unfinished()

    async def _open_thread(
        self, message: discord.Message, text: str
    ) -> tuple[discord.abc.Messageable, discord.Message | None]:
        """A thread on `message` for the conversation it starts; the channel itself if that fails."""
        try:
            thread = await message.create_thread(name=thread_name(text))
        except discord.HTTPException as exc:
            log.warning("discord: could not open a thread in %s: %s", message.channel.id, exc)
            return message.channel, message
        return thread, None  # the thread hangs off the message: no reply reference needed

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("discord: a reply task failed", exc_info=task.exception())

    # ---- slash commands --------------------------------------------------------------------

    def command_refusal(self, interaction: discord.Interaction) -> str | None:
        """Why this interaction may not be served, or None."""
        if not self._accepting:
            return "I'm restarting; try again in a moment."
        if not self.access.allows(interaction.user, interaction.guild_id, interaction.channel):
            return "Sorry, I'm not available to you here."
        return None


class ReplyMessages:
    """The bot's message(s) answering one message, kept in step with the reply as it grows:
    the first piece is a Discord reply, further pieces follow it, at most one update per interval."""

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None, interval_s: float):
        self.channel = channel
        self.reply_to = reply_to
        self.interval_s = interval_s
        self.messages: list[discord.Message] = []
        self._shown_at = float("-inf")

    async def show(self, text: str, final: bool) -> None:
        """Show the reply so far; a partial one only when streaming is on and the interval has passed."""
        if not final and (not self.interval_s or time.monotonic() - self._shown_at < self.interval_s):
            return
        self._shown_at = time.monotonic()
        if final:
            await self._render(split_message(text))
            return
        try:
            await self._render(split_message(text))
        except discord.HTTPException:  # a lost partial edit is not worth losing the reply over
            log.warning("discord: a streamed edit in channel %s failed; carrying on", self.channel.id)

    async def fail(self, notice: str) -> None:
        """Say why there is no reply (replacing whatever was streamed)."""
        try:
            await self._render([notice])
        except discord.HTTPException:
            log.exception("discord: could not tell channel %s that the reply failed", self.channel.id)

    async def _render(self, pieces: list[str]) -> None:
        for i, piece in enumerate(pieces):
            if i == len(self.messages):
                first = not self.messages and self.reply_to is not None
                reference = self.reply_to.to_reference(fail_if_not_exists=False) if first else None
                self.messages.append(await self.channel.send(piece, reference=reference, allowed_mentions=NO_PINGS))
            elif self.messages[i].content != piece:
                self.messages[i] = await self.messages[i].edit(content=piece, allowed_mentions=NO_PINGS)
        for extra in self.messages[len(pieces):]:  # a streamed attempt longer than the final reply
            await extra.delete()
        del self.messages[len(pieces):]


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
