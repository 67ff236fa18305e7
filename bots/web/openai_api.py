"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`, one model per persona.

The API is stateless: each request carries the whole conversation, nothing is stored. System
(or developer) messages replace the persona's system prompt; without one the persona's applies.
Decoding parameters override the persona's within the configured limits: temperature 0 means
greedy, `stop` adds to the persona's stop strings, `max_tokens` above `web.max_tokens_limit` is
refused. Replies go through the ChatService like every other adapter's (the shared generator,
the same safety screen, metrics and logs); a stream shows only text that passed the screen.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web
from pydantic import ValidationError

from bots.web.errors import ApiError, bad_request, chat_error, read_json, unknown_model
from core.config.schema import Config, Decoding
from core.conversation import Turn
from core.personas import Persona
from core.errors import ChatError, InputRejected
from core.replies import ReplyUpdate, relay
from core.service import ChatService

log = logging.getLogger(__name__)

ADAPTER = "openai"
OWNER = "talk-to-transformers"


@dataclass(frozen=True)
class ChatRequest:
    persona: Persona
    turns: list[Turn]
    system_prompt: str
    decoding: Decoding
    stream: bool
    include_usage: bool


def parse_chat_request(body: object, service: ChatService, config: Config) -> ChatRequest:
    """Validate a chat completion request; raise ApiError (4xx) on anything out of bounds."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required: a persona name (GET /v1/models lists them).", param="model")
    if model not in service.personas.personas:
        raise unknown_model(model, service.personas.names)
    persona = service.personas.get(model)
    system_prompts, turns = _conversation(body.get("messages"), persona, service, config.web.max_messages)
    system = "\n\n".join(system_prompts) if system_prompts else persona.config.system_prompt
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Only n=1 is supported.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    decoding = _decoding(body, persona.config.decoding, config.web.max_tokens_limit)
    # Same window as chat conversations: the newest turns only.
    return ChatRequest(persona, turns[-config.conversation.max_turns:], system, decoding, stream, include_usage)


def _conversation(
    messages: object, persona: Persona, service: ChatService, max_messages: int
) -> tuple[list[str], list[Turn]]:
    max_chars = service.config.service.max_input_chars
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > max_messages:
        raise bad_request(f"`messages` holds {len(messages)} messages; the limit is {max_messages}.",
                          param="messages", code="too_many_messages")
    systems: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with `role` and `content`.", param=param)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{param}.role {role!r} is not supported: use system, user or assistant.",
                              param=f"{param}.role")
        text = _text(message.get("content"), f"{param}.content").strip()
        if not text:
            raise bad_request(f"{param}.content is empty.", param=f"{param}.content", code="empty_message")
        if len(text) > max_chars:
            raise bad_request(
                f"{param}.content is {len(text)} characters long; the limit is {max_chars}.",
                param=f"{param}.content", code="message_too_long",
            )
        _readable(service, text, f"{param}.content")
        if role in ("system", "developer"):
            systems.append(text)
        elif role == "user":
            name = message.get("name")
            # The model reads names when several people talk: they must be readable text too.
            author = _readable(service, name, f"{param}.name") if isinstance(name, str) and name.strip() else "user"
            turns.append(Turn("user", author, text))
        else:
            turns.append(Turn("bot", persona.name, text, persona=persona.name))
    if not turns or turns[-1].role != "user":
        raise bad_request("The last message (other than system ones) must be from the user.", param="messages")
    return systems, turns


def _readable(service: ChatService, text: str, param: str) -> str:
    """`text` as the service takes it; a 400 naming `param` when it is not readable text."""
    try:
        return service.validate(text).text
    except InputRejected as exc:
        raise bad_request(exc.user_message, param=param, code="invalid_text") from None


def _text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}: only text content parts are supported.", param=param)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{param} must be a string or a list of text parts.", param=param)


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number from {low} to {high}; got {value!r}.", param=name)
    return float(value)


def _decoding(body: dict, base: Decoding, max_tokens_limit: int) -> Decoding:
    update: dict = {}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(name)
    if asked is None:
        update["max_new_tokens"] = min(base.max_new_tokens, max_tokens_limit)
    elif isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
        raise bad_request(f"`{name}` must be a positive integer; got {asked!r}.", param=name)
    elif asked > max_tokens_limit:
        raise bad_request(
            f"`{name}` is {asked}; this server allows at most {max_tokens_limit}.", param=name,
            code="max_tokens_exceeded",
        )
    else:
        update["max_new_tokens"] = asked
    temperature = _number(body, "temperature", 0, 2)
    if temperature == 0:
        update["do_sample"] = False
    elif temperature is not None:
        update.update(do_sample=True, temperature=temperature)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        update["do_sample"] = False
    elif top_p is not None:
        update["top_p"] = top_p
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("`stop` must be a string or a list of up to 4 non-empty strings.", param="stop")
        update["stop"] = list(dict.fromkeys(base.stop + stop))
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request(f"`seed` must be an integer; got {seed!r}.", param="seed")
        update["seed"] = seed
    try:  # every value validated where it enters (a seed of 10**30 is a 400, not a failed generation)
        return Decoding.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = {"max_new_tokens": "max_tokens"}.get(str(error["loc"][0]), str(error["loc"][0]))
        raise bad_request(f"`{name}`: {error['msg']}; got {error.get('input')!r}.", param=name) from None


def _finish_reason(final: ReplyUpdate) -> str:
    if final.cut or final.replaced:
        return "content_filter"
    return "length" if final.stats.finish_reason == "length" else "stop"


class OpenAIRoutes:
    """Handlers of the OpenAI-compatible API on one ChatService."""

    def __init__(self, service: ChatService, config: Config):
        self.service = service
        self.config = config

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat_completions)

    def _model(self, persona: Persona) -> dict:
        return {"id": persona.name, "object": "model", "created": 0, "owned_by": OWNER,
                "description": persona.description}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model(p) for p in self.service.persona_list()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.service.personas.personas:
            raise unknown_model(name, self.service.personas.names)
        return web.json_response(self._model(self.service.personas.get(name)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        label = "?"
        try:
            body = await read_json(request)
            if isinstance(body, dict) and body.get("model") in self.service.personas.personas:
                label = body["model"]
            chat = parse_chat_request(body, self.service, self.config)
        except ApiError as exc:
            self.service.record_refusal(ADAPTER, label, exc.outcome)
            raise
        # A stream cannot take text back: it gets only screened text, and a reply cut short if need be.
        updates = self.service.complete(chat.persona, chat.turns, adapter=ADAPTER, system_prompt=chat.system_prompt,
                                        decoding=chat.decoding, retractable=not chat.stream)
        try:
            # Refusals (busy, too long, persona unavailable) come before anything is sent: a proper status.
            first = await anext(updates)
        except ChatError as exc:
            raise chat_error(exc, param="messages") from None
        if chat.stream:
            return await self._stream(request, chat, first, updates)
        final = first
        while not final.final:
            try:
                final = await anext(updates)
            except ChatError as exc:
                raise chat_error(exc, param="messages") from None
        message = {"role": "assistant", "content": final.text}
        return web.json_response({
            **_envelope("chat.completion", chat.persona.name),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(final)}],
            "usage": _usage(final.stats),
        })

    async def _stream(self, request: web.Request, chat: ChatRequest, first: ReplyUpdate,
                      updates: AsyncIterator[ReplyUpdate]) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        envelope = _envelope("chat.completion.chunk", chat.persona.name)
        extra = {"usage": None} if chat.include_usage else {}

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**envelope, "choices": [choice], **extra}

        sent = ""

        async def show(update: ReplyUpdate) -> None:
            nonlocal sent
            if update.text.startswith(sent) and len(update.text) > len(sent):  # a stream cannot take text back
                await send(chunk({"content": update.text[len(sent):]}))
                sent = update.text

        try:
            await send(chunk({"role": "assistant", "content": ""}))
            final = await relay(updates, show, first=first, where=ADAPTER)  # a reset connection stops generating
            await send(chunk({}, _finish_reason(final)))
            if chat.include_usage:
                await send({**envelope, "choices": [], "usage": _usage(final.stats)})
            await send("[DONE]")
        except ConnectionResetError:
            return response
        except ChatError as exc:
            try:
                await send(chat_error(exc).body())
            except ConnectionResetError:
                pass
            return response
        await response.write_eof()
        return response


def _envelope(kind: str, model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None}


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}  # reused from the prefix cache
