"""Spoken conversation in Discord voice channels: the bot hears people, and answers aloud.

With `voice.listen.enabled`, the bot listens from `/join` on. Each person's audio (receive.py) goes
into the guild's room of the listening facade (voice/listen/hearing.py), which cuts it into turns
and writes them down off the event loop; a transcript enters the conversation of the text channel
/join was run in, as that person's turn: `ChatService.respond(key, author=display name,
text=transcript, adapter="discord-voice")`, so it is stored, trimmed, retained and forgotten like a
typed one. The answer is spoken through the same playback queue as typed replies and, unless
`voice.listen.echo_text` is off, the transcript ("🎙️ alice: …") and the answer are posted in that
text channel. Someone who takes the turn while the bot talks stops it (`voice.listen.barge_in`; what
counts, and what is only a "mhm", the listening facade decides).

`/listen off|on` (admins: Manage Server) switches listening per guild; `/listen ignore-me` lets a
person opt out (kept in the store). Audio lives in memory only, from the UDP socket to the model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Awaitable, Callable

import discord

from bots.chat.edits import EditBudget
from bots.chat.ordering import ReplyTasks
from bots.chat.view import ReplyView, stream_reply, take_message
from bots.discord.commands import conversation_key
from bots.discord.reply import EDITS_PER_CHANNEL, NO_PINGS, ReplyMessages, render, tell_privately
from bots.discord.voice.playback import GuildVoice
from bots.discord.voice.receive import ListeningVoiceClient, TurnSink, untested_versions
from core.config.loading import Settings
from core.conversation import StoreUnavailable
from core.errors import MEMORY_UNAVAILABLE, ChatError
from core.replies import relay
from core.service import ChatService
from voice.listen.hearing import Hearing, Room
from voice.listen.transcriber import Transcript
from voice.speak.reply import SpokenReply

log = logging.getLogger(__name__)

MIC = "\N{STUDIO MICROPHONE}\N{VARIATION SELECTOR-16}"
ADAPTER = "discord-voice"
IGNORE_PREFERENCE = "discord:listen-ignore"  # people who said /listen ignore-me (user id -> "1")

Speak = Callable[[discord.abc.Messageable], Awaitable[SpokenReply | None]]


class DiscordListening:
    """Listening in every guild the bot's voice is in; one speech-to-text model for all of them.
    `speak(channel)` starts a spoken reply in a channel linked to a voice channel (or gives None)."""

    client_class = ListeningVoiceClient

    def __init__(self, client: discord.Client, speak: Speak, service: ChatService, settings: Settings):
        self.client = client
        self.speak = speak
        self.service = service
        self.config = settings.config.voice.listen
        self.metrics = service.metrics
        self.hearing = Hearing(self.config, service.metrics)
        self.ignored: set[int] = set()  # people who opted out (/listen ignore-me), kept in the store
        self.guilds: dict[int, GuildListening] = {}
        self.tasks = ReplyTasks(ADAPTER)
        self._edits = EditBudget(*EDITS_PER_CHANNEL)
        for found in untested_versions():
            log.warning("listen: the receive shim was written for other versions than %s", found)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load who opted out, and the speech-to-text model (once, off the event loop); raises SttUnavailable."""
        await self.load_ignored()
        await self.hearing.start()

    async def stop(self) -> None:
        for guild_id in list(self.guilds):
            self.detach(guild_id)
        await self.tasks.stop(5)
        await self.hearing.close()

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
            listening.room.forget(member_id)

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
            self.ignored = {int(ident) for ident in await self.service.preferences(IGNORE_PREFERENCE)}
        except StoreUnavailable as exc:  # keep what this process knows; the next join asks again
            log.warning("listen: cannot read who opted out: %s", exc)

    async def ignore_me(self, interaction: discord.Interaction, ignore: bool) -> None:
        user = interaction.user.id
        try:
            await self.service.set_preference(IGNORE_PREFERENCE, str(user), "1" if ignore else None)
        except StoreUnavailable:
            await interaction.response.send_message(MEMORY_UNAVAILABLE, ephemeral=True)
            return
        if ignore:
            self.ignored.add(user)
            for listening in self.guilds.values():
                listening.room.forget(user)
            text = ("I won't listen to you in voice channels any more. "
                    "`/listen ignore-me ignore:False` to be heard again.")
        else:
            self.ignored.discard(user)
            text = "I'll listen to you again in voice channels."
        await interaction.response.send_message(text, ephemeral=True)

    # ---- a turn, from its transcript to the answer (event loop) ------------------------------------

    def on_transcript(self, listening: "GuildListening", member: discord.Member, transcript: Transcript) -> None:
        turn = transcript.turn
        if not listening.wants(member):
            outcome = "ignored"
        elif transcript.text is None:
            outcome = "empty"
        else:
            outcome = "answered"
        log.info("listen: turn guild=%s speaker=%s speech=%.2fs audio=%.2fs ended_by=%s transcription=%.2fs batch=%d "
                 "outcome=%s", listening.guild_voice.guild_id, member.id, turn.speech_s, turn.seconds, turn.ended_by,
                 transcript.transcription_s, transcript.batch, outcome)
        self.metrics.voice_turns.labels(outcome).inc()
        if outcome != "answered":
            return
        channel = self.client.get_channel(listening.guild_voice.home or 0)
        if channel is None:
            log.warning("listen: no text channel to answer a spoken turn in guild %s", listening.guild_voice.guild_id)
            return
        key = conversation_key(channel, channel.guild.id)
        self.tasks.spawn(self._answer(channel, member, transcript), conversation=key)

    async def _answer(self, channel: discord.abc.Messageable, member: discord.Member, transcript: Transcript) -> None:
        """Answer one spoken turn in `channel`'s conversation: aloud, and in text unless echo_text is off."""
        key = conversation_key(channel, channel.guild.id)
        author = str(member.id)
        said = None
        if self.config.echo_text:
            with contextlib.suppress(discord.HTTPException):
                said = await channel.send(f"{MIC} {member.display_name}: {transcript.text}", allowed_mentions=NO_PINGS)
        view = ReplyView(ReplyMessages(channel, said), render, self._edits, channel.id, f"{key} (voice)")

        async def tell(text: str) -> None:
            await tell_privately(member, text, instead=channel)

        taken = await take_message(self.service, view, transcript.text, key=key, author_id=author,
                                   slow_down=_quietly, tell=tell)
        if taken is None:
            return
        spoken = await self.speak(channel)
        if spoken is not None:
            spoken.turn_ended_at = transcript.turn.ended_at
        updates = self.service.respond(key, member.display_name, taken, adapter=ADAPTER, author_id=author)
        listeners = [spoken.on_update] if spoken is not None else []
        try:
            if said is not None:
                await stream_reply(view, updates, interval_s=0, listeners=listeners)
            else:  # echo_text off: the voice only; a failure is logged, as nobody reads it
                try:
                    await relay(updates, also=listeners, where=key)
                except ChatError as exc:
                    log.info("listen: no spoken answer in %s: %s", key, exc.user_message)
        finally:
            if spoken is not None:
                spoken.abandon_unfinished()


