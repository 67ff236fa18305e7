"""`ttt serve` as a process: the web adapter by default, readiness, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import make_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
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
    process = subprocess.Popen(
        [sys.executable, "-m", "ttt", "--config", str(path), "serve"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_ready(url, process)
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
    logs = process.stderr.read()
    assert "web adapter started" in logs and "shutting down" in logs and "stopped" in logs
