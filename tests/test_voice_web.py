"""`POST /v1/audio/speech` through a real HTTP server and the official `openai` client, and the chat
page's speaker toggle in headless Chromium; the tiny pocket-tts engine speaks in a registered voice."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import openai
import pytest
from selenium.webdriver.common.by import By

from conftest import make_config
from core.config.schema import Config, PersonaConfig
from test_web_api import API_KEY, Server, start_server, stop_server
from test_web_page import ServerThread, browser, messages, ready, send, wait_for  # noqa: F401 - browser: a fixture
from voice_tiny import tiny_pocket_config, voices_dir_with

THREE = "The river is wide. The forest is dark. The castle is old."


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    return voices_dir_with(tmp_path_factory.mktemp("voices"))


def voice_config(tmp_path, word_model_dir, voices, **voice) -> Config:
    voice = {"enabled": True, "model": str(tiny_pocket_config()), "voices_dir": str(voices), **voice}
    config = make_config(tmp_path, word_model_dir, web={"port": 0}, voice=voice)
    config.personas["words"] = PersonaConfig.model_validate(dict(config.personas["words"].model_dump(), voice="ada"))
    return config


@pytest.fixture
async def server(tmp_path, word_model_dir, voices):
    server = await start_server(voice_config(tmp_path, word_model_dir, voices, max_queue=1))
    yield server
    await stop_server(server)


def pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def audible(samples: np.ndarray) -> bool:
    return float(np.sqrt((samples.astype(np.float64) ** 2).mean())) > 50


@pytest.mark.timeout(120)
async def test_speech_api_streams_wav_and_pcm_in_a_registered_voice(server: Server):
    client = server.client()
    async with client.audio.speech.with_streaming_response.create(
            model="words", voice="ada", input=THREE, response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
        wav = b"".join([chunk async for chunk in response.iter_bytes()])
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    channels, rate, _, _, bits = struct.unpack_from("<HIIHH", wav, 22)
    assert (channels, rate, bits) == (1, 24_000, 16) and wav[36:40] == b"data"
    samples = pcm_samples(wav[44:])
    assert audible(samples) and len(samples) / 24_000 > 3 * 0.5  # three sentences, each spoken

    # The persona's own voice by default, raw PCM; model "tts" speaks any registered voice.
    pcm = await (await client.audio.speech.create(model="words", voice=openai.omit, input="Hello there.",
                                                  response_format="pcm")).aread()
    assert len(pcm) % 2 == 0 and audible(pcm_samples(pcm))
    pcm = await (await client.audio.speech.create(model="tts", voice="ada", input="Hi!", response_format="pcm")).aread()
    assert audible(pcm_samples(pcm))
    assert await server.metric("ttt_voice_replies_total", adapter="speech", outcome="spoken") == 3
    assert await server.metric("ttt_voice_time_to_first_audio_seconds_count", adapter="speech") == 3

    async with server.http.get(f"{server.url}/v1/audio/voices") as r:
        assert r.status == 200
        assert await r.json() == {"object": "list", "engine": "pocket",
                                  "data": [{"id": "ada", "object": "voice", "personas": ["words"]}]}


@pytest.mark.timeout(120)
async def test_speech_api_refuses_what_it_cannot_do(server: Server):
    async def speech(body) -> tuple[int, dict]:
        async with server.http.post(f"{server.url}/v1/audio/speech", json=body) as r:
            return r.status, await r.json()

    base = {"model": "words", "input": "Hello.", "voice": "ada"}
    cases = [
        ({**base, "model": "nobody"}, 404, "model", "There is no persona called 'nobody'"),
        ({**base, "voice": "alloy"}, 400, "voice", "no voice called 'alloy' is registered"),
        ({**base, "input": "  "}, 400, "input", "non-empty string"),
        ({**base, "input": "x" * 4097}, 400, "input", "the limit is 4096"),
        ({**base, "response_format": "mp3"}, 400, "response_format", "use wav or pcm"),
        ({**base, "speed": 2}, 400, "speed", "Only speed 1.0"),
        ({**base, "stream_format": "sse"}, 400, "stream_format", "Only stream_format 'audio'"),
        ({"input": "Hello."}, 400, "model", "`model` is required"),
    ]
    for body, status, param, message in cases:
        got_status, got = await speech(body)
        assert (got_status, got["error"]["param"]) == (status, param), (body, got)
        assert message in got["error"]["message"]
    # No voice named: the engine's default voice, which this tiny model cannot fetch offline. Why, not "try again".
    status, got = await speech({"model": "tts", "input": "Hello."})
    assert status == 503 and "default voice" in got["error"]["message"], got

    # One reply at a time (voice.max_queue 1): a second request while the first streams is told to wait.
    async with server.http.post(f"{server.url}/v1/audio/speech", json={**base, "input": THREE * 4}) as r:
        assert r.status == 200
        await r.content.readany()  # the first one is speaking now
        status, body = await speech(base)
        assert status == 503 and body["error"]["code"] == "busy"
        assert len(await r.read()) > 0
    assert await server.metric("ttt_voice_replies_total", adapter="speech", outcome="busy") == 1


@pytest.mark.timeout(120)
async def test_speech_api_needs_the_api_key_and_is_absent_without_voice(tmp_path, word_model_dir, voices):
    server = await start_server(voice_config(tmp_path, word_model_dir, voices), {"TTT_API_KEY": API_KEY})
    try:
        with pytest.raises(openai.AuthenticationError):
            await server.client("wrong-key").audio.speech.create(model="words", voice="ada", input="Hi.")
        pcm = await (await server.client(API_KEY).audio.speech.create(
            model="words", voice="ada", input="Hi.", response_format="pcm")).aread()
        assert audible(pcm_samples(pcm))
    finally:
        await stop_server(server)
    config = make_config(tmp_path / "off", word_model_dir, web={"port": 0})
    server = await start_server(config)
    try:
        with pytest.raises(openai.NotFoundError):
            await server.client().audio.speech.create(model="words", voice="ada", input="Hi.")
    finally:
        await stop_server(server)


@pytest.mark.timeout(120, func_only=True)
def test_chat_page_speaker_toggle_speaks_replies(tmp_path, word_model_dir, voices, browser):  # noqa: F811
    with ServerThread(voice_config(tmp_path, word_model_dir, voices)) as server:
        browser.get(server.url)
        wait_for(browser, ready, "the page to load")
        toggle = browser.find_element(By.ID, "speaker")
        wait_for(browser, lambda d: toggle.is_displayed(), "the speaker toggle")
        assert toggle.get_attribute("aria-pressed") == "false"

        send(browser, "the word is apple")  # voice off: text only
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", "apple!") and ready(d), "the first reply")
        toggle.click()
        assert toggle.get_attribute("aria-pressed") == "true"
        send(browser, "again")
        wait_for(browser, lambda d: messages(d)[-1][0].startswith("bot spoken"), "the reply to be spoken", 60)
        assert messages(browser)[-1][1] == "apple!"
        spoken = float(browser.find_elements(By.CSS_SELECTOR, "#log .message.bot")[-1].get_attribute(
            "data-spoken-seconds"))
        assert spoken > 0.3
        sample = server.service.metrics.registry.get_sample_value
        assert sample("ttt_voice_replies_total", {"adapter": "speech", "outcome": "spoken"}) == 1

        browser.refresh()  # the choice is remembered
        toggle = browser.find_element(By.ID, "speaker")
        wait_for(browser, lambda d: toggle.is_displayed() and ready(d), "the page to reload")
        assert toggle.get_attribute("aria-pressed") == "true"
        toggle.click()
        browser.find_element(By.ID, "reset").click()
        wait_for(browser, lambda d: messages(d) == [("note", "Conversation reset: a fresh start.")] and ready(d),
                 "the reset")
        send(browser, "the word is cloud")
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", "cloud!") and ready(d), "a reply, voice off")
        assert sample("ttt_voice_replies_total", {"adapter": "speech", "outcome": "spoken"}) == 1
