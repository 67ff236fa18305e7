"""Discord adapter: mentions, DMs and replies to the bot in; streamed, split, ping-free replies out.

The life of a message reads top to bottom in `DiscordAdapter`: `on_message` decides at once
whether the bot is addressed and may answer, and takes the message's place in its conversation;
`_answer` turns it into words (with the text files attached), checks them and the sender's rate
limit and token budget, and streams the reply into message edits (bots/chat/view.py). A
conversation's server is its guild; a DM is in none. Slash commands are in commands.py, Discord's text rules in
format.py, how reply messages are posted in reply.py, the access lists in access.py.

Voice (voice/, when `voice.enabled`) is a sibling of the text path on the same client and service:
it adds /join /leave /skip to `tree`, the voice_states intent, Connect and Speak to the invite,
and a hook to `reply_hooks` that speaks replies as they grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Awaitable, Callable

import aiohttp
import discord
import yarl
from discord import app_commands

from bots.discord.access import Access
from bots.discord.commands import add_commands, conversation_key, sync_commands
from bots.discord.format import invite_url, model_text, thread_name
from bots.discord.reply import EDITS_PER_CHANNEL, NO_PINGS, ReplyMessages, render, tell_privately
from bots.chat.files import Download
from bots.chat.edits import EditBudget
from bots.chat.ordering import ReplyTasks, finish_within_s
from bots.chat.view import ReplyView, stream_reply, take_message
from core.config.loading import Settings
from core.config.schema import DiscordSection
from core.conversation import ConversationKey
from core.files import AttachedFile
from core.replies import ReplyUpdate
from core.service import ChatService

log = logging.getLogger(__name__)

ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
TOKEN_REJECTED = "Discord rejected DISCORD_TOKEN (reset it on the Bot page of the developer portal)"
SLOW_DOWN = "\N{HOURGLASS WITH FLOWING SAND}"  # the reaction that tells a person they are over the limit

ReplyHook = Callable[[discord.Message, ReplyUpdate], Awaitable[None]]  # (message answered, update)


def create_adapter(service: ChatService, settings: Settings) -> "DiscordAdapter":
    return DiscordAdapter(service, settings)


def intents(voice: bool = False) -> discord.Intents:
    """Guilds (channels, roles, threads), messages in guilds and DMs, and their text
    (Message Content is a privileged intent: switch it on in the developer portal)."""
    wanted = discord.Intents.none()
    wanted.guilds = wanted.guild_messages = wanted.dm_messages = wanted.message_content = True
    wanted.voice_states = voice  # the bot speaks in voice channels
    return wanted


class DiscordAdapter:
    name = "discord"

    def __init__(self, service: ChatService, settings: Settings, *, guild_ready_timeout: float = 2.0):
        self.service = service
        self.config: DiscordSection = settings.config.discord
        self.token = settings.secrets.get("DISCORD_TOKEN")
        self.access = Access(self.config)
        # AutoShardedClient also for one shard: it asks Discord how many shards to run
        # (shard_count None) or runs the configured number (all, or this process's shard_ids).
        self.client = discord.AutoShardedClient(
            intents=intents(settings.config.voice.enabled), shard_count=self.config.shard_count,
            shard_ids=self.config.shard_ids,
            allowed_mentions=NO_PINGS, guild_ready_timeout=guild_ready_timeout,
        )
        self.tree = app_commands.CommandTree(self.client)
        add_commands(self.tree, service, self.config, self.command_refusal)
        # Called with the message being answered and every update of its reply (voice speaks them).
        self.reply_hooks: list[ReplyHook] = []
        self.voice = None
        if settings.config.voice.enabled:  # imported only then: it needs the voice extra
            from bots.discord.voice.commands import add_voice_commands
            from bots.discord.voice.speaking import DiscordSpeaking

            self.voice = DiscordSpeaking(self.client, service, settings)
            add_voice_commands(self.tree, self.voice, self.command_refusal)
            self.reply_hooks.append(self.voice.on_reply)
        self._accepting = False
        self._replies = ReplyTasks("discord")
        self._edits = EditBudget(*EDITS_PER_CHANNEL)
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
            raise RuntimeError(TOKEN_REJECTED) from None
        except discord.PrivilegedIntentsRequired:
            await self._close_client()
            raise RuntimeError(
                "Discord refused the Message Content intent: switch it on under Bot > Privileged Gateway Intents"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            api = discord.http.Route.BASE
            await self._close_client()
            raise RuntimeError(f"cannot reach the Discord API at {api}: {exc}") from None
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
        await self._replies.stop(finish_within_s(self.service.config))
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
        """Decide at once (in arrival order) whether to answer; the answer runs in its own task,
        after the earlier ones of its conversation."""
        if not self._accepting or not self._addressed(message):
            return
        if not self.access.allows(message.author, message.guild.id if message.guild else None, message.channel):
            return
        guild_id = message.guild.id if message.guild else None
        if self._opens_thread(message):
            # The thread opened on a message has the message's id: its conversation starts here.
            key = ConversationKey("discord", str(message.id), parent=str(message.channel.id), server=str(guild_id))
        else:
            key = conversation_key(message.channel, guild_id)
        self._replies.spawn(self._answer(message, key), conversation=key)

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

    async def _answer(self, message: discord.Message, key: ConversationKey) -> None:
        """Check the words, the sender's rate and budget, read the text files attached, then stream
        the reply with the typing indicator on."""
        me, my_role = self.client.user.id, message.guild.self_role if message.guild else None
        author = str(message.author.id)

        async def slow_down(wait_s: float) -> None:  # a reaction: a flood of mentions must not flood the channel
            await self._react(message, SLOW_DOWN)

        async def tell(text: str) -> None:
            await tell_privately(message.author, text, instead=message.channel, about=message)

        words = model_text(message, me, my_role.id if my_role else None)
        files = [Download(AttachedFile(a.filename, a.size, a.content_type), a.url) for a in message.attachments]
        taken = await take_message(
            self.service, self._view(message.channel, message, key), words,
            key=key, author_id=author, slow_down=slow_down, tell=tell, files=files,
        )
        if taken is None:
            return
        channel, reply_to = message.channel, message
        if self._opens_thread(message):
            channel, reply_to = await self._open_thread(message, words or taken.text)
            if channel is message.channel:
                key = conversation_key(channel, message.guild.id)
        view = self._view(channel, reply_to, key)
        listeners = [functools.partial(hook, message) for hook in self.reply_hooks]
        async with channel.typing():
            updates = self.service.respond(key, message.author.display_name, taken, adapter="discord", author_id=author)
            await stream_reply(view, updates, interval_s=self.config.stream_edit_interval_s, listeners=listeners)

    def _view(
        self, channel: discord.abc.Messageable, reply_to: discord.Message | None, key: ConversationKey
    ) -> ReplyView:
        return ReplyView(ReplyMessages(channel, reply_to), render, self._edits, channel.id, str(key))

    def _opens_thread(self, message: discord.Message) -> bool:
        return self.config.auto_thread and isinstance(message.channel, discord.TextChannel)

    async def _react(self, message: discord.Message, emoji: str) -> None:
        try:
            await message.add_reaction(emoji)
        except discord.HTTPException as exc:
            log.warning("discord: could not react to a message in %s: %s", message.channel.id, exc)

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

    # ---- slash commands --------------------------------------------------------------------

    def command_refusal(self, interaction: discord.Interaction, *, access: bool = True) -> str | None:
        """Why this interaction may not be served, or None (`access`: the access lists apply)."""
        if not self._accepting:
            return "I'm restarting; try again in a moment."
        if access and not self.access.allows(interaction.user, interaction.guild_id, interaction.channel):
            return "Sorry, I'm not available to you here."
        return None
