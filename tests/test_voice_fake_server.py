"""The fake Discord voice server (tests/fakes/discord_voice_server.py) with plain, unmodified discord.py:
it connects, plays known PCM, and the fake hears exactly that, paced like real time."""

from __future__ import annotations

import asyncio
import contextlib

import discord
import numpy as np
import pytest

from fakes.discord_server import FakeDiscord
from fakes.discord_voice_server import SUPPORTED, FakeVoiceServer, trusted_by_aiohttp

TONE_S = 1.0


@pytest.fixture
async def fake():
    async with FakeDiscord(bot_name="VoiceBot") as fake, FakeVoiceServer(fake._changed) as server:
        fake.voice_server = server
        with fake.patch_discord_py(), trusted_by_aiohttp(server.ca):
            yield fake
    assert fake.unknown_requests == [] and fake.server_errors == []


@contextlib.asynccontextmanager
async def client_of(fake: FakeDiscord):
    intents = discord.Intents.default()
    client = discord.Client(intents=intents)
    task = asyncio.create_task(client.start(fake.token))
    try:
        await asyncio.wait_for(client.wait_until_ready(), 20)
        yield client
    finally:
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def tone_pcm(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(48_000 * seconds)) / 48_000
    mono = (0.4 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return np.repeat(mono[:, None], 2, axis=1).tobytes()


@pytest.mark.timeout(60)
async def test_discord_py_joins_plays_and_the_fake_hears_it(fake):
    guild = fake.add_guild("G")
    voice = fake.add_voice_channel(guild, "Lounge")
    alice = fake.add_user("alice")
    fake.user_joins_voice(voice, alice)
    async with client_of(fake) as client:
        channel = client.get_channel(voice.id)
        assert [m.id for m in channel.members] == [alice.id]  # GUILD_CREATE's voice_states

        vc = await channel.connect(timeout=15, self_deaf=True)
        session = fake.voice_server.session(guild.id)
        assert session.mode == SUPPORTED and session.client_address is not None  # IP discovery done
        assert session.identify["max_dave_protocol_version"] >= 1
        assert fake.voice_channel_of(guild, fake.bot_user) == voice.id
        assert guild.voice_states[fake.bot_user.id].self_deaf

        done = asyncio.Event()
        vc.play(discord.PCMAudio(_Bytes(tone_pcm(TONE_S))), after=lambda e: client.loop.call_soon_threadsafe(done.set))
        await asyncio.wait_for(done.wait(), 20)
        await fake.wait_for(lambda: len(session.packets) >= 50 + 5, 10, "the last packets")

        audio = session.audio()
        assert len(audio) == int(TONE_S * 50)  # one packet per 20 ms of PCM
        assert [p.sequence for p in audio] == list(range(audio[0].sequence, audio[0].sequence + len(audio)))
        assert all(b.timestamp - a.timestamp == 960 for a, b in zip(audio, audio[1:]))
        assert len(session.packets) - len(audio) == 5  # discord.py ends with 5 Opus silence frames
        assert audio[-1].received_at - audio[0].received_at >= 0.9 * (len(audio) - 1) * 0.02  # real-time pacing
        assert [flags for _, flags in session.speaking] == [0, 1, 0]
        pcm = np.frombuffer(session.pcm(), dtype="<i2").reshape(-1, 2).astype(np.float64)
        steady = pcm[4800:-4800, 0]  # past Opus's start-up
        assert abs(np.sqrt((steady**2).mean()) - 0.4 * 32767 / np.sqrt(2)) < 0.1 * 0.4 * 32767  # same loudness
        spectrum = np.abs(np.fft.rfft(steady))
        assert abs(np.argmax(spectrum) * 48_000 / len(steady) - 440) < 5  # same pitch

        await vc.disconnect()
        await fake.wait_for(lambda: fake.voice_channel_of(guild, fake.bot_user) is None, 10, "the bot to leave")
        assert fake.voice_server.refused == []


class _Bytes:
    """A file-like object over bytes for discord.PCMAudio."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def read(self, size: int) -> bytes:
        piece = self.data[self.at:self.at + size]
        self.at += size
        return piece
