"""Spoken conversation in Discord voice channels: the bot hears people, and answers aloud.

With `voice.listen.enabled`, the bot listens from `/join` on. Each person's audio (bots/
discord_receive.py) is cut into turns (voice/listen/); a turn is transcribed off the event loop and
enters the conversation of the text channel /join was run in, as that person's turn:
`ChatService.respond(key, author=display name, text=transcript, adapter="discord-voice")`, so it is
stored, trimmed, retained and forgotten like a typed one. The answer is spoken through the same
playback queue as typed replies and, unless `voice.listen.echo_text` is off, the transcript
("🎙️ alice: …") and the answer are posted in that text channel. Someone who starts speaking while
the bot talks stops it (`voice.listen.barge_in`).

`/listen off|on` (admins: Manage Server) switches listening per guild; `/listen ignore-me` lets a
person opt out (in this process). Audio lives in memory only, from the UDP socket to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import discord
from discord import app_commands

from bots.discord_commands import conversation_key
from bots.discord_playback import GuildVoice
from bots.discord_receive import ListeningVoiceClient, TurnSink, untested_versions
from bots.discord_reply import EDITS_PER_CHANNEL, NO_PINGS, ReplyMessages, render
from bots.streaming import EditBudget, ReplyTasks, ReplyView, admitted, stream_reply
from core.config import Settings
from core.conversation import ConversationKey, StoreUnavailable
from core.replies import ReplyUpdate
from core.service import MEMORY_UNAVAILABLE, ChatError, ChatService
from voice.listen.transcriber import Transcriber, Transcript, acquire_transcriber
from voice.listen.turns import Listener, Turn

if TYPE_CHECKING:
    from bots.discord_voice import DiscordVoice

log = logging.getLogger(__name__)

MIC = "\N{STUDIO MICROPHONE}\N{VARIATION SELECTOR-16}"
TICK_S = 0.05  # how often turns whose audio stopped coming are checked for their end
ADAPTER = "discord-voice"
IGNORE_PREFERENCE = "discord:listen-ignore"  # people who said /listen ignore-me (user id -> "1")


class DiscordListening:
    """Listening in every guild the bot's voice is in; one speech-to-text model for all of them."""

    client_class = ListeningVoiceClient

    def __init__(self, voice: "DiscordVoice", service: ChatService, settings: Settings):
        self.voice = voice
        self.service = service
        self.config = settings.config.voice.listen
        self.discord = settings.config.discord
        self.metrics = service.metrics
        self.transcriber: Transcriber | None = None
        self.ignored: set[int] = set()  # people who opted out (/listen ignore-me), kept in the store
        self.guilds: dict[int, GuildListening] = {}
        self.tasks = ReplyTasks(ADAPTER)
        self._edits = EditBudget(*EDITS_PER_CHANNEL)
        self._loading: asyncio.Task | None = None
        for found in untested_versions():
            log.warning("listen: the receive shim was written for other versions than %s", found)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load who opted out, and the speech-to-text model (once, off the event loop); raises SttUnavailable."""
        await self.load_ignored()
        if self.transcriber is not None:
            return
        if self._loading is None or (self._loading.done() and self._loading.exception() is not None):
            self._loading = asyncio.ensure_future(asyncio.to_thread(acquire_transcriber, self.config))
        transcriber = await asyncio.shield(self._loading)
        if self.transcriber is None:
            self.transcriber = transcriber
            log.info("listen: %s speech to text ready (%s on %s)", transcriber.stt.name,
                     self.config.model or "its default model", transcriber.stt.device)

    async def stop(self) -> None:
        for guild_id in list(self.guilds):
            self.detach(guild_id)
        await self.tasks.stop(5)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.transcriber is not None:
            transcriber, self.transcriber = self.transcriber, None
            await asyncio.to_thread(transcriber.release)

    def attach(self, guild_voice: GuildVoice) -> None:
        """Listen on the guild's (new) connection: called after every connect and rejoin."""
        listening = self.guilds.get(guild_voice.guild_id)
        if listening is None or listening.guild_voice is not guild_voice:
            if listening is not None:
                listening.close()
            listening = self.guilds[guild_voice.guild_id] = GuildListening(self, guild_voice)
        listening.listen()

    def detach(self, guild_id: int) -> None:
        listening = self.guilds.pop(guild_id, None)
        if listening is not None:
            listening.close()

    def member_left(self, guild_id: int, member_id: int) -> None:
        """Someone left the bot's channel: whatever they were saying is dropped."""
        listening = self.guilds.get(guild_id)
        if listening is not None:
            listening.listener.forget(member_id)

    # ---- commands ----------------------------------------------------------------------------------

    async def switch(self, interaction: discord.Interaction, on: bool) -> None:
        permissions = interaction.permissions
        if interaction.guild is None or not (permissions.administrator or permissions.manage_guild):
            await interaction.response.send_message("Only admins (Manage Server) can switch my listening here.",
                                                    ephemeral=True)
            return
        listening = self.guilds.get(interaction.guild.id)
        if listening is None:
            await interaction.response.send_message("I'm not in a voice channel here.", ephemeral=True)
            return
        listening.switch(on)
        await interaction.response.send_message(
            "I'm listening again: talk to me in the voice channel." if on
            else "I've stopped listening: I only speak my replies now. `/listen on` to talk again."
        )

    async def load_ignored(self) -> None:
        """Who opted out, as the store says (another process may have been told since)."""
        try:
            self.ignored = {int(ident) for ident in await self.service.store.preferences(IGNORE_PREFERENCE)}
        except StoreUnavailable as exc:  # keep what this process knows; the next join asks again
            log.warning("listen: cannot read who opted out: %s", exc)

    async def ignore_me(self, interaction: discord.Interaction, ignore: bool) -> None:
        user = interaction.user.id
        try:
            await self.service.store.set_preference(IGNORE_PREFERENCE, str(user), "1" if ignore else None)
        except StoreUnavailable:
            await interaction.response.send_message(MEMORY_UNAVAILABLE, ephemeral=True)
            return
        if ignore:
            self.ignored.add(user)
            for listening in self.guilds.values():
                listening.listener.forget(user)
            text = ("I won't listen to you in voice channels any more. "
                    "`/listen ignore-me ignore:False` to be heard again.")
        else:
            self.ignored.discard(user)
            text = "I'll listen to you again in voice channels."
        await interaction.response.send_message(text, ephemeral=True)

    # ---- a turn, from its transcript to the answer (event loop) ------------------------------------

    def heard(self, listening: "GuildListening", member: discord.Member, transcript: Transcript) -> None:
        turn = transcript.turn
        self.metrics.voice_transcription.labels(self.transcriber.stt.name if self.transcriber else "?").observe(
            transcript.transcription_s)
        if not listening.wants(member):
            outcome = "ignored"
        elif transcript.text is None:
            outcome = "empty"
        else:
            outcome = "answered"
        log.info("listen: turn guild=%s speaker=%s speech=%.2fs audio=%.2fs%s transcription=%.2fs batch=%d outcome=%s",
                 listening.guild_voice.guild_id, member.id, turn.speech_s, turn.seconds, " cut" if turn.cut else "",
                 transcript.transcription_s, transcript.batch, outcome)
        self.metrics.voice_turns.labels(outcome).inc()
        if outcome != "answered":
            return
        channel = self.voice.client.get_channel(listening.guild_voice.home or 0)
        if channel is None:
            log.warning("listen: no text channel to answer a spoken turn in guild %s", listening.guild_voice.guild_id)
            return
        key = conversation_key(channel)
        self.tasks.spawn(self._answer(channel, member, transcript), conversation=key)

    async def _answer(self, channel: discord.abc.Messageable, member: discord.Member, transcript: Transcript) -> None:
        """Answer one spoken turn in `channel`'s conversation: aloud, and in text unless echo_text is off."""
        key = conversation_key(channel)
        author = str(member.id)
        said = None
        if self.config.echo_text:
            with contextlib.suppress(discord.HTTPException):
                said = await channel.send(f"{MIC} {member.display_name}: {transcript.text}", allowed_mentions=NO_PINGS)
        view = ReplyView(ReplyMessages(channel, said), render, self._edits, channel.id, f"{key} (voice)")
        text = await admitted(self.service, view, transcript.text, platform="discord", author_id=author,
                              per_minute=self.discord.rate_limit_per_minute, slow_down=_quietly)
        if text is None:
            return
        spoken = await self.voice.speak(channel)
        if spoken is not None:
            spoken.turn_ended_at = transcript.turn.ended_at
        updates = self.service.respond(key, member.display_name, text, adapter=ADAPTER, author_id=author)
        listeners = [spoken.on_update] if spoken is not None else []
        try:
            if said is not None:
                await stream_reply(view, updates, interval_s=0, listeners=listeners)
            else:
                await _speak_only(updates, listeners, key)
        finally:
            if spoken is not None:
                spoken.abandon_unfinished()


