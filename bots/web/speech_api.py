"""OpenAI-compatible text to speech: `POST /v1/audio/speech`, and `GET /v1/audio/voices`.

`model` is a persona's name (its voice speaks, unless `voice` names another registered voice) or
`tts` (then `voice` must name a registered voice, else the engine's default voice speaks). Only
registered voices are used: nobody can clone a voice through this API. The audio streams as it is
synthesized, sentence by sentence: `wav` (24 kHz mono 16-bit, a WAV header whose sizes are left
open) or `pcm` (the same samples without a header, as OpenAI's API sends them). Under /v1/, so the
web app's API-key rule applies as for /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from aiohttp import web

from bots.web.errors import ApiError, bad_request, read_json, unavailable, unknown_model
from core.config.schema import Config
from core.replies import ReplyUpdate
from core.service import ChatService
from voice.speak.registry import VoiceError
from voice.speak.reply import SpokenReply
from voice.speak.speech import Speech
from voice.speak.tts import VoiceUnavailable
from voice.speak.worker import VoiceBusy

log = logging.getLogger(__name__)

ADAPTER = "speech"
ANY_PERSONA = "tts"
RATE = 24_000  # what OpenAI's API sends: 24 kHz, 16-bit, mono
MAX_INPUT_CHARS = 4096
FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}


class SpeechRoutes:
    """Handlers of the speech API on one ChatService (the web app adds them when voice is enabled)."""

    def __init__(self, service: ChatService, config: Config):
        self.service = service
        self.config = config
        self.speech = Speech(config.voice, service.metrics)
        self._loading: asyncio.Task | None = None

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/speech", self.synthesize)
        app.router.add_get("/v1/audio/voices", self.voices)
        app.on_startup.append(self._preload)
        app.on_cleanup.append(self._close)

    async def _preload(self, app: web.Application) -> None:
        """Load the speech engine in the background: the first request need not wait for it."""

        async def load() -> None:
            try:
                await self.speech.start()
            except VoiceUnavailable as exc:
                log.error("speech: the speech engine is unavailable: %s", exc)

        self._loading = asyncio.create_task(load())

    async def _close(self, app: web.Application) -> None:
        if self._loading is not None:
            self._loading.cancel()
        await self.speech.close()

    async def voices(self, request: web.Request) -> web.Response:
        names = await asyncio.to_thread(self.speech.registry.names)
        personas = {}
        for persona in self.service.persona_list():
            if persona.config.voice:
                personas.setdefault(persona.config.voice, []).append(persona.name)
        data = [{"id": name, "object": "voice", "personas": personas.get(name, [])} for name in names]
        return web.json_response({"object": "list", "engine": self.config.voice.engine, "data": data})

    async def synthesize(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        text, voice, fmt = await self._parse(body)
        try:
            await self.speech.start()
            reply = self.speech.reply(voice, adapter=ADAPTER, label=f"speech model={body['model']}",
                                       rate=RATE, channels=1, frame_ms=None)
        except VoiceBusy:
            self.service.metrics.voice_replies.labels(ADAPTER, "busy").inc()
            raise ApiError(503, "Too many replies are being spoken right now; try again in a moment.",
                           type="server_error", code="busy", outcome="busy") from None
        except VoiceUnavailable as exc:
            raise unavailable(f"Speech is unavailable: {exc}") from None
        outcome = "failed"
        try:
            await reply.on_update(ReplyUpdate(text, final=True))
            await reply.ready.wait()
            if reply.error is not None and not reply.output.bytes_written:
                if isinstance(reply.error, VoiceUnavailable):  # no default voice, say: retrying will not help
                    raise unavailable(f"Speech is unavailable: {reply.error}")
                log.warning("speech: synthesis failed: %s", reply.error)
                raise ApiError(500, "Speech synthesis failed; try again.", type="server_error")
            response, outcome = await self._stream(request, reply, fmt)
            return response
        except asyncio.CancelledError:  # the client went away
            reply.cancel()
            outcome = "dropped"
            raise
        finally:
            reply.finish(outcome)

    async def _parse(self, body: object) -> tuple[str, str | None, str]:
        """(text, voice name or None for the engine's default, format); raises ApiError (4xx)."""
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.", code="invalid_json")
        model = body.get("model")
        personas = self.service.personas
        if not isinstance(model, str) or not model:
            raise bad_request(f"`model` is required: a persona name or {ANY_PERSONA!r}.", param="model")
        if model != ANY_PERSONA and model not in personas.personas:
            raise unknown_model(model, [*personas.names, ANY_PERSONA])
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("`input` must be a non-empty string: the text to speak.", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise bad_request(f"`input` is {len(text)} characters long; the limit is {MAX_INPUT_CHARS}.",
                              param="input", code="string_above_max_length")
        fmt = body.get("response_format", "wav")
        if fmt not in FORMATS:
            raise bad_request(f"response_format {fmt!r} is not supported: use wav or pcm.", param="response_format")
        if body.get("speed", 1.0) != 1.0:
            raise bad_request("Only speed 1.0 is supported.", param="speed")
        if body.get("stream_format", "audio") != "audio":
            raise bad_request("Only stream_format 'audio' is supported.", param="stream_format")
        voice = body.get("voice")
        if voice is not None and not isinstance(voice, str):
            raise bad_request("`voice` must be the name of a registered voice.", param="voice")
        if voice is None and model != ANY_PERSONA:
            voice = personas.get(model).config.voice
        if voice is not None:
            try:
                await asyncio.to_thread(self.speech.registry.get, voice)
            except VoiceError as exc:
                raise bad_request(str(exc).replace("`ttt voice add`", "ttt voice add"), param="voice",
                                  code="voice_not_found") from None
        elif self.config.voice.require_registered:
            raise bad_request(f"{model!r} has no registered voice: name one in `voice`.", param="voice")
        return text, voice, fmt

    async def _stream(self, request: web.Request, reply: SpokenReply, fmt: str) -> tuple[web.StreamResponse, str]:
        """Send the audio as it is synthesized; the response and the outcome for the reply's log line."""
        response = web.StreamResponse(headers={"Content-Type": FORMATS[fmt]})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if fmt == "wav":
                await response.write(streaming_wav_header(RATE))
            while (piece := await asyncio.to_thread(reply.output.read, 0.25)) != b"":
                if piece:  # None: the next sentence is not ready yet
                    await response.write(piece)
            await response.write_eof()
        except ConnectionError:
            reply.cancel()
            return response, "dropped"
        return response, "spoken" if reply.error is None else "failed"


def streaming_wav_header(rate: int, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header for audio of unknown length (sizes at their maximum, as streaming
    servers send it; decoders read until the data ends)."""
    block = channels * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF - 36))
