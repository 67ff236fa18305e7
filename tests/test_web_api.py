"""The web adapter through a real HTTP server on 127.0.0.1: the OpenAI-compatible API (also with the
official `openai` client), the chat page's API, /healthz, /metrics, API keys and `ttt serve`."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ttt.serve import plan_adapters, serve
from bots.web.server import WebAdapter, create_adapter
from conftest import make_config, make_settings
from core.config.schema import Config
from core.conversation import ConversationKey
from core.errors import MEMORY_UNAVAILABLE
from core.service import ChatService, open_service
from fakes.openai_server import FakeOpenAIServer
from pg import pg_url, postgres  # noqa: F401 (fixtures)
from test_service import GatedOpenAIServer
from trap_model import PROMPT, cached_trap_model

API_KEY = "test-key-5f0c2a9e"


@dataclass
class Server:
    config: Config
    service: ChatService
    adapter: WebAdapter
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.port}"

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    async def chat(self, body, headers=None) -> tuple[int, dict]:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.post(f"{self.url}/v1/chat/completions", data=data, headers=headers) as r:
            return r.status, await r.json()

    async def metric(self, name: str, **labels: str) -> float:
        async with self.http.get(f"{self.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stored_turns(self) -> int:
        with sqlite3.connect(f"file:{self.config.database.path}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM turns").fetchone()[0]


async def start_server(config: Config, environ: dict[str, str] | None = None) -> Server:
    service = await open_service(config)
    adapter = create_adapter(service, make_settings(config, environ))
    await adapter.start()
    return Server(config, service, adapter, aiohttp.ClientSession())


async def stop_server(server: Server) -> None:
    await server.http.close()
    await server.adapter.stop()
    await server.service.close()


@pytest.fixture(scope="module")
def trap_model_dir():
    return cached_trap_model()


@pytest.fixture
async def server(tmp_path, word_model_dir, word_chat_model_dir, trap_model_dir):
    traps = {"model": str(trap_model_dir), "format": "dialogpt", "decoding": {"do_sample": False, "max_new_tokens": 32}}
    config = make_config(tmp_path, word_model_dir, word_chat_model_dir, web={"port": 0, "max_tokens_limit": 32,
                         "max_messages": 8}, service={"max_input_chars": 100}, personas={"traps": traps})
    s = await start_server(config)
    yield s
    await stop_server(s)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# ---- the OpenAI-compatible API ---------------------------------------------------------------


@pytest.mark.timeout(60, func_only=True)
async def test_openai_client_completes_a_chat(server):
    completion = await server.client().chat.completions.create(model="words", messages=[user("the word is apple")])
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "words"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "apple!", "stop")
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert 0 <= completion.usage.prompt_tokens_details.cached_tokens <= completion.usage.prompt_tokens
    assert server.stored_turns() == 0  # stateless: the request carries the conversation


@pytest.mark.timeout(60, func_only=True)
async def test_openai_client_streams_chunks(server):
    stream = await server.client().chat.completions.create(
        model="traps", messages=[user(PROMPT)], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # Streamed as screened, a sentence at a time: the flagged prefixes ("Shit|ake", "Dick|ens") never show.
    assert pieces == ["I love Shitake.", " Charles Dickens wrote books.", " We should assess it.", " Try a cocktail!"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.timeout(60, func_only=True)
async def test_the_request_carries_the_history_and_a_system_message(server):
    client = server.client()
    messages = [user("the word is river"), {"role": "assistant", "content": "river!"}, user("again")]
    for model in ("words", "wordchat"):
        completion = await client.chat.completions.create(model=model, messages=messages)
        assert completion.choices[0].message.content == "river!"
    # Content parts and a system message (it replaces the persona's system prompt) are accepted.
    completion = await client.chat.completions.create(
        model="wordchat",
        messages=[{"role": "system", "content": "play the word game"},
                  {"role": "user", "content": [{"type": "text", "text": "the word is tiger"}]}],
    )
    assert completion.choices[0].message.content
    assert server.stored_turns() == 0


@pytest.mark.timeout(60, func_only=True)
async def test_decoding_parameters_are_honoured(server):
    client = server.client()
    ask = [user("the word is castle")]
    short = await client.chat.completions.create(model="words", messages=ask, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    assert "castle!".startswith(short.choices[0].message.content)
    stopped = await client.chat.completions.create(model="words", messages=ask, stop=["!"])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("castle", "stop")
    greedy = await client.chat.completions.create(model="words", messages=ask, temperature=0)
    assert greedy.choices[0].message.content == "castle!"
    # Hot sampling with a seed: the same seed gives the same reply.
    hot = dict(model="words", messages=ask, temperature=2, top_p=1, seed=1234, max_tokens=12)
    first = await client.chat.completions.create(**hot)
    second = await client.chat.completions.create(**hot)
    assert first.choices[0].message.content == second.choices[0].message.content


@pytest.mark.timeout(60, func_only=True)
async def test_the_api_screens_replies_like_every_chat_platform(tmp_path, word_model_dir):
    # The remote model answers "you said: <message>": a clean first sentence, then an offensive one.
    message = "What a lovely day. You are a worthless idiot, shut up"
    async with FakeOpenAIServer() as model_server:
        remote = {"model": "served", "endpoint": {"base_url": model_server.url, "model": "m"}}
        config = make_config(tmp_path, word_model_dir, web={"port": 0}, personas={"remote": remote},
                             safety={"on_offensive": "fallback"})
        s = await start_server(config)
        try:
            completion = await s.client().chat.completions.create(model="remote", messages=[user(message)])
            assert completion.choices[0].message.content == config.safety.fallback_reply
            assert completion.choices[0].finish_reason == "content_filter"
            # A stream cannot take text back: it showed only the screened sentence, then was cut.
            stream = await s.client().chat.completions.create(model="remote", messages=[user(message)], stream=True)
            chunks = [chunk async for chunk in stream]
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert pieces == ["you said: What a lovely day."]
            assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["content_filter"]
            assert await s.metric("ttt_requests_total", adapter="openai", persona="remote", outcome="cut") == 1
        finally:
            await stop_server(s)


@pytest.mark.timeout(60, func_only=True)
async def test_concurrent_requests_each_get_their_own_reply(server):
    client = server.client()
    words = ["apple", "tiger", "lemon", "rocket"]
    replies = await asyncio.gather(*[
        client.chat.completions.create(model="words", messages=[user(f"the word is {w}")]) for w in words
    ])
    assert [r.choices[0].message.content for r in replies] == [f"{w}!" for w in words]


@pytest.mark.timeout(30, func_only=True)
async def test_models_lists_the_personas(server):
    client = server.client()
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == ["words", "missing", "wordchat", "traps"]
    assert all(m.object == "model" for m in models)
    assert (await client.models.retrieve("wordchat")).id == "wordchat"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nobody")


BAD_REQUESTS = [
    ("invalid json", "{not json", 400, None, "invalid_json"),
    ("empty body", "", 400, None, "invalid_json"),
    ("not an object", json.dumps([1, 2]), 400, None, "invalid_json"),
    ("no model", {"messages": [user("hi")]}, 400, "model", None),
    ("unknown persona", {"model": "nobody", "messages": [user("hi")]}, 404, "model", "model_not_found"),
    ("no messages", {"model": "words"}, 400, "messages", None),
    ("empty message list", {"model": "words", "messages": []}, 400, "messages", None),
    ("empty message", {"model": "words", "messages": [user("   ")]}, 400, "messages[0].content", "empty_message"),
    ("oversize message", {"model": "words", "messages": [user("x" * 101)]}, 400, "messages[0].content",
     "message_too_long"),
    ("too many tokens", {"model": "words", "messages": [user("hi")], "max_tokens": 33}, 400, "max_tokens",
     "max_tokens_exceeded"),
    ("negative tokens", {"model": "words", "messages": [user("hi")], "max_tokens": 0}, 400, "max_tokens", None),
    ("hot temperature", {"model": "words", "messages": [user("hi")], "temperature": 2.5}, 400, "temperature", None),
    ("top_p text", {"model": "words", "messages": [user("hi")], "top_p": "high"}, 400, "top_p", None),
    ("n=2", {"model": "words", "messages": [user("hi")], "n": 2}, 400, "n", None),
    ("bad stop", {"model": "words", "messages": [user("hi")], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("huge seed", {"model": "words", "messages": [user("hi")], "seed": 10**30}, 400, "seed", None),
    ("tool role", {"model": "words", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    ("ends with assistant", {"model": "words", "messages": [user("hi"), {"role": "assistant", "content": "yo"}]},
     400, "messages", None),
    ("image part", {"model": "words", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", None),
    ("too many messages", {"model": "words", "messages": [user("hi")] * 9}, 400, "messages", "too_many_messages"),
    ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, 400, None, "invalid_json"),
    ("lone surrogate", '{"model": "words", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400,
     "messages[0].content", "invalid_text"),
    ("lone surrogate in a name", '{"model": "wordchat", "messages": [{"role": "user", "content": "hi", "name": "al"}, '
     '{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi", "name": "\\udfff"}]}', 400,
     "messages[2].name", "invalid_text"),
    # One letter with 99 combining marks: within max_input_chars (100), but alone over the context.
    ("message fills the context", {"model": "words", "messages": [user("a" + "\u0301" * 99)]}, 400, "messages",
     "context_length_exceeded"),
    ("system prompt alone too long", {"model": "wordchat", "messages": [
        {"role": "system", "content": "a" + "\u0301" * 99}, user("hi")]}, 400, "messages", "context_length_exceeded"),
]


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("body,status,param,code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
async def test_bad_requests_get_a_clear_4xx_and_nothing_is_stored(server, body, status, param, code):
    got, answer = await server.chat(body, headers={"Content-Type": "application/json"})
    assert got == status
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    assert (error["param"], error["code"]) == (param, code)
    assert await server.metric("ttt_requests_total", adapter="openai", outcome="rejected") == 1
    # The server keeps serving, and nothing was stored.
    got, answer = await server.chat({"model": "words", "messages": [user("the word is lemon")]})
    assert got == 200 and answer["choices"][0]["message"]["content"] == "lemon!"
    assert server.stored_turns() == 0


@pytest.mark.timeout(60, func_only=True)
async def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="nobody", messages=[user("hi")])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.chat.completions.create(model="words", messages=[user("hi")], max_tokens=1000)
    assert "at most 32" in too_many.value.message
    with pytest.raises(openai.InternalServerError) as untrained:  # 503: the persona exists, its model does not
        await client.chat.completions.create(model="missing", messages=[user("hi")])
    assert untrained.value.status_code == 503 and "ttt train" in untrained.value.message
    async with server.http.get(f"{server.url}/v1/nothing-here") as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with server.http.get(f"{server.url}/v1/chat/completions") as r:
        assert r.status == 405 and "error" in await r.json()


@pytest.mark.timeout(60, func_only=True)
async def test_oversize_body_and_headers_are_refused_in_the_error_shape(server, caplog):
    got, answer = await server.chat("{" + " " * (2 * 1024 * 1024) + "}")
    assert got == 413 and "too large" in answer["error"]["message"] and ".." not in answer["error"]["message"]
    assert answer["error"]["code"] == "request_too_large"
    caplog.set_level("INFO", logger="bots.web.server")
    # An oversized header may be a credential: it is neither echoed nor logged.
    async with server.http.get(f"{server.url}/v1/models",
                               headers={"Authorization": "Bearer sk-leak-me" + "a" * 10_000}) as r:
        assert r.status == 400 and r.content_type == "application/json"
        error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] == ("The request could not be read: a header or the request line is longer than "
                                "8190 bytes.")
    assert "refused an unreadable request" in caplog.text and "leak-me" not in caplog.text
    got, answer = await server.chat({"model": "words", "messages": [user("the word is lemon")]})
    assert got == 200  # the server keeps serving


@pytest.mark.timeout(60, func_only=True)
async def test_idle_and_half_sent_requests_are_closed_before_any_key_check(tmp_path, word_model_dir):
    """100 connections that send nothing or half a request, and one whose body trickles, are closed
    after web.idle_timeout_s; a whole request is still answered."""
    config = make_config(tmp_path, word_model_dir, web={"port": 0, "idle_timeout_s": 1})
    s = await start_server(config, {"TTT_API_KEY": API_KEY})
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        connections = [await asyncio.open_connection("127.0.0.1", s.adapter.port) for _ in range(100)]
        for i, (_, writer) in enumerate(connections):
            if i % 2:  # half a request header: never the blank line that ends it
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bear")
        trickle_reader, trickle = await asyncio.open_connection("127.0.0.1", s.adapter.port)
        trickle.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"mo")

        async def closed(reader: asyncio.StreamReader) -> bytes:
            try:
                return await asyncio.wait_for(reader.read(), 10)  # everything until the server closes
            except ConnectionResetError:
                return b""

        answers = await asyncio.gather(*(closed(reader) for reader, _ in connections))
        assert loop.time() - started < 8 and all(answer == b"" for answer in answers)
        slow = await closed(trickle_reader)
        assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow
        async with s.http.get(f"{s.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status == 200  # the server keeps serving
        for _, writer in connections + [(None, trickle)]:
            writer.close()
    finally:
        await stop_server(s)


# ---- cross-site requests and DNS rebinding -----------------------------------------------------

EVIL = "http://evil.example"


@pytest.mark.timeout(60, func_only=True)
async def test_other_sites_cannot_drive_the_api_through_a_browser(server):
    conversation = "victim-browser-01"
    await page_message(server, conversation, "the word is tiger")
    api = f"{server.url}/api/conversations/{conversation}"
    chat_body = json.dumps({"model": "words", "messages": [user("the word is apple")]})
    page_body = json.dumps({"text": "the word is apple"})
    # What a page elsewhere can send without a CORS preflight: text/plain or a form, with its own Origin.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
        cross = {"Origin": EVIL, "Content-Type": content_type}
        for method, url, body in (("POST", f"{server.url}/v1/chat/completions", chat_body),
                                  ("POST", f"{api}/messages", page_body), ("POST", f"{api}/reset", ""),
                                  ("POST", f"{api}/forget-me", ""), ("PUT", f"{api}/persona", '{"persona": "wordchat"}')):
            async with server.http.request(method, url, data=body, headers=cross) as r:
                assert r.status == 403, (method, url, content_type)
                assert (await r.json())["error"]["code"] == "cross_origin"
    assert server.stored_turns() == 2  # nothing stored, reset or forgotten
    assert await server.service.store.persona(ConversationKey("web", conversation)) is None
    # Without the JSON content type even a same-site request is not read as JSON.
    for url, body in ((f"{server.url}/v1/chat/completions", chat_body), (f"{api}/messages", page_body)):
        async with server.http.post(url, data=body, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415 and (await r.json())["error"]["code"] == "unsupported_media_type"
    # The page itself (same origin) works.
    same = {"Origin": server.url, "Content-Type": "application/json"}
    async with server.http.post(f"{server.url}/v1/chat/completions", data=chat_body, headers=same) as r:
        assert r.status == 200
    async with server.http.post(f"{api}/reset", headers={"Origin": server.url}) as r:
        assert r.status == 200
    assert server.stored_turns() == 0


@pytest.mark.timeout(60, func_only=True)
async def test_only_loopback_host_names_are_answered_on_loopback(server):
    port = server.adapter.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "10.0.0.1"):
        for method, path in (("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/api/personas"), ("GET", "/"),
                             ("GET", "/api/conversations/some-browser-1"), ("POST", "/v1/chat/completions")):
            async with server.http.request(method, server.url + path, headers={"Host": host},
                                           json={"model": "words", "messages": [user("hi")]}) as r:
                assert r.status == 403, (host, path)
                assert (await r.json())["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "LOCALHOST:1"):
        async with server.http.get(server.url + "/healthz", headers={"Host": host}) as r:
            assert r.status == 200, host


# ---- API keys and binding ------------------------------------------------------------------


@pytest.mark.timeout(60, func_only=True)
async def test_binding_beyond_loopback_needs_a_key(tmp_path, word_model_dir, caplog):
    open_config = make_config(tmp_path, word_model_dir, web={"host": "0.0.0.0", "port": 0})
    service = await open_service(open_config)
    try:
        with pytest.raises(ValueError, match="TTT_API_KEY"):
            create_adapter(service, make_settings(open_config))
    finally:
        await service.close()

    s = await start_server(open_config, {"TTT_API_KEY": API_KEY})
    try:
        for path in ("/v1/models", "/api/personas", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                async with s.http.get(s.url + path, headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    assert (await r.json())["error"]["code"] == "invalid_api_key"
                    assert r.headers["WWW-Authenticate"] == "Bearer"
            async with s.http.get(s.url + path, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                assert r.status == 200, path
        for path in ("/", "/healthz", "/static/app.js"):  # the page and health need no key
            async with s.http.get(s.url + path) as r:
                assert r.status == 200, path
        with pytest.raises(openai.AuthenticationError):
            await s.client("wrong").chat.completions.create(model="words", messages=[user("hi")])
        completion = await s.client(API_KEY).chat.completions.create(model="words", messages=[user("the word is cloud")])
        assert completion.choices[0].message.content == "cloud!"
    finally:
        await stop_server(s)
    assert API_KEY not in caplog.text


# ---- the chat page's API -------------------------------------------------------------------


async def page_message(server: Server, conversation: str, text: str) -> tuple[int, list[tuple[str, dict]]]:
    """POST a message; (status, [(event, data)...]) of the server-sent events (or the JSON error)."""
    url = f"{server.url}/api/conversations/{conversation}/messages"
    async with server.http.post(url, json={"text": text}) as r:
        if r.content_type != "text/event-stream":
            return r.status, [("json", await r.json())]
        events, event = [], None
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
        return r.status, events


@pytest.mark.timeout(60, func_only=True)
async def test_page_api_streams_stores_and_resets(server):
    conversation = "browser-one-1234"
    key = ConversationKey("web", conversation)
    status, events = await page_message(server, conversation, "the word is apple")
    assert status == 200
    updates = [data["text"] for event, data in events if event == "update"]
    assert events[-1] == ("done", {"text": "apple!", "persona": "words"})
    assert updates == ["apple!"]  # a one-sentence reply: shown once screened
    assert [(t.role, t.text) for t in await server.service.store.recent_turns(key, 10)] == [
        ("user", "the word is apple"), ("bot", "apple!")]

    status, events = await page_message(server, conversation, "again")
    assert events[-1][1]["text"] == "apple!"  # answered from this conversation's stored history
    async with server.http.get(f"{server.url}/api/conversations/{conversation}") as r:
        history = await r.json()
    assert history["persona"]["name"] == "words"
    assert [(t["role"], t["text"]) for t in history["turns"]] == [
        ("user", "the word is apple"), ("bot", "apple!"), ("user", "again"), ("bot", "apple!")]

    status, events = await page_message(server, "browser-two-5678", "again")  # another browser: no cross-talk
    assert events[-1][1]["text"] != "apple!"

    async with server.http.post(f"{server.url}/api/conversations/{conversation}/reset") as r:
        assert r.status == 200
    assert await server.service.store.recent_turns(key, 10) == []
    async with server.http.get(f"{server.url}/api/conversations/{conversation}") as r:
        assert (await r.json())["turns"] == []


@pytest.mark.timeout(60, func_only=True)
async def test_the_page_is_one_server_whose_daily_budget_every_browser_shares(tmp_path, word_model_dir):
    s = await start_server(make_config(tmp_path, word_model_dir, web={"port": 0},
                                       limits={"tokens_per_server_per_day": 4}))
    try:
        status, events = await page_message(s, "browser-one-1234", "the word is apple")
        assert status == 200 and events[-1][1]["text"] == "apple!"
        status, events = await page_message(s, "browser-two-5678", "the word is river")
        assert status == 429
        assert events == [("json", {"error": {
            "message": "This server has used today's 4 tokens; it resets at 00:00 UTC.", "type": "rate_limit_error",
            "param": None, "code": "budget_spent"}})]
        assert s.stored_turns() == 2
        assert await s.metric("ttt_budget_refusals_total", adapter="web", budget="server") == 1
        assert await s.metric("ttt_tokens_generated_total", adapter="web", persona="words") == 4
    finally:
        await stop_server(s)


@pytest.mark.timeout(60, func_only=True)
async def test_page_api_switches_persona(server):
    conversation = "persona-switch-01"
    key = ConversationKey("web", conversation)
    url = f"{server.url}/api/conversations/{conversation}/persona"
    async with server.http.get(f"{server.url}/api/personas") as r:
        listing = await r.json()
    assert listing["default"] == "words"
    assert {p["name"]: p["available"] for p in listing["personas"]} == {"words": True, "missing": False, "wordchat": True,
                                                                        "traps": True}

    async with server.http.put(url, json={"persona": "nobody"}) as r:
        assert r.status == 404 and (await r.json())["error"]["param"] == "persona"
    async with server.http.put(url, json={"persona": "missing"}) as r:
        assert r.status == 503 and "ttt train" in (await r.json())["error"]["message"]
    async with server.http.put(url, data="{oops", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    assert await server.service.store.persona(key) is None

    async with server.http.put(url, json={"persona": "wordchat"}) as r:
        assert r.status == 200 and (await r.json())["persona"]["name"] == "wordchat"
    assert await server.service.store.persona(key) == "wordchat"
    status, events = await page_message(server, conversation, "the word is violet")
    assert events[-1] == ("done", {"text": "violet!", "persona": "wordchat"})
    assert (await server.service.store.recent_turns(key, 10))[-1].persona == "wordchat"


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("conversation,body,status,code", [
    ("valid-conversation", {"text": "   "}, 400, "invalid_message"),
    ("valid-conversation", {"text": "x" * 101}, 400, "invalid_message"),
    ("valid-conversation", {"words": "hi"}, 400, None),
    ("valid-conversation", "{oops", 400, "invalid_json"),
    ("valid-conversation", "[" * 100_000 + "]" * 100_000, 400, "invalid_json"),
    ("valid-conversation", {"text": "hi \ud800"}, 400, "invalid_message"),
    ("valid-conversation", {"text": "a" + "\u0301" * 99}, 400, "context_length_exceeded"),  # fills the context
    ("bad!id", {"text": "hi"}, 400, None),
])
async def test_page_api_rejects_bad_input_and_stores_nothing(server, conversation, body, status, code):
    url = f"{server.url}/api/conversations/{conversation}/messages"
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    async with server.http.post(url, **kwargs) as r:
        assert r.status == status
        error = (await r.json())["error"]
    assert error["code"] == code and error["message"]
    assert server.stored_turns() == 0
    status, events = await page_message(server, "valid-conversation", "the word is falcon")
    assert events[-1][1]["text"] == "falcon!"


# ---- health and metrics --------------------------------------------------------------------


@pytest.mark.timeout(60, func_only=True)
async def test_metrics_change_as_requests_are_served(server):
    ok = dict(adapter="openai", persona="words", outcome="ok")
    assert await server.metric("ttt_adapter_up", adapter="web") == 1
    assert await server.metric("ttt_requests_total", **ok) == 0
    await server.client().chat.completions.create(model="words", messages=[user("the word is harbor")])
    stream = await server.client().chat.completions.create(model="words", messages=[user("hi")], stream=True)
    [_ async for _ in stream]
    await page_message(server, "metrics-conversation", "the word is meadow")
    await server.chat({"model": "words", "messages": []})

    assert await server.metric("ttt_requests_total", **ok) == 2
    assert await server.metric("ttt_requests_total", adapter="web", persona="words", outcome="ok") == 1
    assert await server.metric("ttt_requests_total", adapter="openai", persona="words", outcome="rejected") == 1
    assert await server.metric("ttt_reply_latency_seconds_count", adapter="openai", persona="words") == 2
    assert await server.metric("ttt_reply_latency_seconds_count", adapter="web", persona="words") == 1
    assert await server.metric("ttt_time_to_first_token_seconds_count") == 3
    assert await server.metric("ttt_generator_batch_size_count") >= 1
    assert await server.metric("ttt_generated_tokens_total") >= 3
    assert await server.metric("ttt_reply_tokens_per_second", persona="words") > 0
    assert await server.metric("ttt_generator_queue_depth") == 0
    assert await server.metric("ttt_model_loaded", model=str(server.config.personas["words"].model)) == 1

    await server.adapter.stop()
    assert server.service.metrics.adapter_up.labels("web")._value.get() == 0


@pytest.mark.timeout(60, func_only=True)
async def test_healthz_reflects_a_model_that_failed_to_load(tmp_path, word_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    config = make_config(
        tmp_path, word_model_dir, web={"port": 0},
        personas={"broken": {"model": str(broken), "format": "dialogpt"}}, service={"default_persona": "broken"},
    )
    s = await start_server(config)
    try:
        async with s.http.get(f"{s.url}/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "ready": False, "default_persona": "broken", "models": {},
                                      "adapters": {"web": True},  # alive, but its model is not loaded yet
                                      "database": {"backend": "sqlite", "ok": True}}
        got, answer = await s.chat({"model": "words", "messages": [user("the word is apple")]})
        assert got == 200
        got, answer = await s.chat({"model": "broken", "messages": [user("the word is apple")]})
        assert got == 503 and answer["error"]["code"] == "model_unavailable"
        async with s.http.get(f"{s.url}/healthz") as r:
            assert r.status == 503
            health = await r.json()
        assert health["status"] == "degraded" and health["ready"] is False
        assert health["models"] == {str(word_model_dir): True, str(broken): False}
        assert "not a valid JSON" in health["problem"]
        assert await s.metric("ttt_model_loaded", model=str(broken)) == 0
    finally:
        await stop_server(s)


# ---- ttt serve -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(90, func_only=True)
async def test_serve_starts_the_web_adapter_when_no_platform_is_configured(tmp_path, word_model_dir):
    port = free_port()
    settings = make_settings(make_config(tmp_path, word_model_dir, web={"port": port}))
    assert [p.name for p in plan_adapters(settings) if p.starts] == ["web"]
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:  # until the server is up and the default model is preloaded
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        if (await r.json())["models"]:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline and not serving.done()
                await asyncio.sleep(0.05)
            body = {"model": "words", "messages": [user("the word is copper")]}
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == "copper!"
    finally:
        stop.set()
        assert await asyncio.wait_for(serving, 30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


# ---- busy, forget me ---------------------------------------------------------------------------


async def answer(response: aiohttp.ClientResponse) -> tuple[int, str, str | None, dict | None]:
    """(status, content type, Retry-After, JSON error) of a response."""
    error = (await response.json())["error"] if response.content_type == "application/json" else None
    return response.status, response.content_type, response.headers.get("Retry-After"), error


@pytest.mark.timeout(60, func_only=True)
async def test_busy_and_timed_out_replies_get_503_with_retry_after_before_any_stream_starts(tmp_path, word_model_dir):
    async with GatedOpenAIServer() as model_server:
        remote = {"model": "served", "endpoint": {"base_url": model_server.url, "model": "m"}}
        config = make_config(tmp_path, word_model_dir, web={"port": 0}, personas={"remote": remote},
                             generator={"max_queue": 2, "request_timeout_s": 0.3}, service={"default_persona": "remote"})
        s = await start_server(config)
        ask = {"model": "remote", "messages": [user("hello")]}

        async def post(path: str, body: dict):
            async with s.http.post(s.url + path, json=body) as r:
                return await answer(r)

        try:
            # Two replies the model server never answers in time: they hold the generator's two places.
            waiting = [asyncio.create_task(post("/v1/chat/completions", {**ask, "stream": True})),
                       asyncio.create_task(post("/api/conversations/slow-browser-1/messages", {"text": "hi"}))]
            while len(model_server.requests) < 2:
                assert not any(task.done() for task in waiting)
                await asyncio.sleep(0.01)
            for stream in (False, True):  # busy: refused at once, before any stream starts
                status, kind, retry, error = await post("/v1/chat/completions", {**ask, "stream": stream})
                assert (status, kind, retry, error["code"]) == (503, "application/json", "1", "busy")
            for status, kind, retry, error in await asyncio.gather(*waiting):  # timed out: the same answer
                assert (status, kind, retry, error["code"]) == (503, "application/json", "1", "busy")
                assert "try again in a moment" in error["message"]
            assert s.stored_turns() == 0
            assert await s.metric("ttt_requests_total", adapter="openai", persona="remote", outcome="busy") == 2
            assert await s.metric("ttt_requests_total", adapter="web", persona="remote", outcome="timeout") == 1
        finally:
            model_server.gate.set()
            await stop_server(s)


@pytest.mark.timeout(60, func_only=True)
async def test_forget_me_deletes_what_this_browser_wrote(server):
    for conversation in ("forgetful-browser", "other-browser-22"):
        await page_message(server, conversation, "the word is apple")
    async with server.http.post(f"{server.url}/api/conversations/forgetful-browser/forget-me") as r:
        assert r.status == 200 and (await r.json())["deleted"] == 2
    assert await server.service.store.recent_turns(ConversationKey("web", "forgetful-browser"), 10) == []
    assert len(await server.service.store.recent_turns(ConversationKey("web", "other-browser-22"), 10)) == 2


@pytest.mark.timeout(120, func_only=True)
async def test_commands_say_the_memory_is_unreachable_while_the_database_is_away(tmp_path, word_model_dir, pg_url,
                                                                                 postgres):
    config = make_config(tmp_path, word_model_dir, web={"port": 0}, database={"url": pg_url, "timeout_s": 2})
    s = await start_server(config)
    page = f"{s.url}/api/conversations/outage-browser"
    try:
        postgres.stop()
        try:
            for method, action, body in (("POST", "reset", None), ("POST", "forget-me", None),
                                         ("PUT", "persona", {"persona": "words"})):
                async with s.http.request(method, f"{page}/{action}", json=body) as r:
                    assert r.status == 503 and r.headers["Retry-After"], action
                    assert (await r.json())["error"]["code"] == "store_unavailable", action
            # What Discord, Slack and `ttt chat` run for their commands.
            key = ConversationKey("slack", "C0OUTAGE")
            for command, argument in (("reset", ""), ("forget-me", ""), ("persona", "words"), ("persona", ""),
                                      ("personas", "")):
                assert await s.service.command(key, command, argument, author_id="U0A") == MEMORY_UNAVAILABLE
        finally:
            postgres.start()
        async with s.http.post(f"{page}/reset") as r:
            assert r.status == 200  # back by itself
    finally:
        await stop_server(s)
