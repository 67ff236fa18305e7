"""Discord voice: the bot joins a voice channel and speaks its replies there.

`/join` (the caller's voice channel) links the text channel it was run in and the voice channel's
own chat: while joined, every reply the bot writes in a linked channel is also spoken, in the
voice of that conversation's persona, sentence by sentence as it is written. `/skip` stops what
it is saying, `/leave` leaves; it also leaves by itself once nobody has been in the channel for
`voice.idle_leave_s`. Each guild has one playback queue, so replies are spoken in order.

The text path calls `listener(channel)` when a reply starts and feeds the returned SpokenReply
every ReplyUpdate (then `abandon_unfinished()`); nothing here ever raises into the text reply.
Dropped voice connections and voice-server moves are reconnected by discord.py (reconnect=True);
when discord.py gives a connection up, the bot joins again; when Discord removes the bot from the
channel (a moderator, a deleted channel), it leaves that guild's voice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

import discord
from discord import app_commands

from bots.discord_commands import conversation_key
from core.config import Settings
from core.service import ChatService
from voice.pcm import PcmStream
from voice.speaker import Speaker, SpokenReply, VoiceBusy, VoiceUnavailable

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
SILENCE = bytes(3840)  # 20 ms of 48 kHz stereo s16le
CONNECT_TIMEOUT_S = 20.0
LEFT_ECHO_S = 2.0  # how long to wait for Discord to confirm that a dropped connection left
RECONNECT_WAIT_S = 10.0  # how long a reply waits for discord.py to restore a dropped connection
BUSY = "(Not speaking this one: too many replies are waiting to be spoken. It's all here in text.)"


class DiscordVoice:
    """Voice connections, /join /leave /skip and the per-guild playback queues of one Discord client."""

    def __init__(self, client: discord.Client, tree: app_commands.CommandTree, service: ChatService,
                 settings: Settings, refusal: Callable[[discord.Interaction], str | None]):
        self.client = client
        self.service = service
        self.config = settings.config.voice
        self.metrics = service.metrics
        self.speaker = Speaker(self.config, service.metrics)
        self.guilds: dict[int, GuildVoice] = {}
        self._loading: asyncio.Task | None = None
        add_voice_commands(tree, self, refusal)
        client.event(self.on_voice_state_update)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the speech engine in the background, so that the first /join need not wait."""
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            await self.speaker.start()
        except VoiceUnavailable as exc:
            log.error("voice: the speech engine is unavailable: %s", exc)

    async def stop(self) -> None:
        for guild_voice in list(self.guilds.values()):
            await guild_voice.leave("shutting down")
        if self._loading is not None:
            self._loading.cancel()
        await self.speaker.close()

    # ---- the text path's hook --------------------------------------------------------------------

    async def listener(self, channel: discord.abc.Messageable) -> SpokenReply | None:
        """A SpokenReply for a reply about to be written in `channel` when that channel is linked to a
        voice channel the bot is in (queued in its guild); else None. Never raises."""
        guild = getattr(channel, "guild", None)
        guild_voice = self.guilds.get(guild.id) if guild is not None else None
        if guild_voice is None or channel.id not in guild_voice.linked:
            return None
        try:
            persona = await self.service.persona_for(conversation_key(channel.id))
            reply = self.speaker.reply(persona.config.voice, adapter="discord",
                                       label=f"guild={guild.id} channel={channel.id} persona={persona.name}")
        except VoiceBusy as exc:
            log.warning("voice: not speaking a reply in channel %s: %s", channel.id, exc)
            self.metrics.voice_replies.labels("discord", "busy").inc()
            with contextlib.suppress(discord.HTTPException):
                await channel.send(BUSY, allowed_mentions=NO_PINGS)
            return None
        except VoiceUnavailable as exc:
            log.info("voice: not speaking a reply in channel %s: %s", channel.id, exc)
            return None
        except Exception:  # noqa: BLE001 - voice never breaks the text reply
            log.exception("voice: could not prepare a spoken reply in channel %s", channel.id)
            return None
        guild_voice.enqueue(reply)
        return reply

    # ---- commands ----------------------------------------------------------------------------------

    async def join(self, interaction: discord.Interaction) -> None:
        guild = interaction.guild
        if guild is None:
            await interaction.response.send_message("Voice works in servers, not in direct messages.", ephemeral=True)
            return
        roles = {role.id for role in getattr(interaction.user, "roles", ())}
        if self.config.allowed_roles and not roles & set(self.config.allowed_roles):
            await interaction.response.send_message("Sorry, /join is only for members with a voice role here.",
                                                    ephemeral=True)
            return
        state = getattr(interaction.user, "voice", None)
        if state is None or state.channel is None:
            await interaction.response.send_message("Join a voice channel first, then use /join.", ephemeral=True)
            return
        channel = state.channel
        permissions = channel.permissions_for(guild.me)
        if not (permissions.connect and permissions.speak):
            await interaction.response.send_message(
                f"I can't speak in **{channel.name}**: I need the Connect and Speak permissions there.", ephemeral=True
            )
            return
        await interaction.response.defer(thinking=True)  # connecting may take longer than Discord's 3 s
        try:
            await self.speaker.start()
        except VoiceUnavailable as exc:
            await interaction.followup.send(f"My voice is unavailable right now: {exc}")
            return
        guild_voice = self.guilds.get(guild.id) or GuildVoice(self, guild.id)
        try:
            await guild_voice.connect(channel)
        except (asyncio.TimeoutError, discord.ClientException, discord.opus.OpusNotLoaded) as exc:
            log.warning("voice: could not connect to %s in guild %s: %r", channel.id, guild.id, exc)
            await interaction.followup.send(f"I couldn't connect to **{channel.name}**; please try again.")
            return
        self.guilds[guild.id] = guild_voice
        self.metrics.voice_connections.set(len(self.guilds))
        guild_voice.linked.add(interaction.channel_id)
        here = "here" if interaction.channel_id == channel.id else f"here and in {channel.mention}'s chat"
        await interaction.followup.send(f"Joined **{channel.name}**: I'll speak my replies {here}.")

    async def leave(self, interaction: discord.Interaction) -> None:
        guild_voice = self.guilds.get(interaction.guild_id or 0)
        if guild_voice is None:
            await interaction.response.send_message("I'm not in a voice channel here.", ephemeral=True)
            return
        name = guild_voice.channel_name
        await interaction.response.defer()
        await guild_voice.leave("/leave")
        await interaction.followup.send(f"Left **{name}**.")

    async def skip(self, interaction: discord.Interaction) -> None:
        guild_voice = self.guilds.get(interaction.guild_id or 0)
        if guild_voice is None or not guild_voice.skip():
            await interaction.response.send_message("I'm not saying anything right now.", ephemeral=True)
            return
        await interaction.response.send_message("Skipped.", ephemeral=True)

    # ---- voice states --------------------------------------------------------------------------------

    async def on_voice_state_update(self, member: discord.Member, before: discord.VoiceState,
                                    after: discord.VoiceState) -> None:
        guild_voice = self.guilds.get(member.guild.id)
        if guild_voice is None:
            return
        if member.id == self.client.user.id:
            if after.channel is None:
                guild_voice.saw_left()
            else:
                guild_voice.moved_to(after.channel)
        guild_voice.check_company()

    def forget(self, guild_voice: "GuildVoice") -> None:
        if self.guilds.get(guild_voice.guild_id) is guild_voice:
            del self.guilds[guild_voice.guild_id]
        self.metrics.voice_connections.set(len(self.guilds))


