"""The SQLite conversation store: durable, versioned, per-conversation."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from core.conversation import ConversationKey, StoreUnusable, Turn, current_session
from core.stores.sqlite import SCHEMA_VERSION, SQLiteStore

KEY = ConversationKey("discord", "channel:1")
OTHER = ConversationKey("slack", "C1/1700000000.000100")


@pytest.mark.timeout(30)
async def test_turns_settings_and_reset(tmp_path):
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    await store.add_turns(KEY, [Turn("user", "alice", "hi", 1.0), Turn("bot", "smol", "hello!", 2.0)])
    await store.add_turns(OTHER, [Turn("user", "bob", "yo", 1.5)])
    await store.set_persona(KEY, "dialogpt")
    assert [t.text for t in await store.recent_turns(KEY, 10)] == ["hi", "hello!"]
    assert [t.text for t in await store.recent_turns(KEY, 1)] == ["hello!"]
    assert await store.persona(KEY) == "dialogpt" and await store.persona(OTHER) is None
    await store.reset(KEY)
    assert await store.recent_turns(KEY, 10) == []
    assert await store.persona(KEY) == "dialogpt"  # reset forgets words, not settings
    assert len(await store.recent_turns(OTHER, 10)) == 1
    await store.close()


@pytest.mark.timeout(60)
async def test_survives_a_restart_in_a_new_process(tmp_path):
    db = tmp_path / "db.sqlite3"
    writer = textwrap.dedent(f"""
        import asyncio
        from core.conversation import ConversationKey, Turn
        from core.stores.sqlite import SQLiteStore
        async def main():
            store = await SQLiteStore({str(db)!r}).open()
            await store.add_turns(ConversationKey("web", "s1"), [Turn("user", "u", "remember me"), Turn("bot", "b", "I will")])
            await store.set_persona(ConversationKey("web", "s1"), "berkeley")
            import os; os._exit(0)  # no close(): as abrupt as a crash after the write returned
        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)
    store = await SQLiteStore(db).open()
    key = ConversationKey("web", "s1")
    assert [t.text for t in await store.recent_turns(key, 10)] == ["remember me", "I will"]
    assert await store.persona(key) == "berkeley"
    await store.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


@pytest.mark.timeout(30)
async def test_refuses_a_newer_schema(tmp_path):
    db = tmp_path / "db.sqlite3"
    with sqlite3.connect(db) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreUnusable, match="newer"):
        await SQLiteStore(db).open()


@pytest.mark.timeout(30)
def test_idle_conversation_starts_fresh():
    turns = [Turn("user", "a", "old", 0.0), Turn("bot", "b", "old reply", 10.0),
             Turn("user", "a", "new", 5000.0), Turn("bot", "b", "new reply", 5010.0)]
    assert [t.text for t in current_session(turns, idle_seconds=3600, now=5020.0)] == ["new", "new reply"]
    assert current_session(turns, idle_seconds=3600, now=9000.0) == []
    assert len(current_session(turns, idle_seconds=10_000, now=5020.0)) == 4


@pytest.mark.timeout(30)
async def test_forget_author_deletes_their_turns_and_the_replies_to_them_on_that_platform_only(tmp_path):
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    channel = ConversationKey("discord", "10")
    await store.add_turns(channel, [Turn("user", "alice", "secret", author_id="1"), Turn("bot", "smol", "noted")])
    await store.add_turns(channel, [Turn("user", "bob", "hi", author_id="2"), Turn("bot", "smol", "hello bob")])
    await store.add_turns(ConversationKey("discord", "11"), [Turn("user", "alice", "again", author_id="1")])
    await store.add_turns(ConversationKey("slack", "C1"), [Turn("user", "alice", "slack", author_id="1")])
    assert await store.forget_author("discord", "1") == 3
    assert [t.text for t in await store.recent_turns(channel, 10)] == ["hi", "hello bob"]
    assert await store.recent_turns(ConversationKey("discord", "11"), 10) == []
    assert [t.author_id for t in await store.recent_turns(ConversationKey("slack", "C1"), 10)] == ["1"]
    assert await store.forget_author("discord", "1") == 0
    await store.close()


@pytest.mark.timeout(30)
async def test_retention_deletes_only_older_turns(tmp_path):
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    await store.add_turns(KEY, [Turn("user", "a", "old", 100.0), Turn("bot", "b", "old reply", 101.0)])
    await store.add_turns(KEY, [Turn("user", "a", "new", 500.0)])
    assert await store.delete_before(200.0) == 2
    assert [t.text for t in await store.recent_turns(KEY, 10)] == ["new"]
    await store.close()


@pytest.mark.timeout(30)
async def test_claims_are_first_come_and_survive_a_restart_until_they_expire(tmp_path):
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    assert await store.claim("slack-event", "E1", 60)
    assert not await store.claim("slack-event", "E1", 60)
    assert await store.claim("other", "E1", 60)  # namespaces are separate
    assert await store.claim("short", "x", 0.0)
    await store.close()
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    assert not await store.claim("slack-event", "E1", 60)
    assert await store.claim("short", "x", 60)  # the expired claim is gone
    await store.close()


@pytest.mark.timeout(30)
async def test_count_event_allows_the_limit_then_says_how_long_to_wait(tmp_path):
    store = await SQLiteStore(tmp_path / "db.sqlite3").open()
    assert [await store.count_event("rate", "u1", 2, 60.0) for _ in range(2)] == [0.0, 0.0]
    wait = await store.count_event("rate", "u1", 2, 60.0)
    assert 0 < wait <= 60
    assert await store.count_event("rate", "u2", 2, 60.0) == 0.0
    await store.close()


@pytest.mark.timeout(30)
def test_parent_scope_is_not_part_of_the_conversation_identity():
    thread = ConversationKey("discord", "20", parent="10")
    assert thread == ConversationKey("discord", "20") and hash(thread) == hash(ConversationKey("discord", "20"))
    assert str(thread) == "discord:20" and thread.parent_key == ConversationKey("discord", "10")
    assert ConversationKey("discord", "10").parent_key is None
