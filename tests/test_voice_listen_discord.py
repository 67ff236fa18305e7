"""Spoken conversation end to end: unmodified discord.py (with discord-ext-voice-recv and the DAVE
shim) against the fake Discord and its fake voice server with DAVE on. Fake people speak espeak-ng
phrases as encrypted Opus at real-time pace; the tiny Whisper trained on those phrases transcribes
them; the tiny chat model answers; the tiny pocket-tts speaks the answer, end-to-end encrypted too."""

from __future__ import annotations

import asyncio
import logging
import re

import numpy as np
import pytest
import soxr

from core.conversation import ConversationKey
from fakes.discord_models import P
from test_voice_discord import (LONG, SHORT, add_guild, discord_with_voice, assert_heard, command, frames_logged,  # noqa: F401
                                logged, speaker_model_dir, speaking, voice_config, voices, wait_spoken)
from voice_tiny import PHRASES, spoken_phrase, tiny_whisper_dir

APPLE, MORE = PHRASES  # "the word is apple" -> SHORT, "tell me more" -> LONG
MIC = "\N{STUDIO MICROPHONE}\N{VARIATION SELECTOR-16}"


@pytest.fixture(scope="module")
def said() -> dict[str, bytes]:
    """Each phrase as a fake person says it: 48 kHz stereo s16le, without espeak's trailing silence."""
    out = {}
    for text in PHRASES:
        audio = spoken_phrase(text, speed=160, pitch=45)
        audio = soxr.resample(audio[:np.flatnonzero(np.abs(audio) > 0.01)[-1] + 1], 16_000, 48_000)
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        out[text] = np.repeat(pcm[:, None], 2, axis=1).tobytes()
    return out


@pytest.fixture
async def fake():
    async with discord_with_voice(dave=True, in_voice=True) as fake:
        yield fake


def listening_config(tmp_path, model_dir, voices, fake, g, **listen):
    return voice_config(tmp_path, model_dir, voices, fake, [g], listen={
        "enabled": True, "engine": "transformers", "model": str(tiny_whisper_dir()), "silence_ms": 500,
        "min_speech_ms": 250, **listen})


async def heard_line(fake, channel, name: str, text: str, after: dict | None = None) -> dict:
    """The transcript line the bot posts for a spoken turn (after the message `after`)."""
    return await fake.wait_for_message(channel, lambda m: m["content"] == f"{MIC} {name}: {text}", after=after,
                                       timeout=60)


async def answer_to(fake, channel, line: dict) -> dict:
    """The bot's text answer to a transcript line (a reply to it)."""
    return await fake.wait_for_message(
        channel, lambda m: (m.get("message_reference") or {}).get("message_id") == line["id"], timeout=60)


def metric(running, name: str, **labels) -> float:
    return running.service.metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.mark.timeout(240)
