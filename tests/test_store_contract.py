"""The ConversationStore contract, run against every store: SQLite and PostgreSQL (a real server)."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import textwrap
import time

import asyncpg
import yaml
import pytest

from core.config.schema import DatabaseSection
from core.conversation import ConversationBusy, ConversationKey, StoreUnusable, Turn
from core.metrics import Metrics
from core.stores import open_store
from pg import pg_url, postgres  # noqa: F401 (fixtures)

KEY = ConversationKey("discord", "channel:1")
OTHER = ConversationKey("slack", "C1/1700000000.000100")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> DatabaseSection:
    """Where a test's stores live; every store opened on it sees the same data."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return DatabaseSection(path=tmp_path / "db.sqlite3", url=url, lock_wait_s=5)


@pytest.fixture
async def opened(database):
    """open(**changes) -> a store on the test's database; all are closed at the end."""
    stores = []

    async def open_(**changes):
        store = await open_store(database.model_copy(update=changes), Metrics())
        stores.append(store)
        return store

    async def close(store) -> None:
        stores.remove(store)
        await store.close()

    open_.close = close
    yield open_
    for store in stores:
        await store.close()


@pytest.fixture
async def store(opened):
    return await opened()


def texts(turns: list[Turn]) -> list[str]:
    return [t.text for t in turns]


@pytest.mark.timeout(30)
async def test_turns_come_back_in_order_and_trimmed_to_the_newest(store):
    await store.add_turns(KEY, [Turn("user", "alice", "hi", 1.0, author_id="7"), Turn("bot", "smol", "hello!", 2.0,
                                                                                         persona="smol")])
    for i in range(5):
        await store.add_turns(KEY, [Turn("user", "alice", f"n{i} — ünïcode ✓", 3.0 + i)])
    await store.add_turns(OTHER, [Turn("user", "bob", "yo", 1.5)])
    assert texts(await store.recent_turns(KEY, 3)) == ["n2 — ünïcode ✓", "n3 — ünïcode ✓", "n4 — ünïcode ✓"]
    first, second = (await store.recent_turns(KEY, 100))[:2]
    assert first == Turn("user", "alice", "hi", 1.0, None, "7")
    assert second == Turn("bot", "smol", "hello!", 2.0, "smol", None)
    assert texts(await store.recent_turns(OTHER, 10)) == ["yo"]
    assert await store.recent_turns(ConversationKey("web", "nobody"), 10) == []


@pytest.mark.timeout(30)
async def test_persona_per_conversation_and_reset_keeps_it(store):
    await store.add_turns(KEY, [Turn("user", "alice", "hi", 1.0)])
    await store.set_persona(KEY, "dialogpt")
    await store.set_persona(OTHER, "smol")  # a conversation without turns can have a persona
    assert await store.persona(KEY) == "dialogpt" and await store.persona(OTHER) == "smol"
    assert await store.persona(ConversationKey("web", "new")) is None
    await store.reset(KEY)
    assert await store.recent_turns(KEY, 10) == []
    assert await store.persona(KEY) == "dialogpt"  # reset forgets words, not settings
    await store.set_persona(KEY, None)
    assert await store.persona(KEY) is None


@pytest.mark.timeout(30)
async def test_retention_deletes_only_older_turns(store):
    await store.add_turns(KEY, [Turn("user", "a", "old", 100.0), Turn("bot", "b", "old reply", 101.0)])
    await store.add_turns(OTHER, [Turn("user", "a", "old elsewhere", 150.0)])
    await store.add_turns(KEY, [Turn("user", "a", "new", 500.0)])
    assert await store.delete_before(200.0) == 3
    assert texts(await store.recent_turns(KEY, 10)) == ["new"]
    assert await store.delete_before(200.0) == 0


@pytest.mark.timeout(30)
async def test_forget_author_deletes_their_exchanges_on_that_platform_only(store):
    channel = ConversationKey("discord", "10")
    await store.add_turns(channel, [Turn("user", "alice", "secret", author_id="1"), Turn("bot", "smol", "noted")])
    await store.add_turns(channel, [Turn("user", "bob", "hi", author_id="2"), Turn("bot", "smol", "hello bob")])
    await store.add_turns(ConversationKey("discord", "11"), [Turn("user", "alice", "again", author_id="1")])
    await store.add_turns(ConversationKey("slack", "C1"), [Turn("user", "alice", "slack", author_id="1")])
    await store.add_turns(ConversationKey("discordx", "1"), [Turn("user", "alice", "look-alike", author_id="1")])
    assert await store.forget_author("discord", "1") == 3
    assert texts(await store.recent_turns(channel, 10)) == ["hi", "hello bob"]
    assert await store.recent_turns(ConversationKey("discord", "11"), 10) == []
    assert texts(await store.recent_turns(ConversationKey("slack", "C1"), 10)) == ["slack"]
    assert texts(await store.recent_turns(ConversationKey("discordx", "1"), 10)) == ["look-alike"]
    assert await store.forget_author("discord", "1") == 0


