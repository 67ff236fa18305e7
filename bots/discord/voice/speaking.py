"""Discord voice: the bot joins a voice channel and speaks its replies there.

`/join` (the caller's voice channel) links the text channel it was run in and the voice channel's
own chat: while joined, every reply the bot writes in a linked channel is also spoken, in the
voice of that conversation's persona, sentence by sentence as it is written. `/skip` stops what
it is saying, `/leave` leaves; it also leaves by itself once nobody has been in the channel for
`voice.idle_leave_s`. Each guild has one playback queue, so replies are spoken in order.

The text path hands every update of every reply to `on_reply` (the adapter's reply hook);
nothing here ever raises into the text reply. Connections and playback, per guild, are in
playback.py; with `voice.listen.enabled` the bot also listens and answers spoken turns
(listening.py, /listen). The slash commands themselves are in commands.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import discord

from bots.discord.commands import conversation_key
from bots.discord.voice.playback import GuildVoice
from bots.discord.reply import NO_PINGS
from core.config.loading import Settings
from core.replies import ReplyUpdate
from core.service import ChatService
from voice.speak.reply import SpokenReply
from voice.speak.speech import Speech
from voice.speak.tts import VoiceUnavailable
from voice.speak.worker import VoiceBusy

log = logging.getLogger(__name__)

BUSY = "(Not speaking this one: too many replies are waiting to be spoken. It's all here in text.)"


class DiscordSpeaking:
    """Voice connections, what /join /leave /skip do, and the per-guild playback queues of one Discord
    client; with `voice.listen.enabled`, also the listening side (listening.py) on those connections."""

    def __init__(self, client: discord.Client, service: ChatService, settings: Settings):
        self.client = client
        self.service = service
        self.config = settings.config.voice
        self.metrics = service.metrics
        self.speech = Speech(self.config, service.metrics)
        self.guilds: dict[int, GuildVoice] = {}
        self._replies: dict[int, SpokenReply | None] = {}  # message answered -> its spoken reply (None: text only)
        self._loading: asyncio.Task | None = None
        self.listening = None
        if self.config.listen.enabled:  # imported only then: it needs the listen extra
            from bots.discord.voice.listening import DiscordListening

            self.listening = DiscordListening(client, self.speak, service, settings)
        client.event(self.on_voice_state_update)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the speech engine in the background, so that the first /join need not wait."""
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            await self.speech.start()
        except VoiceUnavailable as exc:
            log.error("voice: the speech engine is unavailable: %s", exc)
        if self.listening is not None:
            try:
                await self.listening.start()
            except Exception as exc:  # noqa: BLE001 - SttUnavailable, or the listen extra is missing
                log.error("listen: speech to text is unavailable: %s", exc)

    async def stop(self) -> None:
        for guild_voice in list(self.guilds.values()):
            await guild_voice.leave("shutting down")
        if self._loading is not None:
            self._loading.cancel()
        if self.listening is not None:
            await self.listening.stop()
        await self.speech.close()

    # ---- the text path's hook --------------------------------------------------------------------

    async def on_reply(self, message: discord.Message, update: ReplyUpdate) -> None:
        """Speak the reply to `message` as it grows, when its channel is linked to a voice channel the
        bot is in. Its first update queues it in the guild; a reply whose updates end without a final
        one (it failed) is dropped from its first unspoken sentence on."""
        if message.id not in self._replies:
            self._replies[message.id] = await self.speak(message.channel)
            # The updates of a reply come from one task: when it ends, so has the reply.
            asyncio.current_task().add_done_callback(lambda _: self._reply_ended(message.id))
        spoken = self._replies[message.id]
        if spoken is not None:
            await spoken.on_update(update)

    def _reply_ended(self, message_id: int) -> None:
        spoken = self._replies.pop(message_id, None)
        if spoken is not None:
            spoken.abandon_unfinished()

    async def speak(self, channel: discord.abc.Messageable) -> SpokenReply | None:
        """A SpokenReply for a reply being written in `channel` when that channel is linked to a
        voice channel the bot is in (queued in its guild); else None. Never raises."""
        guild = getattr(channel, "guild", None)
        guild_voice = self.guilds.get(guild.id) if guild is not None else None
        if guild_voice is None or channel.id not in guild_voice.linked:
            return None
        try:
            persona = await self.service.persona_for(conversation_key(channel, guild.id))
            reply = self.speech.reply(persona.config.voice, adapter="discord",
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
            await self.speech.start()
        except VoiceUnavailable as exc:
            await interaction.followup.send(f"My voice is unavailable right now: {exc}")
            return
        listening = await self._listening()
        guild_voice = self.guilds.get(guild.id)
        if guild_voice is None:
            guild_voice = GuildVoice(self.client, guild.id, self.config.idle_leave_s, self.forget,
                                     client_class=listening.client_class if listening else None,
                                     on_connected=listening.attach if listening else None)
        try:
            await guild_voice.connect(channel)
        except (asyncio.TimeoutError, discord.ClientException, discord.opus.OpusNotLoaded) as exc:
            log.warning("voice: could not connect to %s in guild %s: %r", channel.id, guild.id, exc)
            await interaction.followup.send(f"I couldn't connect to **{channel.name}**; please try again.")
            return
        self.guilds[guild.id] = guild_voice
        self.metrics.voice_connections.set(len(self.guilds))
        guild_voice.linked.add(interaction.channel_id)
        guild_voice.home = interaction.channel_id
        here = "here" if interaction.channel_id == channel.id else f"here and in {channel.mention}'s chat"
        answer = f"Joined **{channel.name}**: I'll speak my replies {here}."
        if guild_voice.voice_client is not None and guild_voice.voice_client.listens:
            answer += (" I'm listening too: talk to me in the voice channel and I'll answer aloud"
                       " (`/listen ignore-me` if you'd rather I didn't hear you).")
        elif self.listening is not None:
            answer += " (I can't listen right now: my speech recognition is unavailable.)"
        await interaction.followup.send(answer)

    async def _listening(self):
        """The listening side, its model loaded; None when listening is off or cannot start."""
        if self.listening is None:
            return None
        try:
            await self.listening.start()
        except Exception as exc:  # noqa: BLE001 - SttUnavailable, or the listen extra is missing
            log.error("listen: speech to text is unavailable: %s", exc)
            return None
        return self.listening

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
        elif self.listening is not None and before.channel is not None and (
                after.channel is None or after.channel.id != before.channel.id):
            self.listening.member_left(member.guild.id, member.id)
        guild_voice.check_company()

    def forget(self, guild_voice: GuildVoice) -> None:
        if self.guilds.get(guild_voice.guild_id) is guild_voice:
            del self.guilds[guild_voice.guild_id]
            if self.listening is not None:
                self.listening.detach(guild_voice.guild_id)
        self.metrics.voice_connections.set(len(self.guilds))
