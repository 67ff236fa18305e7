"""Receiving voice from Discord: discord-ext-voice-recv's reader, plus the DAVE step it lacks.

discord.py 2.7 cannot receive audio; discord-ext-voice-recv adds a reader (UDP, transport
decryption, jitter buffer, SSRC -> user from SPEAKING events). Since Discord made DAVE end-to-end
encryption mandatory, what that reader hands on is still DAVE ciphertext: each frame must also pass
through discord.py's own DAVE session (`dave_session.decrypt(user_id, MediaType.audio, frame)`,
the step that the extension's open PRs #54/#62 add). This module is that shim, kept outside the
extension: `TurnSink` takes the reader's Opus frames (it asks for Opus, so the extension decodes
nothing), removes RTP padding the extension leaves on, applies the DAVE step, decodes Opus per
speaker and hands the PCM on. It was written for, and is tested with, the versions in TESTED_WITH.

Frames of the bot itself, of other bots and of people not in the bot's channel are dropped before
decoding. Frames that come before Discord's SPEAKING event maps their SSRC to a person (it can come
after a person's first packets: the extension hands those on without a user) are held, up to
HOLD_S, and replayed in order once the person is known, so the first words of a first sentence are
heard too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from importlib.metadata import version
from typing import Callable

import davey
import discord
from discord.ext import voice_recv
from discord.opus import Decoder

from bots.discord.voice.playback import SpeakingVoiceClient

log = logging.getLogger(__name__)

TESTED_WITH = {"discord.py": "2.7.1", "discord-ext-voice-recv": "0.5.2a179", "davey": "0.1.7"}
OPUS_SILENCE = b"\xf8\xff\xfe"
HOLD_S = 2.0  # frames of a stream whose person is not known yet are kept this long
HOLD_FRAMES = int(HOLD_S / 0.02)
HOLD_STREAMS = 16  # unknown streams held at once (a flood of SSRCs must not grow memory)

Hear = Callable[[discord.Member, bytes], None]  # (speaker, 20 ms of 48 kHz stereo s16le)
Stopped = Callable[[discord.Member], None]  # the speaker's client stopped sending (it sent its silence frames)


def untested_versions() -> list[str]:
    """The installed packages this shim was not written for, as "name version (tested: x)"."""
    found = []
    for name, tested in TESTED_WITH.items():
        installed = version(name)
        if installed != tested:
            found.append(f"{name} {installed} (tested: {tested})")
    return found


class DaveDecrypt:
    """The DAVE step for one voice connection: a transport-decrypted Opus frame of `user_id` in,
    the plain Opus frame out, or None when it cannot be decrypted (yet)."""

    def __init__(self, connection) -> None:
        self.connection = connection  # discord.py's VoiceConnectionState: its dave_session changes on reconnects
        self.failures = 0

    def __call__(self, user_id: int, frame: bytes) -> bytes | None:
        state = self.connection
        session = state.dave_session
        encrypted = state.dave_protocol_version != 0
        if session is None or not session.ready:
            # Before the MLS group is formed: plain frames pass, encrypted ones cannot be read yet.
            return None if encrypted and frame != OPUS_SILENCE else frame
        try:
            return session.decrypt(user_id, davey.MediaType.audio, frame)
        except ValueError:  # no key for this sender yet, or an unencrypted frame outside passthrough
            if not encrypted:  # DAVE was just turned off: frames come plain
                return frame
            self.failures += 1
            return None


def rtp_payload(packet) -> bytes:
    """The payload of a transport-decrypted RTP packet without its RTP padding (RFC 3550 5.1: the
    last byte counts the padding bytes), which discord-ext-voice-recv 0.5.2 leaves on."""
    data = bytes(packet.decrypted_data)
    if getattr(packet, "padding", False) and data and 0 < data[-1] <= len(data):
        data = data[: -data[-1]]
    return data


class TurnSink(voice_recv.AudioSink):
    """Where the reader's frames go: people's audio, decrypted and decoded, to `hear` (called in the
    extension's packet-router thread), and `stopped` when a client ends its speech with Opus silence
    frames (from then on, no audio means a pause, not a late packet). `accepts(member)` says whose
    audio is wanted now."""

    def __init__(self, hear: Hear, accepts: Callable[[discord.Member], bool], stopped: Stopped):
        super().__init__()
        self.hear = hear
        self.accepts = accepts
        self.stopped = stopped
        self._decrypt: DaveDecrypt | None = None
        self._decoders: dict[int, Decoder] = {}  # per SSRC: Opus decoding carries state
        self._held: dict[int, deque] = {}  # per SSRC not yet mapped to a person: (arrival, packet)

    def wants_opus(self) -> bool:
        return True

    def write(self, user, data: voice_recv.VoiceData) -> None:
        """A frame from the extension's packet router (its lock held)."""
        if self.voice_client is None:
            return
        packet = data.packet
        if user is None:  # Discord has not said whose stream this is yet
            held = self._held.get(packet.ssrc)
            if held is None and len(self._held) < HOLD_STREAMS:
                held = self._held[packet.ssrc] = deque(maxlen=HOLD_FRAMES)
            if held is not None:
                held.append((time.monotonic(), packet))
            return
        self._replay(user, packet.ssrc)
        self._take(user, packet)

    @voice_recv.AudioSink.listener()
    def on_voice_member_speaking_state(self, member, ssrc: int, state) -> None:
        """SPEAKING mapped `ssrc` to a person (the router's lock held, as in write): their held frames
        are heard now, not only when their next frame comes."""
        vc = self.voice_client
        if vc is None or ssrc not in self._held:
            return
        if member is None:
            ident = vc._get_id_from_ssrc(ssrc)
            member = ident and (vc.guild.get_member(ident) or vc.client.get_user(ident))
        if member is not None:
            self._replay(member, ssrc)

    def _replay(self, user, ssrc: int) -> None:
        """The frames held for `ssrc` before its person was known, oldest first (DAVE decrypts a
        sender's frames in order)."""
        held = self._held.pop(ssrc, None)
        if held:
            recent = time.monotonic() - HOLD_S
            for arrived, packet in held:
                if arrived >= recent:
                    self._take(user, packet)

    def _take(self, user, packet) -> None:
        vc = self.voice_client
        if user.id == vc.client.user.id or user.bot or not self.accepts(user):
            return
        decoder = self._decoders.get(packet.ssrc)
        if decoder is None:
            decoder = self._decoders[packet.ssrc] = Decoder()
        if not packet:  # lost on the way (the jitter buffer's stand-in): let Opus conceal the gap
            self.hear(user, decoder.decode(None, fec=False))
            return
        if self._decrypt is None or self._decrypt.connection is not vc._connection:
            self._decrypt = DaveDecrypt(vc._connection)
        frame = self._decrypt(user.id, rtp_payload(packet))
        if frame is None:
            return
        try:
            pcm = decoder.decode(frame, fec=False)
        except discord.opus.OpusError as exc:
            log.debug("listen: an undecodable frame from %s: %s", user.id, exc)
            return
        self.hear(user, pcm)
        if frame == OPUS_SILENCE:
            self.stopped(user)

    def forget(self, ssrc: int) -> None:
        self._decoders.pop(ssrc, None)
        self._held.pop(ssrc, None)

    def cleanup(self) -> None:
        self._decoders.clear()
        self._held.clear()


class ListeningVoiceClient(SpeakingVoiceClient, voice_recv.VoiceRecvClient):
    """A voice client that also receives (the extension's VoiceRecvClient: its gateway hook maps SSRCs to
    users from SPEAKING events), with GuildVoice's clean-up hook."""

    listens = True
