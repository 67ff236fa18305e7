"""`ttt chat` in a subprocess, driven through stdin, with history kept across runs; `ttt serve` and
`ttt check` on broken start-up conditions, each ending in one clear line."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_config
from tiny import build_untrained_model
from ttt.cli import main


def run_chat(config_path, cwd, lines: list[str | bytes], *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stdin = b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n"
    done = subprocess.run(
        [sys.executable, "-m", "ttt", "--config", str(config_path), "--log-level", "WARNING", "chat", *extra],
        input=stdin, cwd=cwd, env=env, capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    return done.stdout.decode()


def write_config(tmp_path: Path, config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def stored_turns(config) -> int:
    with sqlite3.connect(config.database.path) as db:
        return db.execute("SELECT COUNT(*) FROM turns").fetchone()[0]


@pytest.mark.timeout(300)
def test_chat_through_stdin_keeps_history_across_runs(tmp_path, word_model_dir, word_chat_model_dir):
    config = make_config(tmp_path, word_model_dir, word_chat_model_dir)
    path = write_config(tmp_path, config)

    out = run_chat(path, tmp_path, ["the word is meadow", "again", "/personas", "/persona missing"])
    assert out.splitlines()[:2] == ["words> meadow!", "words> meadow!"]
    assert "- wordchat" in out and "**" not in out and "train it first" in out  # no markdown in a terminal

    # A new process on the same database remembers the conversation.
    out = run_chat(path, tmp_path, ["again", "/reset", "/persona wordchat", "the word is falcon"])
    lines = out.splitlines()
    assert lines[0] == "words> meadow!"
    assert "Fresh start" in lines[1] and "Switched to wordchat" in lines[2]
    assert lines[3] == "wordchat> falcon!"

    # Bad input gets a polite notice (binary, not UTF-8, too long); help names this entry point's commands.
    out = run_chat(path, tmp_path, ["", "x" * 5000, b"\xff\xfe\x00 binary \x80", "again", "/help", "/forget-me"],
                   "--session", "someone-else")
    lines = out.splitlines()
    assert "keep it under" in lines[0] and "not text I can read" in lines[1]
    assert lines[2] != "wordchat> falcon!"  # another session: its own, empty history
    assert all(command in lines[3] for command in ("/reset", "/persona NAME", "/personas", "/forget-me", "/quit"))
    # Everything this user wrote, in both sessions, is deleted: 2 exchanges of 2 turns.
    assert "deleted everything you wrote to me here (4 message(s)" in lines[4]
    assert stored_turns(config) == 0


@pytest.mark.timeout(300)
def test_chat_usage_counts_the_tokens_of_this_terminal_against_the_daily_budget(tmp_path, word_model_dir):
    config = make_config(tmp_path, word_model_dir, limits={"tokens_per_person_per_day": 6})
    path = write_config(tmp_path, config)
    out = run_chat(path, tmp_path, ["/usage", "the word is meadow", "/usage", "/reset", "the word is river", "again",
                                    "/usage", "/server show"])
    lines = out.splitlines()
    assert lines[0].startswith("Today (UTC) you have used 0 of 6 tokens here; this server has used 0 tokens")
    assert lines[1] == "words> meadow!"
    assert lines[2].startswith("Today (UTC) you have used 3 of 6 tokens here; this server has used 3 tokens")
    assert lines[4] == "words> river!"
    assert lines[5] == "words> You have used today's 6 tokens here; it resets at 00:00 UTC."
    assert lines[6].startswith("Today (UTC) you have used 6 of 6 tokens here")
    assert lines[7] == "Server settings belong to a server: use this in a Discord server or a Slack workspace."


@pytest.mark.timeout(120)
def test_ctrl_c_while_replying_ends_quietly_and_stores_nothing(tmp_path, word_model_dir):
    slow = {"model": str(build_untrained_model(tmp_path / "slow", n_positions=1100)), "format": "dialogpt",
            "decoding": {"do_sample": True, "temperature": 1.0, "max_new_tokens": 1000}}
    config = make_config(tmp_path, word_model_dir, personas={"slow": slow}, service={"default_persona": "slow"},
                         safety={"on_offensive": "allow"})
    path = write_config(tmp_path, config)
    terminal, chat_side = pty.openpty()  # a terminal: the chat is interactive and streams its reply
    # stderr goes to a file: a pipe nobody reads until the end would stop the chat once it is full.
    stderr = tmp_path / "chat.stderr"
    # Ctrl-C as in a terminal: a suite run as a background job (CI) has SIGINT ignored, which a child
    # would inherit (and rightly keep ignoring); a handled signal is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stderr.open("wb") as log:
            chat = subprocess.Popen(
                [sys.executable, "-m", "ttt", "--config", str(path), "--log-level", "WARNING", "chat"], cwd=tmp_path,
                stdin=chat_side, stdout=chat_side, stderr=log,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"},
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    os.close(chat_side)
    try:
        screen = read_until(terminal, b"you> ")
        os.write(terminal, b"hello there\n")
        screen += read_until(terminal, b"slow> ")  # the reply has begun
        chat.send_signal(signal.SIGINT)
        try:
            code = chat.wait(timeout=60)
        except subprocess.TimeoutExpired:
            chat.send_signal(signal.SIGABRT)  # faulthandler writes where every thread is
            chat.wait(timeout=10)
            raise AssertionError("ttt chat went on after Ctrl-C:\n" + stderr.read_text(errors="replace")[-8000:])
        assert code == 130
    finally:
        if chat.poll() is None:
            chat.kill()
        os.close(terminal)
    err = stderr.read_text(errors="replace")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert stored_turns(config) == 0


def read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    return seen


# ---- broken start-up: one clear line from `ttt serve`, and `ttt check` finds each -------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_read_only(path: Path) -> None:
    """A directory or file nobody, root included, can write (root ignores permission bits; not the immutable flag)."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only file or directory on this file system")