@pytest.mark.timeout(30)
async def test_claims_are_first_come_and_survive_a_restart_until_they_expire(opened):
    store = await opened()
    assert await store.claim("slack-event", "E1", 60)
    assert not await store.claim("slack-event", "E1", 60)
    assert await store.claim("other", "E1", 60)  # namespaces are separate
    assert await store.claim("short", "x", 0.0)
    await opened.close(store)
    store = await opened()
    assert not await store.claim("slack-event", "E1", 60)
    assert await store.claim("short", "x", 60)  # the expired claim is gone
    assert not await store.claim("short", "x", 60)


@pytest.mark.timeout(30)
async def test_preferences_are_kept_per_namespace_changed_dropped_and_survive_a_restart(opened):
    store = await opened()
    assert await store.preferences("listen-ignore") == {}
    await store.set_preference("listen-ignore", "42", "1")
    await store.set_preference("listen-ignore", "43", "1")
    await store.set_preference("other", "42", "x")
    await store.set_preference("listen-ignore", "43", "yes")  # changed in place
    await opened.close(store)
    store = await opened()
    assert await store.preferences("listen-ignore") == {"42": "1", "43": "yes"}
    await store.set_preference("listen-ignore", "42", None)
    await store.set_preference("listen-ignore", "404", None)  # dropping what is not there is fine
    assert await store.preferences("listen-ignore") == {"43": "yes"}
    assert await store.preferences("other") == {"42": "x"}


@pytest.mark.timeout(60)
async def test_tokens_are_counted_per_person_server_and_day_atomically_across_stores(opened, database):
    day, next_day = datetime.date(2031, 5, 6), datetime.date(2031, 5, 7)
    first = await opened()
    # A second store on the same database is another replica (PostgreSQL); SQLite has one owner.
    second = await opened() if database.url else first
    await asyncio.gather(*(store.add_tokens("discord:1", person, day, 3)
                           for store in (first, second) for person in ("alice", "bob") for _ in range(20)))
    await first.add_tokens("discord:1", "", day, 5)  # nobody in particular: the server's count only
    await first.add_tokens("discord:2", "alice", day, 7)
    await first.add_tokens("discord:1", "alice", next_day, 11)
    assert await second.tokens_used("discord:1", "alice", day) == (120, 245)
    assert await first.tokens_used("discord:2", "alice", day) == (7, 7)
    assert await first.tokens_used("discord:1", "alice", next_day) == (11, 11)
    assert await first.tokens_used("discord:1", "carol", day) == (0, 245)
    assert await first.tokens_used("slack:T1", "alice", day) == (0, 0)
    await opened.close(first)
    if second is not first:
        await opened.close(second)
    store = await opened()  # the counts survive a restart
    assert await store.tokens_used("discord:2", "alice", day) == (7, 7)
    # Retention deletes the counts of the days before the cutoff's day, not that day's.
    midday_next = datetime.datetime(2031, 5, 7, 12, tzinfo=datetime.timezone.utc).timestamp()
    await store.delete_before(midday_next)
    assert await store.tokens_used("discord:2", "alice", day) == (0, 0)
    assert await store.tokens_used("discord:1", "alice", next_day) == (11, 11)


@pytest.mark.timeout(30)
async def test_count_event_allows_the_limit_then_says_how_long_to_wait(store):
    assert [await store.count_event("rate", "u1", 2, 60.0) for _ in range(2)] == [0.0, 0.0]
    wait = await store.count_event("rate", "u1", 2, 60.0)
    assert 0 < wait <= 60
    assert await store.count_event("rate", "u2", 2, 60.0) == 0.0
    assert await store.count_event("other", "u1", 2, 60.0) == 0.0
    # A short window frees up again once its oldest event is out of it.
    assert await store.count_event("burst", "u1", 1, 0.2) == 0.0
    wait = await store.count_event("burst", "u1", 1, 0.2)
    assert 0 < wait <= 0.2
    await asyncio.sleep(wait + 0.05)  # the window itself is what is under test
    assert await store.count_event("burst", "u1", 1, 0.2) == 0.0


