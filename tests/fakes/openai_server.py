"""A local OpenAI-compatible model server (like vLLM or TGI) for tests of the remote backend.

It answers deterministically: "you said: <last user message>", streamed a word at a time.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web


class FakeOpenAIServer:
    def __init__(self, api_key: str | None = None, fail_with: int | None = None, delay_s: float = 0.0):
        self.api_key = api_key
        self.fail_with = fail_with
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.disconnects = 0  # streams the client closed before their end
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "FakeOpenAIServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, handler_cancellation=True)  # a closed stream is seen at once
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def _refuse(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
        if self.fail_with:
            return web.json_response({"error": {"message": "model crashed", "type": "server_error"}},
                                     status=self.fail_with)
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        refused = self._refuse(request)
        if refused:
            return refused
        last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        return await self._stream(request, body, f"you said: {last}", chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        refused = self._refuse(request)
        if refused:
            return refused
        last = body["prompt"].split("<|endoftext|>")[-2]
        return await self._stream(request, body, f"you said: {last}", chat=False)

    async def _stream(self, request: web.Request, body: dict, text: str, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = text.split(" ")
        limit = body.get("max_tokens", 100)
        try:
            for i, word in enumerate(words[:limit]):
                piece = word if i == 0 else " " + word
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                if i == min(len(words), limit) - 1:
                    choice["finish_reason"] = "length" if len(words) > limit else "stop"
                chunk = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body["model"], "choices": [choice]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response