class GuildVoice:
    """The bot's voice in one guild: its connection, linked text channels and playback queue."""

    def __init__(self, owner: DiscordVoice, guild_id: int):
        self.owner = owner
        self.guild_id = guild_id
        self.voice_client: SpeakingVoiceClient | None = None
        self.linked: set[int] = set()  # text channels (and the voice channel's chat) whose replies are spoken
        self.current: SpokenReply | None = None
        self._skipped = False  # the current reply was skipped
        self._queue: asyncio.Queue[SpokenReply] = asyncio.Queue()
        self._player: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._leaving = False
        self._rejoining = asyncio.Lock()
        self._lefts = 0  # times Discord said the bot is in no voice channel of this guild
        self._left = asyncio.Event()  # set (and replaced) at each of them

    @property
    def channel_name(self) -> str:
        channel = self.voice_client.channel if self.voice_client else None
        return channel.name if channel else "the voice channel"

    async def connect(self, channel: discord.VoiceChannel) -> None:
        vc = self.voice_client
        if vc is not None and not vc.is_connected():
            vc = await self._rejoin("/join while the connection was down", channel)
        if vc is not None and vc.channel is not None and vc.channel.id != channel.id:
            await vc.move_to(channel, timeout=CONNECT_TIMEOUT_S)
            self.moved_to(channel)
        elif vc is None:
            # The bot does not listen: it shows as deafened.
            self.voice_client = await channel.connect(
                timeout=CONNECT_TIMEOUT_S, reconnect=True, self_deaf=True, cls=SpeakingVoiceClient
            )
            self.voice_client.guild_voice = self
            self.linked.add(channel.id)
            self._player = asyncio.create_task(self._play_queue(), name=f"voice-playback-{self.guild_id}")
            log.info("voice: joined channel %s in guild %s", channel.id, self.guild_id)
        self.check_company()

    def moved_to(self, channel: discord.abc.Connectable) -> None:
        """Moved to another voice channel (by /join or a moderator): speak in that one's chat instead."""
        old = self.voice_client.channel if self.voice_client else None
        if old is not None and old.id != channel.id:
            self.linked.discard(old.id)
        self.linked.add(channel.id)

    def enqueue(self, reply: SpokenReply) -> None:
        self._queue.put_nowait(reply)

    def skip(self) -> bool:
        """Stop the reply being spoken now; the next one in the queue follows. False: nothing to skip."""
        reply = self.current
        if reply is None:
            return False
        self._skipped = True
        reply.cancel()
        if self.voice_client is not None:
            self.voice_client.stop()
        return True

    async def _play_queue(self) -> None:
        while True:
            reply = await self._queue.get()
            self.current, self._skipped, outcome = reply, False, "failed"
            try:
                outcome = await self._play(reply)
            except asyncio.CancelledError:
                reply.finish("dropped")
                raise
            except Exception:  # noqa: BLE001 - one reply's failure must not end the queue
                log.exception("voice: playing a reply in guild %s failed", self.guild_id)
            finally:
                self.current = None
            reply.finish(outcome)

    async def _play(self, reply: SpokenReply) -> str:
        """Play one reply from its first audio to its end; the outcome for its log line."""
        await reply.ready.wait()
        if reply.synthesized.is_set() and reply.output.bytes_written == 0:
            return "skipped" if self._skipped else "silent" if reply.error is None else "failed"
        vc = await self._connected()
        if vc is None:
            reply.cancel()
            return "failed"
        finished = asyncio.get_running_loop().create_future()

        def after(error: Exception | None) -> None:
            vc.client.loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(error))

        vc.play(ReplyAudio(reply.output), after=after, application="voip", signal_type="voice")
        error = await finished
        if error is not None:
            log.warning("voice: playback in guild %s ended with %r", self.guild_id, error)
            return "failed"
        return "skipped" if self._skipped else "spoken"

    async def _connected(self) -> SpeakingVoiceClient | None:
        """The connection, once discord.py has restored it (it reconnects by itself); None if it is
        still down after RECONNECT_WAIT_S."""
        vc = self.voice_client
        if vc is None:
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wait_connected(vc), RECONNECT_WAIT_S)
        if not vc.is_connected():
            log.warning("voice: not connected in guild %s; this reply stays text only", self.guild_id)
            return None
        return vc

    @staticmethod
    async def _wait_connected(vc: discord.VoiceClient) -> None:
        while not vc.is_connected():
            await asyncio.to_thread(vc.wait_until_connected, 1.0)

    async def _rejoin(self, why: str, channel: discord.abc.Connectable | None = None) -> SpeakingVoiceClient | None:
        """Connect again, to `channel` or the one the bot was in: discord.py gave its connection up."""
        old = self.voice_client
        async with self._rejoining:
            if self.voice_client is not old:  # rejoined meanwhile
                return self.voice_client
            return await self._connect_again(old, channel or (old.channel if old is not None else None), why)

    async def _connect_again(self, old: SpeakingVoiceClient | None, channel: discord.abc.Connectable | None,
                             why: str) -> SpeakingVoiceClient | None:
        if channel is None or self._leaving:
            return None
        log.warning("voice: rejoining channel %s in guild %s: %s", channel.id, self.guild_id, why)
        if old is not None:
            old.guild_voice = None  # its clean-up is ours now
            if old in self.owner.client.voice_clients:
                with contextlib.suppress(Exception):
                    await old.disconnect(force=True)
        try:
            vc = await channel.connect(
                timeout=CONNECT_TIMEOUT_S, reconnect=True, self_deaf=True, cls=SpeakingVoiceClient
            )
        except (asyncio.TimeoutError, discord.ClientException) as exc:
            log.error("voice: could not rejoin channel %s in guild %s: %r", channel.id, self.guild_id, exc)
            await self.leave("could not rejoin")
            return None
        vc.guild_voice, self.voice_client = self, vc
        return vc

    def check_company(self) -> None:
        """Start the idle timer when no person is left in the channel; stop it when someone is back."""
        channel = self.voice_client.channel if self.voice_client else None
        people = [m for m in getattr(channel, "members", ()) if not m.bot]
        if people and self._idle is not None:
            self._idle.cancel()
            self._idle = None
        elif not people and self._idle is None and not self._leaving:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.owner.config.idle_leave_s,
                                         lambda: asyncio.ensure_future(self._leave_if_alone()))

    async def _leave_if_alone(self) -> None:
        self._idle = None
        channel = self.voice_client.channel if self.voice_client else None
        if channel is not None and not [m for m in channel.members if not m.bot]:
            await self.leave(f"nobody was in the channel for {self.owner.config.idle_leave_s:g} s")
        else:
            self.check_company()

    async def leave(self, why: str) -> None:
        """Disconnect, drop what is queued, forget this guild."""
        if self._leaving:
            return
        self._leaving = True
        if self._idle is not None:
            self._idle.cancel()
        self.skip()
        if self._player is not None:
            self._player.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._player
        while not self._queue.empty():
            reply = self._queue.get_nowait()
            reply.cancel()
            reply.finish("dropped")
        vc, self.voice_client = self.voice_client, None
        if vc is not None and vc in self.owner.client.voice_clients:  # not cleaned up by discord.py already
            with contextlib.suppress(Exception):
                await vc.disconnect(force=True)
        self.owner.forget(self)
        log.info("voice: left the voice channel in guild %s (%s)", self.guild_id, why)

    def saw_left(self) -> None:
        self._lefts += 1
        self._left.set()
        self._left = asyncio.Event()

    def connection_ended(self) -> None:
        """discord.py cleaned its connection up (called inside its disconnect, on the event loop).
        Removed from the channel (a moderator, a deleted channel): Discord already says the bot is in
        no channel, so it leaves. Otherwise discord.py gave up reconnecting, and the bot joins again."""
        if self._leaving:
            return
        guild = self.owner.client.get_guild(self.guild_id)
        state = guild.me.voice if guild is not None else None
        removed = state is None or state.channel is None
        asyncio.ensure_future(self._after_connection(self._lefts, removed))

    async def _after_connection(self, lefts: int, removed: bool) -> None:
        # discord.py has just told Discord that it left; a join before Discord confirms it would take
        # that confirmation for a disconnection of the new connection. The confirmation may also have
        # come already, while discord.py was closing its websocket: then this waits LEFT_ECHO_S.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wait_left(lefts), LEFT_ECHO_S)
        if removed:
            await self.leave("disconnected by Discord")
        else:
            await self._rejoin("discord.py gave the connection up")

    async def _wait_left(self, lefts: int) -> None:
        while self._lefts <= lefts:
            await self._left.wait()


