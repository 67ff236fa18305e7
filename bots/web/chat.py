"""The chat page's own API: one ChatService conversation per browser, keyed ("web", conversation id).

    GET  /api/personas                          personas for the picker
    GET  /api/conversations/{id}                the current session's turns and persona
    POST /api/conversations/{id}/messages       {"text"} -> server-sent events: update*, done | error
    POST /api/conversations/{id}/reset          forget the turns
    POST /api/conversations/{id}/forget-me      delete everything this browser wrote, in every conversation
    PUT  /api/conversations/{id}/persona        {"persona"} -> switch

Errors use the same JSON shape as the OpenAI-compatible API.
"""

from __future__ import annotations

import json
import logging
import re

from aiohttp import web

from bots.web.errors import bad_request, chat_error, read_json, unknown_model
from core.config.schema import Config
from core.conversation import ConversationKey, StoreUnavailable
from core.personas import Persona, PersonaUnavailable
from core.replies import ReplyUpdate, relay
from core.errors import MEMORY_UNAVAILABLE, ChatError, MemoryUnavailable
from core.service import ChatService

log = logging.getLogger(__name__)

ADAPTER = "web"
AUTHOR = "user"
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class ChatPageRoutes:
    def __init__(self, service: ChatService, config: Config):
        self.service = service
        self.config = config

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/personas", self.personas)
        app.router.add_get("/api/conversations/{id}", self.history)
        app.router.add_post("/api/conversations/{id}/messages", self.message)
        app.router.add_post("/api/conversations/{id}/reset", self.reset)
        app.router.add_post("/api/conversations/{id}/forget-me", self.forget_me)
        app.router.add_put("/api/conversations/{id}/persona", self.set_persona)

    def _key(self, request: web.Request) -> ConversationKey:
        scope = request.match_info["id"]
        if not CONVERSATION_ID.match(scope):
            raise bad_request("A conversation id is 8 to 64 letters, digits, '-' or '_'.", param="id")
        return ConversationKey(ADAPTER, scope)

    def _describe(self, persona: Persona) -> dict:
        try:
            self.service.personas.check(persona)
            problem = None
        except PersonaUnavailable as exc:
            problem = str(exc)
        return {"name": persona.name, "description": persona.description, "available": problem is None,
                "problem": problem}

    async def personas(self, request: web.Request) -> web.Response:
        return web.json_response({
            "default": self.service.personas.default,
            "personas": [self._describe(p) for p in self.service.persona_list()],
        })

    async def history(self, request: web.Request) -> web.Response:
        key = self._key(request)
        try:
            turns = await self.service.history(key)
            persona = await self.service.persona_for(key)
        except StoreUnavailable:
            raise chat_error(MemoryUnavailable(MEMORY_UNAVAILABLE)) from None
        except ChatError as exc:
            raise chat_error(exc) from None
        return web.json_response({
            "conversation": key.scope,
            "persona": self._describe(persona),
            "turns": [{"role": t.role, "text": t.text, "time": t.time, "persona": t.persona} for t in turns],
        })

    async def message(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        body = await read_json(request)
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise bad_request('Send {"text": "your message"}.', param="text")
        # The conversation id is the browser's own: it identifies the person for "forget me".
        updates = self.service.respond(key, AUTHOR, text, adapter=ADAPTER, author_id=key.scope)
        try:
            # Refusals (empty, too long, busy, persona unavailable) come before the first update:
            # they get a proper status code and nothing is stored.
            first = await anext(updates)
        except ChatError as exc:
            raise chat_error(exc, param="text") from None
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        listening = True

        async def send(event: str, data: dict) -> None:
            nonlocal listening
            if not listening:
                return
            try:
                await response.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
            except ConnectionResetError:
                # Finish the reply anyway: it is stored, so a reload shows it.
                listening = False

        async def show(update: ReplyUpdate) -> None:
            if update.final:
                persona = await self.service.persona_for(key)
                await send("done", {"text": update.text, "persona": persona.name})
            else:
                await send("update", {"text": update.text})

        try:
            await relay(updates, show, first=first, where=key)
        except ChatError as exc:
            await send("error", chat_error(exc).body())
        if listening:
            await response.write_eof()
        return response

    async def reset(self, request: web.Request) -> web.Response:
        key = self._key(request)
        try:
            await self.service.reset(key)
        except ChatError as exc:
            raise chat_error(exc) from None
        return web.json_response({"conversation": key.scope, "reset": True})

    async def forget_me(self, request: web.Request) -> web.Response:
        key = self._key(request)
        try:
            deleted = await self.service.forget_person(ADAPTER, key.scope)
        except ChatError as exc:
            raise chat_error(exc) from None
        return web.json_response({"conversation": key.scope, "deleted": deleted})

    async def set_persona(self, request: web.Request) -> web.Response:
        key = self._key(request)
        body = await read_json(request)
        name = body.get("persona") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise bad_request('Send {"persona": "name"}.', param="persona")
        name = name.strip()
        if name not in self.service.personas.personas:
            raise unknown_model(name, self.service.personas.names, param="persona")
        try:
            persona = await self.service.set_persona(key, name)
        except ChatError as exc:
            raise chat_error(exc, param="persona") from None
        return web.json_response({"conversation": key.scope, "persona": self._describe(persona)})
