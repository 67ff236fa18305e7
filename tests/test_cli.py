"""`ttt chat` in a subprocess, driven through stdin, with history kept across runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_config


def run_chat(config_path, cwd, lines: list[str], *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ttt", "--config", str(config_path), "--log-level", "WARNING", "chat", *extra],
        input="\n".join(lines) + "\n", cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(300)
def test_chat_through_stdin_keeps_history_across_runs(tmp_path, word_model_dir, word_chat_model_dir):
    config = make_config(tmp_path, word_model_dir, word_chat_model_dir)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    out = run_chat(path, tmp_path, ["the word is meadow", "again", "/personas", "/persona missing"])
    assert out.splitlines()[:2] == ["words> meadow!", "words> meadow!"]
    assert "- **wordchat**" in out and "train it first" in out

    # A new process on the same database remembers the conversation.
    out = run_chat(path, tmp_path, ["again", "/reset", "/persona wordchat", "the word is falcon"])
    lines = out.splitlines()
    assert lines[0] == "words> meadow!"
    assert "Fresh start" in lines[1] and "Switched to **wordchat**" in lines[2]
    assert lines[3] == "wordchat> falcon!"

    out = run_chat(path, tmp_path, ["", "x" * 5000, "again"], "--session", "someone-else")
    assert "keep it under" in out  # oversize input gets a polite notice
    assert out.splitlines()[-1] != "wordchat> falcon!"  # another session: its own, empty history