class GuildListening:
    """Listening in one guild: its receiving sink, its people's turns and a ticker that ends them."""

    def __init__(self, owner: DiscordListening, guild_voice: GuildVoice):
        self.owner = owner
        self.guild_voice = guild_voice
        self.on = True
        self.loop = asyncio.get_running_loop()
        self.listener = Listener(owner.config, on_turns=self._turns_ended, on_speech=self._speech_started)
        self.sink = TurnSink(self._hear, self.wants)
        self._members: dict[int, discord.Member] = {}
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"listen-{guild_voice.guild_id}", daemon=True)
        self._ticker.start()

    def listen(self) -> None:
        vc = self.guild_voice.voice_client
        if vc is not None and vc.is_connected() and not vc.is_listening():
            vc.listen(self.sink)
            log.info("listen: listening in guild %s", self.guild_voice.guild_id)

    def switch(self, on: bool) -> None:
        self.on = on
        if not on:
            for speaker in self.listener.speakers():
                self.listener.forget(speaker)

    def close(self) -> None:
        self.on = False
        self._stopped.set()
        for speaker in self.listener.speakers():
            self.listener.forget(speaker)
        vc = self.guild_voice.voice_client
        if vc is not None and vc.is_listening():
            vc.stop_listening()

    def wants(self, member: discord.Member) -> bool:
        """Whether `member`'s voice is to be heard now (any thread)."""
        vc = self.guild_voice.voice_client
        state = getattr(member, "voice", None)
        return (self.on and member.id not in self.owner.ignored and vc is not None and vc.channel is not None
                and state is not None and state.channel is not None and state.channel.id == vc.channel.id)

    # ---- receiving threads -------------------------------------------------------------------------

    def _hear(self, member: discord.Member, pcm: bytes) -> None:
        self._members[member.id] = member
        self.listener.hear(member.id, pcm)

    def _tick(self) -> None:
        while not self._stopped.wait(TICK_S):
            try:
                self.listener.tick()
            except Exception:  # noqa: BLE001 - never lose the ticker
                log.exception("listen: ending turns failed in guild %s", self.guild_voice.guild_id)

    def _turns_ended(self, turns: list[Turn]) -> None:
        transcriber = self.owner.transcriber
        if transcriber is not None:
            transcriber.submit([(turn, self._answer_to(self._members[turn.speaker])) for turn in turns])

    def _answer_to(self, member: discord.Member):
        def done(transcript: Transcript | None, error: Exception | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to answer
                self.loop.call_soon_threadsafe(self._transcribed, member, transcript, error)

        return done

    def _speech_started(self, speaker: int) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._barge_in, speaker)

    # ---- event loop --------------------------------------------------------------------------------

    def _transcribed(self, member: discord.Member, transcript: Transcript | None, error: Exception | None) -> None:
        if error is not None:
            self.owner.metrics.voice_turns.labels("failed").inc()
            return
        self.owner.heard(self, member, transcript)

    def _barge_in(self, speaker: int) -> None:
        if self.owner.config.barge_in and self.on and self.guild_voice.playing:
            log.info("listen: %s started speaking in guild %s: the bot stops talking", speaker,
                     self.guild_voice.guild_id)
            self.guild_voice.skip()