def valid_database(path: Path) -> bytes:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x TEXT)")
        db.executemany("INSERT INTO t VALUES (?)", [("words " * 200,)] * 200)
    db.close()
    return path.read_bytes()


def broken_database(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(database path, what the one line must say) for each way a database can be unusable."""
    if kind == "read-only directory":
        (tmp_path / "locked").mkdir()
        make_read_only(tmp_path / "locked")
        return tmp_path / "locked" / "db.sqlite3", str(tmp_path / "locked")
    if kind == "read-only file":
        valid_database(tmp_path / "locked")
        make_read_only(tmp_path / "locked")
        return tmp_path / "locked", str(tmp_path / "locked")
    if kind == "parent is a file":
        (tmp_path / "afile").write_text("not a directory")
        return tmp_path / "afile" / "db.sqlite3", f"{tmp_path / 'afile'} is a file"
    path = tmp_path / "db.sqlite3"
    if kind == "garbage":
        path.write_bytes(os.urandom(8192))
        return path, "not an SQLite database"
    data = valid_database(path)
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:  # the 100-byte header intact, the pages after the first overwritten
        path.write_bytes(data[:4096] + os.urandom(4096 * 3) + data[4096 * 4:])
    return path, "is damaged" if kind == "corrupt" else "damaged"


@pytest.fixture
def run_ttt(tmp_path, monkeypatch):
    """`ttt ARGS...` in this process: (exit code, stdout, stderr); logging is put back afterwards."""
    monkeypatch.chdir(tmp_path)
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "TTT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main(list(args))
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        return code, out.getvalue(), err.getvalue()

    yield run
    for locked in tmp_path.glob("locked"):
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)


PROGRESS = re.compile(r"\d+%\|")  # a progress bar (the default model loads meanwhile)
START_UP_FAILURES = ["read-only directory", "read-only file", "parent is a file", "garbage", "truncated", "corrupt",
                     "empty config", "unreachable discord", "no adapter", "cuda", "cuda index", "device_map",
                     "voice device"]
# A device named in the config that this machine lacks (CI has no GPU): the environment variable, and what the line names.
MISSING_DEVICES = {"cuda": ("TTT_GENERATOR__DEVICE", "cuda", "generator.device is 'cuda'"),
                   "cuda index": ("TTT_GENERATOR__DEVICE", "cuda:3", "generator.device is 'cuda:3'"),
                   "device_map": ("TTT_GENERATOR__DEVICE_MAP", "auto", "generator.device_map is 'auto'"),
                   "voice device": ("TTT_VOICE__DEVICE", "cuda:1", "voice.device is 'cuda:1'")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", START_UP_FAILURES)
def test_broken_start_up_ends_in_one_clear_line_and_check_finds_it(tmp_path, word_model_dir, run_ttt, monkeypatch,
                                                                     kind):
    config = make_config(tmp_path, word_model_dir, web={"port": 0})
    path = write_config(tmp_path, config)
    if kind == "empty config":
        path.write_text("")
        expected = "service.default_persona"
    elif kind == "unreachable discord":
        monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token-3f9a")
        url = f"http://127.0.0.1:{closed_port()}/api/v10"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "discord": {"api_base_url": url}}))
        expected = f"127.0.0.1:{url.split(':')[2].split('/')[0]}"
    elif kind == "no adapter":
        monkeypatch.setenv("TTT_WEB__ENABLED", "off")  # and no platform token
        expected = "web.enabled"
    elif kind in MISSING_DEVICES:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        name, value, expected = MISSING_DEVICES[kind]
        monkeypatch.setenv(name, value)
        if kind == "voice device":
            monkeypatch.setenv("TTT_VOICE__ENABLED", "true")
    else:
        database, expected = broken_database(tmp_path, kind)
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "database": {"path": str(database)}}))

    code, out, err = run_ttt("--config", str(path), "--log-level", "WARNING", "serve")
    lines = [line for line in (out + err).splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 2 and len(lines) == 1 and expected in lines[0], out + err
    assert "Traceback" not in out + err

    code, out, err = run_ttt("--config", str(path), "--log-level", "WARNING", "check")
    assert code == 2 and "PROBLEM:" in err and expected in err, out + err
    assert "Traceback" not in out + err


@pytest.mark.timeout(60)
def test_chat_on_an_unreachable_database_ends_in_one_clear_line(tmp_path, word_model_dir, run_ttt):
    where = f"127.0.0.1:{closed_port()}"
    config = make_config(tmp_path, word_model_dir, database={"url": f"postgresql://ttt@{where}/ttt", "timeout_s": 2})
    code, out, err = run_ttt("--config", str(write_config(tmp_path, config)), "--log-level", "WARNING", "chat")
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "cannot start" in lines[0] and where in lines[0], out + err


@pytest.mark.timeout(60)
def test_check_tells_a_missing_local_model_from_a_hub_id(tmp_path, word_model_dir, run_ttt):
    config = make_config(tmp_path, word_model_dir, web={"port": 0},
                         personas={"gone": {"model": "./personalities/gone"}, "hub": {"model": "someone/some-model"},
                                   "nogguf": {"model": "./personalities/gone.gguf"}})
    code, out, err = run_ttt("--config", str(write_config(tmp_path, config)), "check")
    assert code == 0, out + err
    gone = next(line for line in out.splitlines() if line.startswith("  gone"))
    assert "MISSING" in gone and str(tmp_path / "personalities/gone") in gone and "hub id" not in gone
    # A GGUF file that is not there is missing too, though its directory exists.
    (tmp_path / "personalities").mkdir()
    code, out, err = run_ttt("--config", str(write_config(tmp_path, config)), "check")
    nogguf = next(line for line in out.splitlines() if line.startswith("  nogguf"))
    assert "MISSING" in nogguf and str(tmp_path / "personalities/gone.gguf") in nogguf, out
    assert "hub id" in next(line for line in out.splitlines() if line.startswith("  hub"))

    config.service.default_persona = "gone"
    code, out, err = run_ttt("--config", str(write_config(tmp_path, config)), "check")
    assert code == 2 and "default persona gone" in err
