"""The generator's second backend: an OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama).

Same interface as the local engine, so a deployment outgrows one machine by changing config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Sequence

import aiohttp

from core.config.schema import Decoding, Endpoint
from core.conversation import Turn
from core.engine.generator import Engine, Generation, GenerationFailed, GeneratorBusy, checked_decoding
from core.metrics import Metrics
from core.prompts import PromptTooLong, SystemPromptTooLong, chat_messages

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # budget estimate: the server's tokenizer is not here


class OpenAIEngine(Engine):
    def __init__(self, endpoint: Endpoint, *, api_key: str | None, max_queue: int, metrics: Metrics | None = None):
        self.endpoint = endpoint
        self.name = f"{endpoint.base_url}#{endpoint.model}"
        self._api_key = api_key
        self._max_queue = max_queue
        self._metrics = metrics
        self._in_flight: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None

    def prepare(self, fmt: str, turns: Sequence[Turn], system_prompt: str, budget: int) -> dict:
        """The newest whole turns that fit `budget` (estimated: the server's tokenizer is not here);
        raises PromptTooLong / SystemPromptTooLong as the local engine does."""
        room = budget * CHARS_PER_TOKEN - len(system_prompt)
        if room <= 0:
            raise SystemPromptTooLong(
                f"the system prompt alone (about {len(system_prompt) // CHARS_PER_TOKEN} tokens) fills the "
                f"budget of {budget} tokens"
            )
        kept: list[Turn] = []
        for turn in reversed(turns):  # newest first, each turn counted once
            if len(turn.text) > room:
                break
            room -= len(turn.text)
            kept.append(turn)
        if not kept:
            raise PromptTooLong(
                f"the newest message (about {len(turns[-1].text) // CHARS_PER_TOKEN} tokens) does not fit the "
                f"budget of {budget} tokens"
            )
        kept.reverse()
        if fmt == "dialogpt":
            return {"prompt": "".join(t.text + "<|endoftext|>" for t in kept)}
        return {"messages": chat_messages(kept, system_prompt)}

    def submit(
        self, prompt: dict, decoding: Decoding, timeout: float | None = None, adapter: str | None = None
    ) -> Generation:
        decoding = checked_decoding(decoding)
        if len(self._in_flight) >= self._max_queue:
            raise GeneratorBusy("the remote generator's queue is full")
        generation = Generation(asyncio.get_running_loop(), timeout or self.endpoint.timeout_s)
        task = asyncio.create_task(self._run(generation, prompt, decoding))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        generation.on_cancel(task.cancel)  # closes the HTTP request: the server stops generating too
        return generation

    async def _run(self, generation: Generation, prompt: dict, decoding: Decoding) -> None:
        body = {
            "model": self.endpoint.model,
            "stream": True,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "top_p": decoding.top_p,
            **prompt,
        }
        if decoding.top_k:
            body["top_k"] = decoding.top_k
        if decoding.repetition_penalty != 1.0:
            body["repetition_penalty"] = decoding.repetition_penalty
        if decoding.stop:
            body["stop"] = decoding.stop
        if decoding.seed is not None:
            body["seed"] = decoding.seed
        path = "chat/completions" if "messages" in prompt else "completions"
        url = self.endpoint.base_url.rstrip("/") + "/" + path
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        stats = generation.stats
        stats.queue_wait_s = 0.0
        try:
            session = await self._client()
            async with session.post(url, json=body, headers=headers) as response:
                if response.status >= 400:
                    detail = (await response.text())[:200]
                    raise GenerationFailed(f"the model server answered {response.status}: {detail}")
                finish = "stop"
                async for text, reason in _sse_texts(response):
                    finish = reason or finish
                    if not text:
                        continue
                    if stats.first_token_s is None:
                        stats.first_token_s = time.monotonic() - generation.submitted
                    stats.new_tokens += 1  # a streamed chunk: servers send about one token each
                    generation.push("text", text)
            stats.total_s = time.monotonic() - generation.submitted
            stats.finish_reason = "length" if finish == "length" else "stop"
            generation.push("done", stats)
        except GenerationFailed as exc:
            generation.push("error", exc)
        except Exception as exc:  # noqa: BLE001 - any failure ends this request, never leaves it hanging
            log.warning("model server %s failed: %r", self.endpoint.base_url, exc)
            generation.push("error", GenerationFailed(f"the model server failed: {type(exc).__name__}"))

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s))
        return self._session

    async def close(self) -> None:
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=self.endpoint.timeout_s)
        if self._session is not None:
            await self._session.close()


async def _sse_texts(response: aiohttp.ClientResponse):
    """(text piece, finish reason or None) from an OpenAI streaming response (chat or completions)."""
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if text or choice.get("finish_reason"):
                yield text or "", choice.get("finish_reason")
