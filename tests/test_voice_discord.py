"""Discord voice end to end: unmodified discord.py against the fake Discord and its fake voice server
(TLS voice websocket, UDP, encrypted RTP, Opus); replies from a tiny chat model, spoken by the tiny
pocket-tts engine in a registered voice. What the fake voice server decodes is what a listener hears."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bots.discord.voice.speaking import BUSY
from conftest import make_config
from core.config.schema import Config, PersonaConfig
from core.errors import TIMED_OUT  # what the text reply says when the model takes too long
from fakes.discord_models import P
from fakes.discord_server import FakeChannel, FakeDiscord, FakeGuild, FakeUser
from fakes.discord_voice_server import FakeVoiceServer, VoiceSession, trusted_by_aiohttp
from fakes.scripted_model import ScriptedModel
from test_discord_bot import running
from tiny import train_reply_model
from voice_tiny import tiny_pocket_config, voices_dir_with

SHORT = "Apple it is."
LONG = "Apples grow on trees. They are red or green. People eat them every day."


@pytest.fixture(scope="module")
def speaker_model_dir(tmp_path_factory) -> Path:
    """Says SHORT to "the word is apple" and LONG (three sentences) to "tell me more"."""
    return train_reply_model(tmp_path_factory.mktemp("models") / "speaker", [
        [("the word is apple", SHORT)], [("tell me more", LONG)],
        [("the word is apple", SHORT), ("tell me more", LONG)],
    ])


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    return voices_dir_with(tmp_path_factory.mktemp("voices"))


class WakeOnLog(logging.Handler):
    """Lets the fake's waiters re-check their conditions when the bot logs (waits on log lines)."""

    def __init__(self, fake: FakeDiscord):
        super().__init__()
        self.fake, self.loop = fake, asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self.fake._changed)


@contextlib.asynccontextmanager
async def discord_with_voice(*, dave: bool = False, in_voice: bool = False):
    """The fake Discord with its fake voice server (DAVE or transport encryption only; `in_voice`:
    the server knows who is in which voice channel), whose waiters wake when the bot logs; it must
    have seen no unknown request and no server error."""
    async with FakeDiscord(bot_name="TTT") as fake:
        def channel_of(guild_id: int, user_id: int):
            return fake.voice_channel_of(fake.guilds[guild_id], user_id)

        where = {"channel_of": channel_of} if in_voice else {}
        async with FakeVoiceServer(fake._changed, dave=dave, **where) as server:
            fake.voice_server = server
            wake = WakeOnLog(fake)
            loggers = [logging.getLogger(name) for name in ("voice", "bots")]
            for logger in loggers:
                logger.addHandler(wake)
            try:
                with trusted_by_aiohttp(server.ca):
                    yield fake
            finally:
                for logger in loggers:
                    logger.removeHandler(wake)
    assert fake.unknown_requests == [] and fake.server_errors == []


@pytest.fixture
async def fake():
    async with discord_with_voice() as fake:
        yield fake


@dataclass
class Guild:
    guild: FakeGuild
    general: FakeChannel
    lounge: FakeChannel
    alice: FakeUser
    bob: FakeUser


def add_guild(fake: FakeDiscord, name: str = "Test Guild") -> Guild:
    guild = fake.add_guild(name)
    general, lounge = fake.add_text_channel(guild, "general"), fake.add_voice_channel(guild, "Lounge")
    alice, bob = fake.add_user(f"alice-{name}"), fake.add_user(f"bob-{name}")
    fake.add_member(guild, alice)
    fake.add_member(guild, bob)
    return Guild(guild, general, lounge, alice, bob)


def voice_config(tmp_path, model_dir, voices, fake: FakeDiscord, guilds: list[Guild], **voice) -> Config:
    config = make_config(
        tmp_path, model_dir,
        discord={"api_base_url": fake.api_url, "command_guilds": [g.guild.id for g in guilds],
                 "stream_edit_interval_s": 0, "rate_limit_per_minute": 0},
        voice={"enabled": True, "model": str(tiny_pocket_config()), "voices_dir": str(voices), **voice},
        conversation={"idle_minutes": 1e-6},  # every message starts afresh: the replies stay exact
    )
    config.personas["words"] = PersonaConfig.model_validate(
        dict(config.personas["words"].model_dump(), voice="ada", decoding={"do_sample": False, "max_new_tokens": 40})
    )
    return config