@pytest.mark.timeout(30)
async def test_lock_serves_one_conversation_at_a_time_in_arrival_order(store):
    order: list[str] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold(name: str, key: ConversationKey) -> None:
        async with store.lock(key):
            order.append(name)
            if name == "first":
                inside.set()
                await release.wait()

    first = asyncio.create_task(hold("first", KEY))
    await inside.wait()
    waiting = []
    for name in ("second", "third", "fourth"):
        waiting.append(asyncio.create_task(hold(name, KEY)))
        await asyncio.sleep(0)  # each asks before the next
    other = asyncio.create_task(hold("other-conversation", OTHER))
    await asyncio.wait_for(other, 5)
    assert order == ["first", "other-conversation"]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
    assert order == ["first", "other-conversation", "second", "third", "fourth"]


@pytest.mark.timeout(30)
async def test_lock_wait_is_bounded_and_the_holder_keeps_the_conversation(opened):
    store = await opened(lock_wait_s=0.3)
    held = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with store.lock(KEY):
            held.set()
            await done.wait()
            await store.add_turns(KEY, [Turn("user", "a", "kept")])

    task = asyncio.create_task(holder())
    await held.wait()
    started = time.monotonic()
    with pytest.raises(ConversationBusy):
        async with store.lock(KEY):
            pytest.fail("a second holder got in")
    assert time.monotonic() - started < 5
    done.set()
    await asyncio.wait_for(task, 5)
    async with store.lock(KEY):  # free again after a refused wait
        assert texts(await store.recent_turns(KEY, 10)) == ["kept"]


@pytest.mark.timeout(30)
async def test_health_reports_the_backend(store, database):
    health = await store.health()
    assert health["ok"] is True
    assert health["backend"] == ("postgresql" if database.url else "sqlite")