class SpeakingVoiceClient(discord.VoiceClient):
    """discord.py's voice client, telling its GuildVoice when discord.py has cleaned the connection up
    (VoiceProtocol.cleanup: called once a connection is over for good)."""

    guild_voice: GuildVoice | None = None

    def cleanup(self) -> None:
        super().cleanup()
        if self.guild_voice is not None:
            self.guild_voice.connection_ended()


class ReplyAudio(discord.AudioSource):
    """A spoken reply as discord.py reads it, 20 ms at a time in its player thread: while later
    sentences are still being written, it plays silence rather than ending."""

    def __init__(self, output: PcmStream):
        self.output = output

    def read(self) -> bytes:
        frame = self.output.read(timeout=0.015)
        return SILENCE if frame is None else frame

    def is_opus(self) -> bool:
        return False


def add_voice_commands(tree: app_commands.CommandTree, voice: DiscordVoice,
                       refusal: Callable[[discord.Interaction], str | None]) -> None:
    """/join, /leave and /skip on `tree`; `refusal` says why an interaction may not be served."""

    async def refused(interaction: discord.Interaction) -> bool:
        reason = refusal(interaction)
        if reason:
            await interaction.response.send_message(reason, ephemeral=True)
        return reason is not None

    @tree.command(name="join", description="Join your voice channel and speak my replies there")
    async def join(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.join(interaction)

    @tree.command(name="leave", description="Leave the voice channel")
    async def leave(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.leave(interaction)

    @tree.command(name="skip", description="Stop what I'm saying right now")
    async def skip(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.skip(interaction)
