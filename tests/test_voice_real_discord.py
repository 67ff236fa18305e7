"""A spoken conversation with the real speech models, end to end: unmodified discord.py against the fake
Discord and its fake voice server. People speak with espeak-ng (or the Piper voice) into the voice
channel; the bundled Whisper tiny.en hears them, Smart Turn judges their pauses; a tiny chat model
answers; the bundled Piper voice speaks the answer, and what the fake voice server decoded of it is
heard back by Whisper."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from test_voice_discord import add_guild, command, discord_with_voice, frames_logged, speaking, voice_config, wait_spoken
from test_voice_listen_discord import MIC, answer_to, metric
from tiny import train_reply_model
from voice_real import espeak_says, hear, mono16, piper_says, silence, stereo48, wer

ASKED = "Tell me a short story about a dragon."
PAUSED = ("I was thinking about going to the park,", "and then having lunch there.")
INTERRUPTION = "Please stop, I have a question for you."
ANSWER = "I like walking in the park on sunny days. Would you like to come with me tomorrow?"


@pytest.fixture(scope="module")
def answering_model_dir(tmp_path_factory):
    """A tiny chat model that answers ANSWER to whatever it is told (as Whisper writes it, or otherwise)."""
    told = [ASKED, " ".join(PAUSED), INTERRUPTION, "Stop talking.", "What is the capital on France?", "Hello there!",
            "I was thinking about going to the park and then having lunch there.", "tell me more", "Yes, why not?"]
    return train_reply_model(tmp_path_factory.mktemp("models") / "answers", [[(text, ANSWER)] for text in told])


@pytest.fixture(scope="module")
def said(real_voice) -> dict[str, bytes]:
    """What the fake people say, as Discord carries it: espeak-ng's voice, and the paused sentence in
    the Piper voice (Smart Turn is trained on human speech: it hears espeak-ng's flat "park," as an end)."""
    first, second = (piper_says(real_voice, part, lively=False) for part in PAUSED)
    return {
        ASKED: stereo48(espeak_says(ASKED)),
        "paused": stereo48(np.concatenate([first, silence(0.6), second])),
        # Backchannels, each followed by a second of silence (as a listener says one, then listens again).
        "mhm": stereo48(np.concatenate([espeak_says("[[m'hm]]", speed=170), silence(1)])),  # a hum: espeak-ng
        "yeah": stereo48(np.concatenate([espeak_says("yeah", speed=200), silence(1)])),  # spells "mhm" out
        "okay": stereo48(np.concatenate([espeak_says("okay", speed=240), silence(1)])),
        INTERRUPTION: stereo48(espeak_says(INTERRUPTION)),
        "stop talking": stereo48(espeak_says("stop talking", speed=180)),
    }


@pytest.fixture
async def fake():
    async with discord_with_voice() as fake:
        yield fake


def real_voice_config(tmp_path, model_dir, fake, g, **listen):
    """Piper speaks, faster-whisper with the bundled tiny.en hears, Smart Turn ends turns (the defaults)."""
    return voice_config(tmp_path, model_dir, tmp_path / "voices", fake, [g], engine="piper", model=None,
                        listen={"enabled": True, "min_speech_ms": 250, **listen})


def transcript_lines(fake, channel) -> list[str]:
    return [m["content"] for m in fake.bot_messages(channel) if m["content"].startswith(MIC)]


async def spoken_line(fake, channel, name: str, after: dict | None = None) -> dict:
    return await fake.wait_for_message(channel, lambda m: m["content"].startswith(f"{MIC} {name}: "), after=after,
                                       timeout=60)


@pytest.mark.timeout(240)
async def test_people_are_heard_the_bot_is_understood_pauses_and_backchannels_do_not_cut_in(
        tmp_path, answering_model_dir, real_voice, real_ear, smart_turn, fake, said, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    caplog.set_level(logging.INFO, logger="bots")
    g = add_guild(fake)
    async with speaking(real_voice_config(tmp_path, answering_model_dir, fake, g), fake) as adapter:
        for user in (g.alice, g.bob):
            fake.user_joins_voice(g.lounge, user)
        assert "I'm listening too" in (await command(fake, g.general, g.alice, "join"))["content"]
        server, guild = fake.voice_server, g.guild.id
        session = server.session(guild)

        # Alice asks (espeak-ng): her words are posted as Whisper heard them, and answered in text and aloud.
        await server.speak(guild, g.alice.id, said[ASKED])
        line = await spoken_line(fake, g.general, g.alice.name)
        assert wer(ASKED, line["content"].split(": ", 1)[1]) <= 0.2, line["content"]
        answer = (await answer_to(fake, g.general, line))["content"]
        assert answer == ANSWER
        [reply] = await wait_spoken(fake, session, 1)
        heard = hear(real_ear, mono16(b"".join(packet.pcm for packet in reply)))
        assert wer(answer, heard) <= 0.2, heard  # what the voice channel carried is the answer's text
        assert "ended_by=smart-turn" in caplog.text  # a complete question: no waiting for 800 ms of silence

        # Bob pauses 600 ms after "park,": one turn, both halves in it.
        await server.speak(guild, g.bob.id, said["paused"])
        line = await spoken_line(fake, g.general, g.bob.name, after=line)
        assert wer(" ".join(PAUSED), line["content"].split(": ", 1)[1]) <= 0.2, line["content"]
        assert (await answer_to(fake, g.general, line))["content"] == ANSWER

        # While that answer is said, Alice hums, says "yeah" and "okay": it goes on, and none of it is a turn.
        await fake.wait_for(lambda: len(session.audio()) > len(reply) + 25, 30, "the second answer to play")
        for sound in ("mhm", "yeah", "okay"):
            await server.speak(guild, g.alice.id, said[sound])
        await fake.wait_for(lambda: metric(adapter, "ttt_voice_turns_total", outcome="backchannel") >= 2, 30,
                            "the backchannels to be heard")
        second = (await wait_spoken(fake, session, 2))[1]
        assert frames_logged(caplog, "skipped") == [] and "takes the turn" not in caplog.text
        assert wer(ANSWER, hear(real_ear, mono16(b"".join(packet.pcm for packet in second)))) <= 0.2
        assert len(transcript_lines(fake, g.general)) == 2

        # Bob takes the turn with a whole sentence over the third answer: the bot stops at once, and answers him.
        await server.speak(guild, g.alice.id, said[ASKED])
        line = await spoken_line(fake, g.general, g.alice.name, after=line)
        await fake.wait_for(lambda: len(session.audio()) > len(reply) + len(second) + 25, 30, "the third answer")
        await server.speak(guild, g.bob.id, said[INTERRUPTION])
        line = await spoken_line(fake, g.general, g.bob.name, after=line)
        assert wer(INTERRUPTION, line["content"].split(": ", 1)[1]) <= 0.2, line["content"]
        await fake.wait_for(lambda: frames_logged(caplog, "skipped"), 10, "the stopped reply's log line")
        assert "takes the turn in guild-" in caplog.text and "(by speech)" in caplog.text
        await answer_to(fake, g.general, line)
        await wait_spoken(fake, session, 4)


@pytest.mark.timeout(120)
async def test_two_words_over_the_bot_take_the_turn_once_transcribed(
        tmp_path, answering_model_dir, real_voice, real_ear, smart_turn, fake, said, caplog):
    caplog.set_level(logging.INFO, logger="voice")
    g = add_guild(fake)
    config = real_voice_config(tmp_path, answering_model_dir, fake, g, barge_in_min_ms=5000)  # never by length
    async with speaking(config, fake):
        for user in (g.alice, g.bob):
            fake.user_joins_voice(g.lounge, user)
        await command(fake, g.general, g.alice, "join")
        server, guild = fake.voice_server, g.guild.id
        session = server.session(guild)
        await server.speak(guild, g.alice.id, said[ASKED])
        await fake.wait_for(lambda: len(session.audio()) > 25, 60, "the answer to play")
        await server.speak(guild, g.bob.id, said["stop talking"])
        line = await spoken_line(fake, g.general, g.bob.name)
        bob_heard_at = asyncio.get_running_loop().time()
        assert wer("stop talking", line["content"].split(": ", 1)[1]) <= 0.2, line["content"]
        interrupted = (await wait_spoken(fake, session, 1))[0]
        assert interrupted[-1].received_at < bob_heard_at  # stopped once his words were heard, not at its end
        await fake.wait_for(lambda: frames_logged(caplog, "skipped"), 10, "the stopped reply's log line")
        assert "(by words)" in caplog.text