async def _quietly(wait_s: float) -> None:
    """A spoken turn over the rate limit is not answered; there is no message to react to."""


async def _speak_only(updates: AsyncIterator[ReplyUpdate], listeners: list, key: ConversationKey) -> None:
    """Feed the reply to the voice only (echo_text off); a failure is logged, as nobody reads it."""
    try:
        async for update in updates:
            for listener in listeners:
                await listener(update)
    except ChatError as exc:
        log.info("listen: no spoken answer in %s: %s", key, exc.user_message)


def add_listen_commands(tree: app_commands.CommandTree, listening: DiscordListening,
                        refused: Callable[[discord.Interaction], Awaitable[bool]]) -> None:
    """/listen on|off (admins) and /listen ignore-me."""
    group = app_commands.Group(name="listen", description="Whether I listen in the voice channel")

    @group.command(name="on", description="Listen and answer in the voice channel (admins)")
    async def listen_on(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await listening.switch(interaction, True)

    @group.command(name="off", description="Stop listening in the voice channel; only speak replies (admins)")
    async def listen_off(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await listening.switch(interaction, False)

    @group.command(name="ignore-me", description="Don't listen to me in voice channels")
    @app_commands.describe(ignore="False: listen to me again")
    async def ignore_me(interaction: discord.Interaction, ignore: bool = True) -> None:
        await listening.ignore_me(interaction, ignore)

    tree.add_command(group)