@pytest.mark.timeout(60)
async def test_an_answered_turn_survives_the_writer_dying_right_after(database, opened):
    writer = textwrap.dedent(f"""
        import asyncio, os
        from core.config.schema import DatabaseSection
        from core.conversation import ConversationKey, Turn
        from core.metrics import Metrics
        from core.stores import open_store
        async def main():
            store = await open_store(DatabaseSection.model_validate_json({database.model_dump_json()!r}), Metrics())
            await store.add_turns(ConversationKey("web", "s1"), [Turn("user", "u", "remember me"), Turn("bot", "b", "I will")])
            await store.set_persona(ConversationKey("web", "s1"), "berkeley")
            os._exit(0)  # no close(): as abrupt as a crash after the write returned
        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)
    store = await opened()
    key = ConversationKey("web", "s1")
    assert texts(await store.recent_turns(key, 10)) == ["remember me", "I will"]
    assert await store.persona(key) == "berkeley"


@pytest.mark.timeout(60)
async def test_postgres_migrations_run_once_when_replicas_start_together(pg_url):
    from core.stores.postgres_schema import SCHEMA_VERSION

    database = DatabaseSection(url=pg_url)
    stores = await asyncio.gather(*(open_store(database, Metrics()) for _ in range(4)))
    try:
        await stores[0].add_turns(KEY, [Turn("user", "a", "hi")])
        assert texts(await stores[3].recent_turns(KEY, 10)) == ["hi"]
    finally:
        for store in stores:
            await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


@pytest.mark.timeout(60)
async def test_postgres_refuses_a_newer_schema(pg_url):
    from core.stores.postgres_schema import SCHEMA_VERSION

    store = await open_store(DatabaseSection(url=pg_url), Metrics())
    await store.close()
    conn = await asyncpg.connect(pg_url)
    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", SCHEMA_VERSION + 1)
    await conn.close()
    with pytest.raises(StoreUnusable, match=r"PostgreSQL at .*newer than this release"):
        await open_store(DatabaseSection(url=pg_url), Metrics())


@pytest.mark.timeout(60)
async def test_postgres_metrics_show_pool_usage_and_lock_waits(pg_url):
    metrics = Metrics()
    store = await open_store(DatabaseSection(url=pg_url), metrics)

    def sample(name: str, **labels) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    try:
        async with store.lock(KEY):
            assert sample("ttt_db_pool_in_use", pool="lock") == 1
            assert (await store.health())["pools"]["lock"]["in_use"] == 1
        assert sample("ttt_db_pool_in_use", pool="lock") == 0
        assert sample("ttt_db_pool_max", pool="query") == 10
        assert sample("ttt_db_lock_wait_seconds_count") == 1
        assert sample("ttt_db_unavailable_total") == 0
    finally:
        await store.close()


@pytest.mark.timeout(120)
async def test_postgres_going_away_raises_store_unavailable_quickly_and_recovers_by_itself(pg_url, postgres):
    from core.conversation import StoreUnavailable

    metrics = Metrics()
    store = await open_store(DatabaseSection(url=pg_url, timeout_s=2), metrics)
    try:
        await store.add_turns(KEY, [Turn("user", "a", "before")])
        async with store.lock(KEY):  # a reply in progress when the database goes away
            postgres.stop()
            try:
                for call in (lambda: store.add_turns(KEY, [Turn("user", "a", "lost")]),
                             lambda: store.recent_turns(KEY, 10), lambda: store.claim("e", "1", 60),
                             lambda: store.count_event("r", "u", 3, 60.0), lambda: store.persona(KEY)):
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable, match="PostgreSQL at 127.0.0.1"):
                        await call()
                    assert time.monotonic() - started < 5
                with pytest.raises(StoreUnavailable):
                    async with store.lock(OTHER):
                        pass
                health = await store.health()
                assert health["ok"] is False and "PostgreSQL at" in health["problem"]
            finally:
                postgres.start()
        assert metrics.registry.get_sample_value("ttt_db_unavailable_total") >= 6
        # Back without reopening: the pools reconnect on their own.
        await store.add_turns(KEY, [Turn("user", "a", "after")])
        assert texts(await store.recent_turns(KEY, 10)) == ["before", "after"]
        async with store.lock(KEY):
            assert (await store.health())["ok"] is True
    finally:
        await store.close()


@pytest.mark.timeout(60)
async def test_postgres_open_says_why_it_cannot(postgres):
    from core.conversation import StoreUnavailable

    with pytest.raises(StoreUnusable, match='PostgreSQL at 127.0.0.1:.*/nosuchdb: database "nosuchdb" does not exist'):
        await open_store(DatabaseSection(url=postgres.url("nosuchdb")), Metrics())
    closed_port = postgres.url("postgres").replace(f":{postgres.port}/", ":1/")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="PostgreSQL at 127.0.0.1:1/postgres"):
        await open_store(DatabaseSection(url=closed_port, timeout_s=2), Metrics())
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
async def test_check_database_finds_what_would_stop_the_store_and_changes_nothing(tmp_path, postgres, pg_url):
    from core.stores import check_database
    from core.stores.postgres_schema import SCHEMA_VERSION

    assert await check_database(DatabaseSection(path=tmp_path / "new.sqlite3")) is None
    assert not (tmp_path / "new.sqlite3").exists()
    assert await check_database(DatabaseSection(url=pg_url)) is None
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None  # nothing created
        await conn.execute("CREATE TABLE schema_migrations (version integer)")
        await conn.execute("INSERT INTO schema_migrations VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    assert "newer than this release" in await check_database(DatabaseSection(url=pg_url))
    assert 'database "nosuchdb" does not exist' in await check_database(DatabaseSection(url=postgres.url("nosuchdb")))
    closed_port = postgres.url("postgres").replace(f":{postgres.port}/", ":1/")
    assert "PostgreSQL at 127.0.0.1:1/postgres" in await check_database(DatabaseSection(url=closed_port))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url", ["postgresql://ttt:hunter2-secret@db:5432/ttt",
                                 "postgres://ttt@db/ttt?sslmode=require&password=hunter2-secret"])
def test_a_database_url_with_a_password_is_refused_without_showing_it(tmp_path, url):
    from core.config.loading import ConfigError, load_settings

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url}}))
    for environ in ({}, {"TTT_DATABASE__URL": url}):
        with pytest.raises(ConfigError) as info:
            load_settings(path if not environ else None, environ=environ)
        message = str(info.value)
        assert "must not contain a password" in message and "TTT_DATABASE_PASSWORD" in message
        assert "hunter2" not in message


@pytest.mark.timeout(30)
def test_the_database_password_comes_from_the_environment_as_a_secret(tmp_path):
    from core.config.loading import load_settings

    settings = load_settings(None, environ={"TTT_DATABASE__URL": "postgresql://ttt@db/ttt",
                                            "TTT_DATABASE_PASSWORD": "hunter2-secret"})
    assert settings.config.database.url == "postgresql://ttt@db/ttt"
    assert settings.secrets.get("TTT_DATABASE_PASSWORD") == "hunter2-secret"
    assert "hunter2" not in repr(settings.secrets)
