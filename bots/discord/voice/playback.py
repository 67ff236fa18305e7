"""The bot's voice in one Discord guild: its connection, the text channels it speaks for, and the
playback queue that speaks their replies one after the other.

A reply plays from its first audio (sentence n+1 is synthesized while n plays) to its end; while
later sentences are still being written it plays silence rather than ending. Dropped connections and
voice-server moves are reconnected by discord.py (reconnect=True); when discord.py gives a connection
up the bot joins again, and when Discord removes it from the channel (a moderator, a deleted channel)
it leaves. With no person left in the channel it leaves after `voice.idle_leave_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

import discord

from voice.speak.pcm import PcmStream
from voice.speak.speech import SpokenReply

log = logging.getLogger(__name__)

SILENCE = bytes(3840)  # 20 ms of 48 kHz stereo s16le
CONNECT_TIMEOUT_S = 20.0
LEFT_ECHO_S = 2.0  # how long to wait for Discord to confirm that a dropped connection left
RECONNECT_WAIT_S = 10.0  # how long a reply waits for discord.py to restore a dropped connection


class GuildVoice:
    """The bot's voice in one guild: its connection, linked text channels and playback queue.
    `on_left` is called once it has left (by /leave, alone, removed by Discord or shutting down)."""

    def __init__(self, client: discord.Client, guild_id: int, idle_leave_s: float,
                 on_left: Callable[["GuildVoice"], None], *, client_class: type["SpeakingVoiceClient"] | None = None,
                 on_connected: Callable[["GuildVoice"], None] | None = None):
        self.client = client
        self.guild_id = guild_id
        self.idle_leave_s = idle_leave_s
        self.on_left = on_left
        # A listening bot connects with a receiving client, undeafened; `on_connected` follows every new connection.
        self.client_class = client_class or SpeakingVoiceClient
        self.on_connected = on_connected
        self.voice_client: SpeakingVoiceClient | None = None
        self.linked: set[int] = set()  # text channels (and the voice channel's chat) whose replies are spoken
        self.home: int | None = None  # the text channel /join was run in: where spoken turns are answered
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
            self.voice_client = await self._connect(channel)
            self.voice_client.guild_voice = self
            self.linked.add(channel.id)
            self._player = asyncio.create_task(self._play_queue(), name=f"voice-playback-{self.guild_id}")
            log.info("voice: joined channel %s in guild %s", channel.id, self.guild_id)
            self._new_connection()
        self.check_company()

    async def _connect(self, channel: discord.abc.Connectable) -> "SpeakingVoiceClient":
        # A bot that does not listen shows as deafened (and Discord sends it no audio).
        return await channel.connect(timeout=CONNECT_TIMEOUT_S, reconnect=True, cls=self.client_class,
                                     self_deaf=not self.client_class.listens)

    def _new_connection(self) -> None:
        if self.on_connected is not None:
            self.on_connected(self)

    @property
    def playing(self) -> bool:
        """A reply is being spoken now."""
        return self.current is not None and self.voice_client is not None and self.voice_client.is_playing()

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
            self.voice_client.stop_playing()
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
            if old in self.client.voice_clients:
                with contextlib.suppress(Exception):
                    await old.disconnect(force=True)
        try:
            vc = await self._connect(channel)
        except (asyncio.TimeoutError, discord.ClientException) as exc:
            log.error("voice: could not rejoin channel %s in guild %s: %r", channel.id, self.guild_id, exc)
            await self.leave("could not rejoin")
            return None
        vc.guild_voice, self.voice_client = self, vc
        self._new_connection()
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
            self._idle = loop.call_later(self.idle_leave_s,
                                         lambda: asyncio.ensure_future(self._leave_if_alone()))

    async def _leave_if_alone(self) -> None:
        self._idle = None
        channel = self.voice_client.channel if self.voice_client else None
        if channel is not None and not [m for m in channel.members if not m.bot]:
            await self.leave(f"nobody was in the channel for {self.idle_leave_s:g} s")
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
        if vc is not None and vc in self.client.voice_clients:  # not cleaned up by discord.py already
            with contextlib.suppress(Exception):
                await vc.disconnect(force=True)
        self.on_left(self)
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
        guild = self.client.get_guild(self.guild_id)
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
    listens = False  # see bots/discord/voice/receive.py for the one that does

    def stop_playing(self) -> None:
        """Stop what is playing (and nothing else: a listening client's stop() also stops receiving)."""
        discord.VoiceClient.stop(self)

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
