"""The remote backend: a persona served by an OpenAI-compatible server, streaming included."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import make_config
from core.conversation import ConversationKey, Turn
from core.prompts import PromptTooLong, SystemPromptTooLong
from core.errors import ReplyFailed
from core.service import open_service
from fakes.openai_server import FakeOpenAIServer

KEY = ConversationKey("test", "remote")


def remote_config(tmp_path, word_model_dir, url: str, fmt: str = "chat"):
    config = make_config(tmp_path, word_model_dir)
    config.personas["remote"] = config.personas["words"].model_copy(
        update={
            "format": fmt,
            "system_prompt": "Be nice.",
            "endpoint": {"base_url": url, "model": "served-model", "api_key_env": "REMOTE_KEY"},
            "decoding": config.personas["words"].decoding.model_copy(
                update={"do_sample": True, "temperature": 0.6, "top_k": 40, "stop": ["\n\n"]}
            ),
        }
    )
    config.service.default_persona = "remote"
    return type(config).model_validate(config.model_dump())


@pytest.mark.timeout(60)
async def test_chat_persona_streams_from_remote_server(tmp_path, word_model_dir):
    async with FakeOpenAIServer(api_key="k-123", delay_s=0.15) as server:
        service = await open_service(remote_config(tmp_path, word_model_dir, server.url), {"REMOTE_KEY": "k-123"})
        updates = [u async for u in service.respond(KEY, "alice", "hello there <@123>. how are you? fine!",
                                                    adapter="test")]
        assert updates[-1].final and updates[-1].text == "you said: hello there @\u200b123. how are you? fine!"
        # Streamed: growing partial replies (a screened sentence at a time), then the final one.
        assert len(updates) >= 3 and all(b.text.startswith(a.text) for a, b in zip(updates, updates[1:]))
        second = await service.reply(KEY, "bob", "and again", adapter="test")
        assert second == "you said: bob: and again"  # two speakers: names go into the user turns
        body = server.requests[-1]
        assert body["model"] == "served-model" and body["stream"] is True
        assert body["messages"][0] == {"role": "system", "content": "Be nice."}
        assert body["messages"][2]["role"] == "assistant"
        assert body["temperature"] == 0.6 and body["top_k"] == 40 and body["stop"] == ["\n\n"]
        assert [t.text for t in await service.store.recent_turns(KEY, 10)][-1] == second
        await service.close()


@pytest.mark.timeout(60)
async def test_dialogpt_persona_uses_completions(tmp_path, word_model_dir):
    async with FakeOpenAIServer() as server:
        service = await open_service(remote_config(tmp_path, word_model_dir, server.url, fmt="dialogpt"))
        assert await service.reply(KEY, "alice", "hi bot", adapter="test") == "you said: hi bot"
        assert server.requests[-1]["prompt"] == "hi bot<|endoftext|>"
        await service.close()


@pytest.mark.timeout(60)
async def test_server_errors_fail_the_request_cleanly(tmp_path, word_model_dir):
    async with FakeOpenAIServer(fail_with=500) as server:
        service = await open_service(remote_config(tmp_path, word_model_dir, server.url))
        with pytest.raises(ReplyFailed) as info:
            await service.reply(KEY, "alice", "hello", adapter="test")
        assert "Sorry" in info.value.user_message
        assert await service.store.recent_turns(KEY, 10) == []
        await service.close()


@pytest.mark.timeout(60)
def test_a_deployment_on_remote_servers_only_never_imports_torch(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, sys
        from core.config.schema import Config
        from core.conversation import ConversationKey
        from core.service import open_service
        from fakes.openai_server import FakeOpenAIServer

        async def main():
            async with FakeOpenAIServer() as server:
                config = Config.model_validate({{
                    "service": {{"default_persona": "remote"}},
                    "database": {{"path": {str(tmp_path / "db.sqlite3")!r}}},
                    "personas": {{"remote": {{"model": "served-model", "endpoint": {{"base_url": server.url,
                                                                                    "model": "served-model"}}}}}},
                }})
                service = await open_service(config)
                reply = await service.reply(ConversationKey("test", "x"), "alice", "hello", adapter="test")
                await service.close()
            print(reply, "torch" in sys.modules, "transformers" in sys.modules)

        asyncio.run(main())
    """)
    tests = Path(__file__).resolve().parent
    env = {"PYTHONPATH": f"{tests.parent}:{tests}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["you", "said:", "hello", "False", "False"]


@pytest.mark.timeout(60)
async def test_a_reader_that_gives_up_closes_the_request_at_once(tmp_path, word_model_dir):
    async with FakeOpenAIServer(delay_s=5.0) as server:  # a server that would take minutes to finish
        service = await open_service(remote_config(tmp_path, word_model_dir, server.url))
        persona = service.personas.get("remote")
        generation = await service.generate(persona, [Turn("user", "alice", "one two three four five six")])
        async for _ in generation:
            break  # the reader leaves after the first piece
        deadline = time.monotonic() + 3  # well before the server's next piece, 5 s on
        while not server.disconnects:
            assert time.monotonic() < deadline, "the request to the model server was left running"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await service.close()  # nothing in flight is waited for
        assert time.monotonic() - started < 3


@pytest.mark.timeout(60)
async def test_remote_prompts_keep_the_newest_turns_and_refuse_what_cannot_fit(tmp_path, word_model_dir):
    async with FakeOpenAIServer() as server:
        service = await open_service(remote_config(tmp_path, word_model_dir, server.url))
        engine = await service.personas.engine(service.personas.get("remote"))
        turns = [Turn("user", "alice", f"message {i:03d} " + "x" * 30) for i in range(450)]
        prompt = engine.prepare("chat", turns, "Be nice.", budget=100)  # ~400 characters
        texts = [m["content"] for m in prompt["messages"][1:]]
        assert texts == [t.text for t in turns[-len(texts):]] and 5 <= len(texts) < 20
        with pytest.raises(PromptTooLong):
            engine.prepare("chat", [Turn("user", "alice", "y" * 1000)], "Be nice.", budget=100)
        with pytest.raises(SystemPromptTooLong):
            engine.prepare("chat", turns[-1:], "z" * 1000, budget=100)
        answer = await service.reply(KEY, "alice", "a reply that stops at the limit, one two three four", adapter="test")
        assert answer.startswith("you said:")
        await service.close()