async def test_a_spoken_turn_is_transcribed_answered_aloud_and_shown_two_people_in_turn(
        tmp_path, speaker_model_dir, voices, fake, said, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    async with speaking(listening_config(tmp_path, speaker_model_dir, voices, fake, g), fake) as adapter:
        assert {"listen"} <= {c["name"] for c in fake.guild_commands[g.guild.id]}
        for user in (g.alice, g.bob):
            fake.user_joins_voice(g.lounge, user)
        answer = await command(fake, g.general, g.alice, "join")
        assert "I'm listening too" in answer["content"] and "/listen ignore-me" in answer["content"]
        session = fake.voice_server.session(g.guild.id)
        assert not fake.guilds[g.guild.id].voice_states[fake.bot_user.id].self_deaf  # a listening bot hears

        # Alice speaks (some packets carry RTP padding), then falls silent: one turn, answered in text and aloud.
        await fake.voice_server.speak(g.guild.id, g.alice.id, said[APPLE], padded_every=7)
        line = await heard_line(fake, g.general, g.alice.name, APPLE)
        assert (await answer_to(fake, g.general, line))["content"] == SHORT
        [reply] = await wait_spoken(fake, session, 1)
        assert_heard(reply)  # the bot's DAVE-encrypted audio, decrypted by Alice's own session
        assert session.undecryptable == 0 and session.transitions == [1]  # Alice joined the MLS group

        # Bob speaks next: his own turn, in his name.
        await fake.voice_server.speak(g.guild.id, g.bob.id, said[MORE])
        line = await heard_line(fake, g.general, g.bob.name, MORE, after=line)
        assert (await answer_to(fake, g.general, line))["content"] == LONG
        assert_heard((await wait_spoken(fake, session, 2))[1])

        # Stored like typed turns, by the people who spoke them (forget-me finds them by their ids).
        turns = await adapter.service.store.recent_turns(ConversationKey("discord", str(g.general.id)), 10)
        assert [(t.role, t.author, t.text, t.author_id) for t in turns] == [
            ("user", g.alice.name, APPLE, str(g.alice.id)), ("bot", "words", SHORT, None),
            ("user", g.bob.name, MORE, str(g.bob.id)), ("bot", "words", LONG, None)]
        assert metric(adapter, "ttt_voice_turns_total", outcome="answered") == 2
        assert metric(adapter, "ttt_requests_total", adapter="discord-voice", persona="words", outcome="ok") == 2
        await fake.wait_for(lambda: metric(adapter, "ttt_voice_turn_to_first_audio_seconds_count") == 2, 30,
                            "the spoken answers' log lines")
        assert "turn_to_first_audio=" in caplog.text


def turn_audio_logged(caplog) -> list[float]:
    """The audio seconds of each spoken turn, from its log line."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listen: turn ")]
    return [float(re.search(r" audio=([\d.]+)s", line).group(1)) for line in lines]


@pytest.mark.timeout(240)
async def test_the_first_words_are_heard_when_speaking_comes_after_the_first_packets(
        tmp_path, speaker_model_dir, voices, fake, said, caplog):
    """Discord can send a person's first packets before the SPEAKING event that says whose they are;
    with speech from the very first frame, those frames are held and heard, not lost."""
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    phrase = said[APPLE]
    samples = np.frombuffer(phrase, dtype="<i2")
    start = np.flatnonzero(np.abs(samples) > 300)[0] // 2 * 4  # the first sample that is heard, as a byte offset
    phrase = phrase[start:]  # speech from the first 20 ms frame on
    async with speaking(listening_config(tmp_path, speaker_model_dir, voices, fake, g), fake):
        fake.user_joins_voice(g.lounge, g.alice)
        await command(fake, g.general, g.alice, "join")
        await fake.voice_server.speak(g.guild.id, g.alice.id, phrase, speaking_after=15)  # 300 ms unattributed
        await heard_line(fake, g.general, g.alice.name, APPLE)
        [audio] = await fake.wait_for(lambda: turn_audio_logged(caplog), 30, "the turn's log line")
    # Every frame reached the turn: the whole phrase (and a little trailing silence), not 300 ms less.
    assert audio >= len(phrase) / (48_000 * 4) - 0.05, audio


@pytest.fixture
async def plain_fake():
    """The fake Discord with a voice server that does not use DAVE (transport encryption only)."""
    async with discord_with_voice() as fake:
        yield fake


async def listen(fake, channel, user, sub: str, **options) -> dict:
    interaction = await fake.invoke_command(channel, user, "listen", options or None, subcommand=sub)
    response = await fake.wait_for_response(interaction, timeout=30)
    return {"content": response["data"]["content"], "ephemeral": response["ephemeral"]}


def heard_lines(fake, channel, after: dict) -> list[str]:
    return [m["content"] for m in fake.bot_messages(channel)
            if int(m["id"]) > int(after["id"]) and m["content"].startswith(MIC)]


@pytest.mark.timeout(240)
async def test_barge_in_and_who_is_not_heard_itself_bots_listening_off_ignore_me_and_people_who_leave(
        tmp_path, speaker_model_dir, voices, plain_fake, said, caplog):
    fake = plain_fake
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    admins = fake.add_role(g.guild, "admins", permissions=P.ADMINISTRATOR)
    fake.add_member(g.guild, g.alice, roles=[admins])
    robot = fake.add_user("robot", bot=True)
    async with speaking(listening_config(tmp_path, speaker_model_dir, voices, fake, g), fake) as adapter:
        for user in (g.alice, g.bob, robot):
            fake.user_joins_voice(g.lounge, user)
        assert "I'm listening too" in (await command(fake, g.general, g.alice, "join"))["content"]
        server, guild = fake.voice_server, g.guild.id
        session = server.session(guild)

        # Barge-in: Bob speaks while the bot says its long answer to Alice; it stops at once and answers him.
        await server.speak(guild, g.alice.id, said[MORE])
        line = await heard_line(fake, g.general, g.alice.name, MORE)
        await fake.wait_for(lambda: len(session.audio()) > 25, 30, "the long answer to start playing")
        await server.speak(guild, g.bob.id, said[APPLE])
        line = await heard_line(fake, g.general, g.bob.name, APPLE, after=line)
        bob_heard_at = asyncio.get_running_loop().time()
        interrupted = (await wait_spoken(fake, session, 1))[0]
        assert interrupted[-1].received_at < bob_heard_at  # it stopped while Bob spoke, not after its 3 sentences
        assert frames_logged(caplog, "skipped") and "takes the turn in guild-" in caplog.text
        assert (await answer_to(fake, g.general, line))["content"] == SHORT
        assert_heard((await wait_spoken(fake, session, 2))[1])
        turns = await adapter.service.store.recent_turns(ConversationKey("discord", str(g.general.id)), 10)
        assert [t.text for t in turns if t.role == "bot"] == [LONG, SHORT]  # the stored turn keeps the reply

        # Its own audio coming back, and another bot talking, are never heard; Alice after them is.
        await server.speak(guild, fake.bot_user.id, said[APPLE], ssrc=session.ssrc)
        await server.speak(guild, robot.id, said[MORE])
        await server.speak(guild, g.alice.id, said[APPLE])
        mark = await heard_line(fake, g.general, g.alice.name, APPLE, after=line)
        assert heard_lines(fake, g.general, line) == [f"{MIC} {g.alice.name}: {APPLE}"]

        # Listening off (admins only): nothing is transcribed until it is on again.
        answer = await listen(fake, g.general, g.bob, "off")
        assert answer == {"content": "Only admins (Manage Server) can switch my listening here.", "ephemeral": True}
        assert (await listen(fake, g.general, g.alice, "off"))["content"].startswith("I've stopped listening")
        transcribed = metric(adapter, "ttt_voice_transcription_seconds_count", engine="transformers")
        await server.speak(guild, g.alice.id, said[MORE])
        assert (await listen(fake, g.general, g.alice, "on"))["content"].startswith("I'm listening again")
        await server.speak(guild, g.bob.id, said[APPLE])
        line = await heard_line(fake, g.general, g.bob.name, APPLE, after=mark)
        assert heard_lines(fake, g.general, mark) == [f"{MIC} {g.bob.name}: {APPLE}"]
        assert metric(adapter, "ttt_voice_transcription_seconds_count", engine="transformers") == transcribed + 1

        # /listen ignore-me: Bob is not heard; Alice still is. Then Bob asks to be heard again.
        answer = await listen(fake, g.general, g.bob, "ignore-me")
        assert answer["ephemeral"] and answer["content"].startswith("I won't listen to you")
        ignored = adapter.service.store.preferences
        assert await ignored("discord:listen-ignore") == {str(g.bob.id): "1"}  # kept: a restart remembers it
        await server.speak(guild, g.bob.id, said[MORE])
        await server.speak(guild, g.alice.id, said[APPLE])
        mark = await heard_line(fake, g.general, g.alice.name, APPLE, after=line)
        assert heard_lines(fake, g.general, line) == [f"{MIC} {g.alice.name}: {APPLE}"]
        assert (await listen(fake, g.general, g.bob, "ignore-me", ignore=False))["content"].startswith("I'll listen")
        assert await ignored("discord:listen-ignore") == {}

        # Alice leaves while she is speaking: what she said is dropped; Bob, after her, is heard.
        alice = session.speakers[g.alice.id]
        sent = alice.sequence
        speech = asyncio.ensure_future(server.speak(guild, g.alice.id, said[MORE]))
        await fake.wait_for(lambda: alice.sequence >= sent + 30, 10, "0.6 s of Alice's speech")
        fake.user_leaves_voice(g.guild, g.alice)
        await server.user_left(guild, g.alice.id)
        await speech
        await server.speak(guild, g.bob.id, said[MORE])
        await heard_line(fake, g.general, g.bob.name, MORE, after=mark)
        assert heard_lines(fake, g.general, mark) == [f"{MIC} {g.bob.name}: {MORE}"]


@pytest.mark.timeout(120)
async def test_with_echo_text_and_barge_in_off_answers_are_only_spoken_and_said_in_full(
        tmp_path, speaker_model_dir, voices, plain_fake, said, caplog):
    fake = plain_fake
    caplog.set_level(logging.INFO, logger="voice")
    g = add_guild(fake)
    config = listening_config(tmp_path, speaker_model_dir, voices, fake, g, echo_text=False, barge_in=False)
    async with speaking(config, fake) as adapter:
        fake.user_joins_voice(g.lounge, g.alice)
        fake.user_joins_voice(g.lounge, g.bob)
        joined = await command(fake, g.general, g.alice, "join")
        session = fake.voice_server.session(g.guild.id)
        await fake.voice_server.speak(g.guild.id, g.alice.id, said[APPLE])
        assert_heard((await wait_spoken(fake, session, 1))[0])
        turns = await adapter.service.store.recent_turns(ConversationKey("discord", str(g.general.id)), 10)
        assert [(t.author, t.text) for t in turns] == [(g.alice.name, APPLE), ("words", SHORT)]
        assert [m["content"] for m in fake.bot_messages(g.general)] == [joined["content"]]  # nothing written

        # Barge-in off: Bob speaking while the long answer plays does not stop it; his answer follows it.
        before = len(session.audio())
        await fake.voice_server.speak(g.guild.id, g.alice.id, said[MORE])
        await fake.wait_for(lambda: len(session.audio()) > before + 25, 30, "the long answer to start playing")
        await fake.voice_server.speak(g.guild.id, g.bob.id, said[APPLE])
        _, long_answer, bobs_answer = await wait_spoken(fake, session, 3)
        assert len(long_answer) == (await logged(fake, caplog, 3))[1]  # every frame of it was played
        assert long_answer[-1].received_at < bobs_answer[0].received_at
        assert frames_logged(caplog, "skipped") == []
