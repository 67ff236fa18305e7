"""An OpenAI-compatible model server (chat completions, streamed) whose replies a test writes piece
by piece: it decides what the model says and when, e.g. to hold a reply half-written."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class ScriptedModel:
    """An OpenAI-compatible model server (chat completions) whose replies the test writes piece by piece."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self._ending = False  # after end_all(), later requests end at once too (e.g. a retry of an empty reply)
        self._streams: list[asyncio.Queue] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "ScriptedModel":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self.end_all()
        await self._runner.cleanup()

    def persona(self) -> dict:
        return {"model": "scripted", "format": "chat", "description": "a scripted model server",
                "endpoint": {"base_url": self.url, "model": "scripted"}}

    async def request(self, n: int, timeout: float = 10) -> dict:
        """The n-th request (from 0), once it has arrived."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.requests) > n), timeout)
        return self.requests[n]

    def say(self, n: int, *pieces: str) -> None:
        for piece in pieces:
            self._streams[n].put_nowait(piece)

    def end(self, n: int) -> None:
        self._streams[n].put_nowait(None)

    def end_all(self) -> None:
        self._ending = True
        for stream in self._streams:
            stream.put_nowait(None)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream: asyncio.Queue = asyncio.Queue()
        if self._ending:
            stream.put_nowait(None)
        self._streams.append(stream)
        self.requests.append(body)
        async with self._arrived:
            self._arrived.notify_all()
        if self.fail_with:
            return web.json_response({"error": {"message": "model crashed"}}, status=self.fail_with)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while (piece := await stream.get()) is not None:
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response