class GuildListening:
    """Listening in one guild: its receiving sink and its room (the people's turns)."""

    def __init__(self, owner: DiscordListening, guild_voice: GuildVoice):
        self.owner = owner
        self.guild_voice = guild_voice
        self.on = True
        self.room: Room = owner.hearing.room(f"guild-{guild_voice.guild_id}", on_transcript=self._transcribed,
                                             on_barge_in=self._barge_in, talking=lambda: guild_voice.playing)
        self.sink = TurnSink(self._hear, self.wants, lambda member: self.room.stopped_sending(member.id))
        self._members: dict[int, discord.Member] = {}

    def listen(self) -> None:
        vc = self.guild_voice.voice_client
        if vc is not None and vc.is_connected() and not vc.is_listening():
            vc.listen(self.sink)
            log.info("listen: listening in guild %s", self.guild_voice.guild_id)

    def switch(self, on: bool) -> None:
        self.on = on
        if not on:
            self.room.forget_everyone()

    def close(self) -> None:
        self.on = False
        self.room.close()
        vc = self.guild_voice.voice_client
        if vc is not None and vc.is_listening():
            vc.stop_listening()

    def wants(self, member: discord.Member) -> bool:
        """Whether `member`'s voice is to be heard now (any thread)."""
        vc = self.guild_voice.voice_client
        state = getattr(member, "voice", None)
        return (self.on and member.id not in self.owner.ignored and vc is not None and vc.channel is not None
                and state is not None and state.channel is not None and state.channel.id == vc.channel.id)

    def _hear(self, member: discord.Member, pcm: bytes) -> None:
        """A person's audio, from the receiving thread."""
        self._members[member.id] = member
        self.room.hear(member.id, pcm)

    def _transcribed(self, member_id: int, transcript: Transcript) -> None:
        self.owner.on_transcript(self, self._members[member_id], transcript)

    def _barge_in(self, member_id: int) -> None:
        if self.on and self.guild_voice.playing:
            self.guild_voice.skip()


async def _quietly(wait_s: float) -> None:
    """A spoken turn over the rate limit is not answered; there is no message to react to."""