@contextlib.asynccontextmanager
async def speaking(config: Config, fake: FakeDiscord):
    """The Discord adapter as `ttt serve` runs it, its speech engine loaded."""
    async with running(config, fake) as adapter:
        await asyncio.wait_for(adapter.voice.speech.start(), 30)
        yield adapter


async def command(fake: FakeDiscord, channel, user, name: str) -> dict:
    """Runs /name; returns what the user sees (a response, or the follow-up of a deferred one)."""
    interaction = await fake.invoke_command(channel, user, name)
    response = await fake.wait_for_response(interaction, timeout=30)
    if response["type"] == 5:  # deferred
        followup = await fake.wait_for_followup(interaction, timeout=30)
        return {"content": followup["body"]["content"], "ephemeral": bool(response["flags"] & 64)}
    return {"content": response["data"]["content"], "ephemeral": response["ephemeral"]}


async def mention(fake: FakeDiscord, channel, user, text: str) -> dict:
    said = await fake.user_says(channel, user, f"{fake.bot_user.mention} {text}")
    return await fake.wait_for_message(channel, after=said, timeout=30)


def spoken(session: VoiceSession) -> list:
    """Finished spoken replies: runs of audio packets, each ended by discord.py's silence frames."""
    spurts = session.talk_spurts()
    return spurts if session.packets and session.packets[-1].silence else spurts[:-1]


async def wait_spoken(fake: FakeDiscord, session: VoiceSession, count: int) -> list:
    return await fake.wait_for(lambda: len(spoken(session)) >= count and spoken(session), 60, f"{count} spoken replies")


def frames_logged(caplog, outcome: str = "spoken") -> list[int]:
    """The frame counts of the replies spoken, from the one log line per spoken reply."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("voice: reply ")]
    return [int(re.search(r"frames=(\d+)", line).group(1)) for line in lines if f"outcome={outcome} " in line]


async def logged(fake: FakeDiscord, caplog, count: int) -> list[int]:
    """Waits for `count` spoken replies' log lines (written once playback has ended); their frame counts."""
    return await fake.wait_for(lambda: len(frames_logged(caplog)) >= count and frames_logged(caplog), 10,
                               f"{count} spoken-reply log lines")


def assert_heard(spurt: list) -> None:
    """Audible speech, paced like real time."""
    pcm = np.frombuffer(b"".join(p.pcm for p in spurt), dtype="<i2").astype(np.float64)
    assert np.sqrt((pcm**2).mean()) > 100  # not silence
    assert spurt[-1].received_at - spurt[0].received_at >= 0.9 * 0.02 * (len(spurt) - 1)
    assert all(b.timestamp - a.timestamp == 960 for a, b in zip(spurt, spurt[1:]))


