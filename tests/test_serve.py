"""`ttt serve` as a process: the web adapter by default, readiness, graceful shutdown on SIGTERM;
the retention sweep while it serves."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ttt.serve import serve
from conftest import make_config, make_settings
from core.conversation import ConversationKey, Turn
from core.stores.sqlite import SQLiteStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, logs: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, logs.read_text()
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                health = json.load(response)
                if health["ready"]:
                    assert all(health["models"].values()) and health["models"]
                    return health
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError("ttt serve did not become ready")


@pytest.mark.timeout(180)
def test_serve_starts_web_by_default_and_stops_gracefully(tmp_path, word_model_dir):
    port = free_port()
    config = make_config(tmp_path, word_model_dir, web={"port": port})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    logs = tmp_path / "serve.log"  # a file, not a pipe that would stop the server once full
    with logs.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ttt", "--config", str(path), "serve"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_ready(url, process, logs)
        assert health["status"] == "ok"
        request = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "words", "messages": [{"role": "user", "content": "the word is copper"}],
                             "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            first = response.readline()  # the stream has begun: the reply is in flight
            process.send_signal(signal.SIGTERM)
            body = first + response.read()
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"  # the reply in flight finished
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
        assert text == "copper!"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    logs = logs.read_text()
    assert "web adapter started" in logs and "shutting down" in logs and "stopped" in logs
    # generator.device auto: which device and dtype were chosen, and why, said once.
    chosen = [line for line in logs.splitlines() if "generator: " in line]
    assert len(chosen) == 1 and "generator.device is auto" in chosen[0] and "float32" in chosen[0], logs


@pytest.mark.timeout(60)
async def test_serve_deletes_turns_past_the_retention_period(tmp_path, word_model_dir):
    config = make_config(tmp_path, word_model_dir, web={"port": 0}, conversation={"retention_days": 30})
    store = await SQLiteStore(config.database.path).open()
    key = ConversationKey("web", "old-browser-1")
    day = 86400
    await store.add_turns(key, [Turn("user", "u", "long ago", time=time.time() - 31 * day),
                                Turn("bot", "words", "indeed", time=time.time() - 31 * day)])
    await store.add_turns(key, [Turn("user", "u", "yesterday", time=time.time() - day)])
    await store.close()

    def texts() -> list[str]:
        with sqlite3.connect(config.database.path) as db:
            return [row[0] for row in db.execute("SELECT text FROM turns ORDER BY id")]

    stop = asyncio.Event()
    serving = asyncio.create_task(serve(make_settings(config), stop))
    try:
        while texts() != ["yesterday"]:  # the sweep runs as serve starts, then hourly
            assert not serving.done() and len(texts()) in (1, 3)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        assert await asyncio.wait_for(serving, 30) == 0
