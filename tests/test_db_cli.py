"""`ttt db migrate-sqlite PATH`: a SQLite history copied into PostgreSQL, complete, in order, once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from core.config.schema import DatabaseSection
from core.conversation import ConversationKey, Turn
from core.stores.sqlite import SQLiteStore
from core.metrics import Metrics
from core.stores import open_store
from core.stores.sqlite_copy import BATCH
from pg import pg_url, postgres  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
CHANNEL = ConversationKey("discord", "10")
THREAD = ConversationKey("slack", "C1/1700000000.000100")
BULK = ConversationKey("web", "bulk")


def ttt(tmp_path: Path, *args: str, url: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if url:
        env["TTT_DATABASE__URL"] = url
    return subprocess.run([sys.executable, "-m", "ttt", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


async def history(path: Path) -> None:
    """A SQLite history: exchanges with author ids, personas, a NUL, and more turns than one batch."""
    store = await SQLiteStore(path).open()
    await store.add_turns(CHANNEL, [Turn("user", "alice", "secret", 10.0, "smol", "1"),
                                    Turn("bot", "smol", "noted", 11.0, "smol")])
    await store.add_turns(CHANNEL, [Turn("user", "bob", "hi\x00there", 12.0, "smol", "2"),
                                    Turn("bot", "smol", "hello bob", 13.0, "smol")])
    await store.add_turns(THREAD, [Turn("user", "carol", "the word is apple", 14.0, "words", "U3"),
                                   Turn("bot", "words", "apple!", 15.0, "words")])
    await store.set_persona(CHANNEL, "dialogpt")
    await store.set_persona(ConversationKey("discord", "99"), "berkeley")  # settings without turns
    await store.set_preference("server:discord:5", "persona", "smol")  # a server's settings
    await store.set_preference("listen-ignore", "42", "1")
    await store.close()
    with sqlite3.connect(path) as db:  # bulk rows straight in: thousands of fsynced calls would be slow
        db.executemany(
            "INSERT INTO turns (conversation, role, author, text, time) VALUES (?, ?, ?, ?, ?)",
            [(str(BULK), "user", "dave", f"line {i}", 100.0 + i) for i in range(BATCH + 10)],
        )


@pytest.mark.timeout(120)
async def test_migrate_sqlite_copies_everything_in_order_and_only_once(tmp_path, pg_url):
    source = tmp_path / "old.sqlite3"
    await history(source)

    result = ttt(tmp_path, "db", "migrate-sqlite", str(source), url=pg_url)
    assert result.returncode == 0, result.stderr
    total = BATCH + 16
    assert f"turns: {BATCH}/{total}" in result.stderr and f"turns: {total}/{total} (100%)" in result.stderr
    assert f"copied {total} turn(s)" in result.stdout and "0 already there" in result.stdout

    again = ttt(tmp_path, "db", "migrate-sqlite", str(source), url=pg_url)
    assert again.returncode == 0, again.stderr
    assert "copied 0 turn(s)" in again.stdout and f"{total} already there" in again.stdout

    old = await SQLiteStore(source).open()
    new = await open_store(DatabaseSection(url=pg_url), Metrics())
    try:
        for key in (CHANNEL, THREAD, BULK):
            copied = await new.recent_turns(key, 10_000)
            expected = [t if "\x00" not in t.text else Turn(t.role, t.author, t.text.replace("\x00", "\ufffd"),
                                                             t.time, t.persona, t.author_id)
                        for t in await old.recent_turns(key, 10_000)]
            assert copied == expected
        assert len(await new.recent_turns(BULK, 10_000)) == BATCH + 10
        assert await new.persona(CHANNEL) == "dialogpt"
        assert await new.persona(ConversationKey("discord", "99")) == "berkeley"
        assert await new.preferences("server:discord:5") == {"persona": "smol"}
        assert await new.preferences("listen-ignore") == {"42": "1"}
        # Exchanges came along: forgetting alice takes the bot's reply to her too, nothing else.
        assert await new.forget_author("discord", "1") == 2
        assert [t.text for t in await new.recent_turns(CHANNEL, 10)] == ["hi\ufffdthere", "hello bob"]
    finally:
        await old.close()
        await new.close()


@pytest.mark.timeout(60)
def test_migrate_sqlite_explains_what_is_missing(tmp_path, pg_url):
    missing = ttt(tmp_path, "db", "migrate-sqlite", str(tmp_path / "nope.sqlite3"), url=pg_url)
    assert missing.returncode == 2 and "nope.sqlite3 does not exist" in missing.stderr
    (tmp_path / "notes.txt").write_text("not a database")
    wrong = ttt(tmp_path, "db", "migrate-sqlite", str(tmp_path / "notes.txt"), url=pg_url)
    assert wrong.returncode == 2 and "is not a SQLite database" in wrong.stderr
    no_url = ttt(tmp_path, "db", "migrate-sqlite", str(tmp_path / "notes.txt"), url=None)
    assert no_url.returncode == 2 and "set database.url" in no_url.stderr
    for result in (missing, wrong, no_url):
        assert "Traceback" not in result.stderr
    # A wrong file changes nothing in PostgreSQL (not even the schema that opening the store creates).
    assert asyncio.run(_tables(pg_url)) == []


async def _tables(url: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    finally:
        await conn.close()