@pytest.mark.timeout(180)
async def test_join_speak_in_order_skip_and_leave(tmp_path, speaker_model_dir, voices, fake, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    caplog.set_level(logging.INFO, logger="bots.discord.adapter")
    g = add_guild(fake)
    locked = fake.add_voice_channel(g.guild, "Locked", overwrites=[
        {"id": str(fake.bot_role(g.guild).id), "type": 0, "allow": "0", "deny": str(P.CONNECT)}])
    speakers = fake.add_role(g.guild, "speakers")
    for user in (g.alice, g.bob):
        fake.add_member(g.guild, user, roles=[speakers])
    carol = fake.add_user("carol")
    config = voice_config(tmp_path, speaker_model_dir, voices, fake, [g], allowed_roles=[speakers.id])
    async with speaking(config, fake) as adapter:
        assert adapter.client.intents.voice_states
        assert {"join", "leave", "skip"} <= {c["name"] for c in fake.guild_commands[g.guild.id]}
        assert "permissions=274881121344" in caplog.text  # the text permissions plus Connect and Speak

        fake.user_joins_voice(g.lounge, carol)
        answer = await command(fake, g.general, carol, "join")
        assert answer == {"content": "Sorry, /join is only for members with a voice role here.", "ephemeral": True}
        fake.user_leaves_voice(g.guild, carol)
        answer = await command(fake, g.general, g.bob, "join")
        assert answer == {"content": "Join a voice channel first, then use /join.", "ephemeral": True}
        fake.user_joins_voice(locked, g.bob)
        answer = await command(fake, g.general, g.bob, "join")
        assert answer["ephemeral"] and "need the Connect and Speak permissions" in answer["content"]
        assert fake.voice_server.connections == 0

        fake.user_joins_voice(g.lounge, g.alice)
        answer = await command(fake, g.general, g.alice, "join")
        assert answer == {"content": f"Joined **Lounge**: I'll speak my replies here and in <#{g.lounge.id}>'s chat.",
                          "ephemeral": False}
        session = fake.voice_server.session(g.guild.id)
        assert fake.voice_channel_of(g.guild, fake.bot_user) == g.lounge.id and session.mode is not None
        metric = adapter.service.metrics.registry.get_sample_value
        assert metric("ttt_voice_connections") == 1

        # A mention is answered in text and aloud, sentence by sentence, in the persona's voice.
        assert (await mention(fake, g.general, g.alice, "tell me more"))["content"] == LONG
        [long_reply] = await wait_spoken(fake, session, 1)
        assert_heard(long_reply)
        assert len(long_reply) == (await logged(fake, caplog, 1))[0]  # every synthesized frame, no filler: gapless
        await fake.wait_for(lambda: len(session.speaking) == 3, 10, "SPEAKING off")
        assert [flags for _, flags in session.speaking] == [0, 1, 0]  # off on connect, on while playing, off
        assert f"guild={g.guild.id} channel={g.general.id} persona=words" in caplog.text
        assert metric("ttt_voice_time_to_first_audio_seconds_count", {"adapter": "discord"}) == 1

        # Two replies in a row: the second waits for the first to be said, then follows it.
        await fake.user_says(g.general, g.alice, f"{fake.bot_user.mention} the word is apple")
        await fake.user_says(g.general, g.bob, f"{fake.bot_user.mention} tell me more")
        assert (await fake.wait_for_message(g.general, lambda m: m["content"] == SHORT, timeout=30))
        assert (await fake.wait_for_message(g.general, lambda m: m["content"] == LONG, timeout=30))
        _, first, second = await wait_spoken(fake, session, 3)
        assert [len(first), len(second)] == (await logged(fake, caplog, 3))[1:3]
        assert len(second) > 2 * len(first)  # SHORT, then LONG
        assert first[-1].received_at < second[0].received_at
        assert_heard(first)
        assert_heard(second)

        # /skip stops the reply being spoken; /skip with nothing playing says so. (In the voice channel's chat.)
        before = len(session.packets)
        await fake.user_says(g.lounge, g.alice, f"{fake.bot_user.mention} tell me more")
        await fake.wait_for(lambda: len(session.packets) > before + 10, 30, "the reply to start playing")
        assert await command(fake, g.general, g.alice, "skip") == {"content": "Skipped.", "ephemeral": True}
        skipped = (await wait_spoken(fake, session, 4))[3]
        assert len(skipped) < len(long_reply)
        await fake.wait_for(lambda: "outcome=skipped" in caplog.text, 10, "the skipped reply's log line")
        answer = await command(fake, g.general, g.alice, "skip")
        assert answer == {"content": "I'm not saying anything right now.", "ephemeral": True}

        # /leave: gone from the channel, and replies are text only again.
        assert await command(fake, g.general, g.alice, "leave") == {"content": "Left **Lounge**.", "ephemeral": False}
        await fake.wait_for(lambda: fake.voice_channel_of(g.guild, fake.bot_user) is None, 10, "the bot to leave")
        assert metric("ttt_voice_connections") == 0
        packets = len(session.packets)
        text_only = await mention(fake, g.general, g.alice, "the word is apple")
        assert text_only["content"] == SHORT
        await fake.expect_no_message(g.general, within=0.5, after=text_only)
        assert len(session.packets) == packets
        answer = await command(fake, g.general, g.alice, "leave")
        assert answer == {"content": "I'm not in a voice channel here.", "ephemeral": True}
    assert frames_logged(caplog, "failed") == []


@pytest.mark.timeout(180)
async def test_reconnects_after_a_server_move_rejoins_after_a_drop_leaves_when_kicked_or_alone(
        tmp_path, speaker_model_dir, voices, fake, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    config = voice_config(tmp_path, speaker_model_dir, voices, fake, [g], idle_leave_s=1.0)
    async with speaking(config, fake), FakeVoiceServer(fake._changed, ca=fake.voice_server.ca) as moved_to:
        fake.user_joins_voice(g.lounge, g.alice)
        assert (await command(fake, g.general, g.alice, "join"))["content"].startswith("Joined")
        first = fake.voice_server.session(g.guild.id)

        # Discord moves the guild's voice to another server: the bot follows it there.
        fake.move_voice_server(g.guild, moved_to)
        await fake.wait_for(lambda: moved_to.session(g.guild.id) and moved_to.session(g.guild.id).mode, 30,
                            "the connection to the new voice server")
        assert (await mention(fake, g.general, g.alice, "the word is apple"))["content"] == SHORT
        session = moved_to.session(g.guild.id)
        assert_heard((await wait_spoken(fake, session, 1))[0])
        assert first.packets == []

        # The voice server closes the connection for good (4021): discord.py gives up, the bot joins again.
        await moved_to.drop(4021)
        await fake.wait_for(lambda: moved_to.session(g.guild.id) is not session and moved_to.session(g.guild.id).mode,
                            30, "a new voice session")
        assert (await mention(fake, g.general, g.alice, "the word is apple"))["content"] == SHORT
        assert_heard((await wait_spoken(fake, moved_to.session(g.guild.id), 1))[0])
        assert fake.voice_channel_of(g.guild, fake.bot_user) == g.lounge.id
        assert frames_logged(caplog, "failed") == []

        # A moderator disconnects the bot: it stays out.
        sessions = len(moved_to.sessions)
        fake.user_leaves_voice(g.guild, fake.bot_user)
        await fake.wait_for(lambda: "disconnected by Discord" in caplog.text, 15, "the bot to give up its voice")
        answer = await command(fake, g.general, g.alice, "leave")
        assert answer == {"content": "I'm not in a voice channel here.", "ephemeral": True}
        assert len(moved_to.sessions) == sessions and fake.voice_channel_of(g.guild, fake.bot_user) is None

        # Nobody left in the channel: the bot leaves after voice.idle_leave_s.
        assert (await command(fake, g.general, g.alice, "join"))["content"].startswith("Joined")
        fake.user_leaves_voice(g.guild, g.alice)
        await fake.wait_for(lambda: "(nobody was in the channel for 1 s)" in caplog.text, 15, "the bot to leave")
        await fake.wait_for(lambda: fake.voice_channel_of(g.guild, fake.bot_user) is None, 15, "Discord to see it")


@pytest.mark.timeout(120)
async def test_speaks_while_the_model_still_writes_and_drops_a_reply_that_fails(
        tmp_path, speaker_model_dir, voices, fake, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    g = add_guild(fake)
    async with ScriptedModel() as model:
        config = voice_config(tmp_path, speaker_model_dir, voices, fake, [g])
        config.generator.request_timeout_s = 3
        config.personas["scripted"] = PersonaConfig.model_validate(dict(model.persona(), voice="ada"))
        config.service.default_persona = "scripted"
        async with speaking(config, fake):
            fake.user_joins_voice(g.lounge, g.alice)
            assert (await command(fake, g.general, g.alice, "join"))["content"].startswith("Joined")
            session = fake.voice_server.session(g.guild.id)

            said = await fake.user_says(g.general, g.alice, f"{fake.bot_user.mention} tell me about the river")
            await model.request(0)
            model.say(0, "The river is wide and calm today. ", "The fo")
            # The first sentence is heard while the model is still writing the second.
            await fake.wait_for(lambda: len(session.audio()) >= 10, 30, "the first sentence to play")
            assert not [m for m in fake.bot_messages(g.general) if int(m["id"]) > int(said["id"])]  # no text yet
            model.say(0, "rest is dark.")
            model.end(0)
            reply = await fake.wait_for_message(g.general, after=said, timeout=30)
            assert reply["content"] == "The river is wide and calm today. The forest is dark."
            [spoken] = await wait_spoken(fake, session, 1)
            assert len(spoken) == (await logged(fake, caplog, 1))[0]

            # The model stops half-way and the reply times out: the text says so, voice drops the rest,
            # and the next reply is spoken as usual.
            said = await fake.user_says(g.general, g.alice, f"{fake.bot_user.mention} and the castle?")
            await model.request(1)
            model.say(1, "The castle is old and grey, they say. ", "And the")
            failed = await fake.wait_for_message(g.general, after=said, timeout=30)
            assert failed["content"] == TIMED_OUT
            await fake.wait_for(lambda: "outcome=failed" in caplog.text, 30, "the dropped reply's log line")
            model.end(1)  # the model server lets go of the abandoned request too
            said = await fake.user_says(g.general, g.alice, f"{fake.bot_user.mention} one more")
            await model.request(2)
            model.say(2, "Here is one more.")
            model.end(2)
            assert (await fake.wait_for_message(g.general, after=said, timeout=30))["content"] == "Here is one more."
            await logged(fake, caplog, 2)


@pytest.mark.timeout(120)
async def test_voice_failures_never_break_the_text_reply(tmp_path, speaker_model_dir, voices, fake, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    config = voice_config(tmp_path, speaker_model_dir, voices, fake, [g], max_queue=1)
    async with speaking(config, fake) as adapter:
        fake.user_joins_voice(g.lounge, g.alice)
        assert (await command(fake, g.general, g.alice, "join"))["content"].startswith("Joined")
        # The queue is full (max_queue 1, and the first reply takes seconds to say): text only, and why.
        first = await mention(fake, g.general, g.alice, "tell me more")
        busy = await mention(fake, g.general, g.bob, "the word is apple")
        assert (first["content"], busy["content"]) == (LONG, BUSY)
        assert (await fake.wait_for_message(g.general, after=busy))["content"] == SHORT
        await wait_spoken(fake, fake.voice_server.session(g.guild.id), 1)
        metric = adapter.service.metrics.registry.get_sample_value
        assert metric("ttt_voice_replies_total", {"adapter": "discord", "outcome": "busy"}) == 1
        # The voice's clips are damaged: its state must be computed again, and that fails.
        voice_dir = voices / "ada"
        saved = {p: p.read_bytes() for p in voice_dir.glob("*.wav")}
        try:
            for path in saved:
                path.write_bytes(b"not audio any more")
            assert (await mention(fake, g.general, g.alice, "tell me more"))["content"] == LONG
            await fake.wait_for(lambda: "outcome=failed" in caplog.text, 30, "the failed reply's log line")
        finally:
            for path, data in saved.items():
                path.write_bytes(data)
        session = fake.voice_server.session(g.guild.id)
        assert len(spoken(session)) == 1  # the first reply only

        # The voice server disappears: text replies keep coming.
        await fake.voice_server.stop()
        assert (await mention(fake, g.general, g.alice, "the word is apple"))["content"] == SHORT
        assert adapter.client.is_ready()


@pytest.mark.timeout(120)
async def test_two_guilds_speak_at_once(tmp_path, speaker_model_dir, voices, fake):
    one, two = add_guild(fake, "One"), add_guild(fake, "Two")
    config = voice_config(tmp_path, speaker_model_dir, voices, fake, [one, two])
    async with speaking(config, fake):
        for g in (one, two):
            fake.user_joins_voice(g.lounge, g.alice)
            assert (await command(fake, g.general, g.alice, "join"))["content"].startswith("Joined")
        for g in (one, two):
            await fake.user_says(g.general, g.alice, f"{fake.bot_user.mention} tell me more")
        heard = []
        for g in (one, two):
            [reply] = await wait_spoken(fake, fake.voice_server.session(g.guild.id), 1)
            assert_heard(reply)
            heard.append((reply[0].received_at, reply[-1].received_at))
        (start_one, end_one), (start_two, end_two) = heard
        assert max(start_one, start_two) < min(end_one, end_two)  # both guilds were spoken to at the same time
