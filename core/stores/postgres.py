"""ConversationStore on PostgreSQL: what several `ttt serve` replicas share.

Turns, personas, claims (event dedupe) and rate-limit counters are rows; per-conversation order
is a session advisory lock, held for the whole reply on a connection of its own (a second pool,
so that replies holding locks can never starve the reads and writes they still need).

Every call is bounded (connect, statement and lock-wait timeouts); when the database cannot be
reached the call raises StoreUnavailable, and the pools reconnect by themselves once it is back.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator, Sequence
from urllib.parse import urlsplit

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.budgets import utc_day
from core.config.schema import DatabaseSection
from core.conversation import ConversationBusy, ConversationKey, StoreUnavailable, StoreUnusable, Turn
from core.stores.locks import KeyedLocks
from core.stores.postgres_schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

# What a lost or refused database looks like to asyncpg (InterfaceError: "connection is closed").
UNREACHABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
)
SWEEP_EVERY_S = 60.0
QUEUE_POLL_S = 0.005  # while a contended lock request is not yet in PostgreSQL's queue  # how often a replica deletes expired claims and rate counters
LOCK_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.25, 1, 2.5, 5, 15, 30, 60, 120, 300)

_TURN_COLUMNS = "role, author, text, time, persona, author_id"


def lock_id(key: ConversationKey) -> int:
    """The advisory lock number of a conversation (a 64-bit hash of its key)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "big", signed=True)


def describe(url: str) -> str:
    """`PostgreSQL at HOST:PORT/DB`, for messages (the URL never holds a password)."""
    parts = urlsplit(url)
    return f"PostgreSQL at {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


class PostgresStore:
    """ConversationStore on one PostgreSQL database; `open()` connects and migrates."""

    def __init__(self, database: DatabaseSection, *, password: str | None = None,
                 registry: CollectorRegistry | None = None):
        if not database.url:
            raise ValueError("PostgresStore needs database.url")
        self.url = database.url
        self.where = describe(database.url)
        self._password = password
        self._settings = database
        self._timeout = database.timeout_s
        self._pool: asyncpg.Pool | None = None  # short reads and writes
        self._lock_pool: asyncpg.Pool | None = None  # sessions holding conversation locks
        self._local = KeyedLocks()  # this process's callers join a conversation's queue one at a time
        self._swept = 0.0
        self.metrics = StoreMetrics(self, registry or CollectorRegistry())

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> "PostgresStore":
        """Connect both pools and apply missing migrations.

        Raises StoreUnavailable when the server cannot be reached, StoreUnusable when it refuses
        (credentials, no such database) or holds a newer schema.
        """
        db = self._settings
        common = dict(dsn=self.url, password=self._password, timeout=self._timeout, command_timeout=self._timeout,
                      server_settings={"application_name": "ttt"})
        try:
            with self._reachable():
                self._pool = await asyncpg.create_pool(min_size=1, max_size=db.pool_size, reset=_keep_session,
                                                       **common)
                self._lock_pool = await asyncpg.create_pool(min_size=0, max_size=db.lock_pool_size, **common)
                async with self.connection() as conn:
                    applied = await migrate(conn)
        except asyncpg.PostgresError as exc:  # refused: a wrong password, no such database or role
            await self.close()
            raise StoreUnusable(f"{self.where}: {exc}") from None
        except StoreUnusable as exc:
            await self.close()
            raise StoreUnusable(f"{self.where}: {exc}") from None
        except BaseException:
            await self.close()
            raise
        log.info("conversation store: %s (%d migration(s) applied)", self.where, applied)
        return self

    async def close(self) -> None:
        for pool in (self._lock_pool, self._pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), self._timeout)
                except (asyncio.TimeoutError, *UNREACHABLE):
                    pool.terminate()
        self._pool = self._lock_pool = None

    async def health(self) -> dict:
        started = time.monotonic()
        try:
            await self._fetchval("SELECT 1")
        except StoreUnavailable as exc:
            return {"backend": "postgresql", "ok": False, "problem": str(exc)}
        return {"backend": "postgresql", "ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 2),
                "pools": self.metrics.pool_usage()}

    # ---- turns and settings ----------------------------------------------------------------

    async def recent_turns(self, key: ConversationKey, limit: int) -> list[Turn]:
        rows = await self._fetch(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE conversation = $1 ORDER BY id DESC LIMIT $2", str(key), limit
        )
        return [Turn(*row) for row in reversed(rows)]

    async def add_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        if not turns:
            return
        # One statement (so one transaction, one round trip): the conversation is touched and the
        # exchange appended together; autocommit returns once the commit is durable.
        await self._execute(
            "WITH touched AS (INSERT INTO conversations (key, updated_at) VALUES ($1, $2) "
            "  ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at) "
            "INSERT INTO turns (conversation, role, author, text, time, persona, author_id, exchange) "
            "SELECT $1, role, author, text, time, persona, author_id, $9 "
            "FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[], $7::text[], $8::text[]) "
            "  WITH ORDINALITY AS t(role, author, text, time, persona, author_id, n) ORDER BY n",
            str(key), turns[-1].time,
            [t.role for t in turns], [storable(t.author) for t in turns], [storable(t.text) for t in turns],
            [t.time for t in turns],
            [t.persona for t in turns], [t.author_id for t in turns],
            uuid.uuid4().hex,  # the turns of one call answer each other: "forget me" deletes them together
        )

    async def reset(self, key: ConversationKey) -> None:
        await self._execute("DELETE FROM turns WHERE conversation = $1", str(key))

    async def persona(self, key: ConversationKey) -> str | None:
        return await self._fetchval("SELECT persona FROM conversations WHERE key = $1", str(key))

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        await self._execute(
            "INSERT INTO conversations (key, persona, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (key) DO UPDATE SET persona = excluded.persona, updated_at = excluded.updated_at",
            str(key), persona, time.time(),
        )

    async def forget_author(self, platform: str, author_id: str) -> int:
        status = await self._execute(
            "WITH theirs AS (SELECT id, exchange FROM turns WHERE author_id = $1 AND starts_with(conversation, $2)) "
            "DELETE FROM turns WHERE id IN (SELECT id FROM theirs) "
            "OR exchange IN (SELECT exchange FROM theirs WHERE exchange IS NOT NULL)",
            author_id, f"{platform}:",
        )
        return _row_count(status)

    async def delete_before(self, cutoff: float) -> int:
        return _row_count(await self._execute(
            "WITH counts AS (DELETE FROM token_usage WHERE day < $2) DELETE FROM turns WHERE time < $1",
            cutoff, utc_day(cutoff),
        ))

    async def add_tokens(self, server: str, person: str, day: datetime.date, tokens: int) -> None:
        await self._execute(
            "INSERT INTO token_usage (server, day, person, tokens) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (server, day, person) DO UPDATE SET tokens = token_usage.tokens + excluded.tokens",
            storable(server), day, storable(person), tokens,
        )

    async def tokens_used(self, server: str, person: str, day: datetime.date) -> tuple[int, int]:
        row = await self._fetchrow(
            "SELECT coalesce(sum(tokens) FILTER (WHERE person = $3), 0), coalesce(sum(tokens), 0) "
            "FROM token_usage WHERE server = $1 AND day = $2",
            storable(server), day, storable(person),
        )
        return int(row[0]), int(row[1])

    # ---- what replicas coordinate on -------------------------------------------------------

    async def preferences(self, namespace: str) -> dict[str, str]:
        rows = await self._fetch("SELECT ident, value FROM preferences WHERE namespace = $1", namespace)
        return {row["ident"]: row["value"] for row in rows}

    async def set_preference(self, namespace: str, ident: str, value: str | None) -> None:
        if value is None:
            await self._execute("DELETE FROM preferences WHERE namespace = $1 AND ident = $2", namespace, ident)
        else:
            await self._execute(
                "INSERT INTO preferences (namespace, ident, value) VALUES ($1, $2, $3) "
                "ON CONFLICT (namespace, ident) DO UPDATE SET value = excluded.value",
                namespace, ident, storable(value),
            )

    async def claim(self, namespace: str, ident: str, ttl_s: float) -> bool:
        await self._sweep()
        # An expired claim is taken over in the same statement; the database's clock decides.
        taken = await self._fetchval(
            "INSERT INTO claims (namespace, ident, expires) "
            "VALUES ($1, $2, extract(epoch FROM clock_timestamp()) + $3) "
            "ON CONFLICT (namespace, ident) DO UPDATE SET expires = excluded.expires "
            "WHERE claims.expires < extract(epoch FROM clock_timestamp()) RETURNING true",
            namespace, ident, float(ttl_s),
        )
        return bool(taken)

    async def count_event(self, namespace: str, ident: str, limit: int, window_s: float) -> float:
        await self._sweep()
        return await self._fetchval("SELECT ttt_count_event($1, $2, $3, $4)", namespace, ident, limit, float(window_s))

    @asynccontextmanager
    async def lock(self, key: ConversationKey) -> AsyncIterator[None]:
        started = time.monotonic()
        conn = await self._locked(key)
        self.metrics.lock_wait.observe(time.monotonic() - started)
        try:
            yield
        finally:
            await self._unlock(key, conn)

    async def _locked(self, key: ConversationKey) -> asyncpg.Connection:
        """A lock-pool connection whose session holds the conversation's advisory lock.

        Every waiter waits in PostgreSQL, which grants the lock in the order it was asked for,
        across replicas; callers in this process enter that queue one after the other, in the
        order they called (the next one asks once the previous one holds the lock or waits for it).
        """
        wait_s = self._settings.lock_wait_s
        deadline = time.monotonic() + wait_s
        conn = granted = None
        try:
            async with self._local.hold(key, wait_s):
                with self._reachable():
                    conn = await self._lock_pool.acquire(timeout=wait_s)
                left = max(0.001, deadline - time.monotonic())
                granted = asyncio.ensure_future(conn.execute(
                    f"SET lock_timeout = {int(left * 1000) + 1}; SELECT pg_advisory_lock({lock_id(key)})",
                    timeout=left + self._timeout,
                ))
                await asyncio.wait({granted}, timeout=QUEUE_POLL_S)  # a free lock is granted at once
                while not granted.done() and not await self._waiting(conn.get_server_pid()):
                    await asyncio.wait({granted}, timeout=QUEUE_POLL_S)
            with self._reachable():
                await granted
        except asyncpg.exceptions.LockNotAvailableError:
            self.metrics.lock_timeouts.inc()
            await self._unlock(key, conn)
            raise ConversationBusy(f"{key} stayed busy for {wait_s:g} s") from None
        except ConversationBusy:  # this process's earlier callers did not get into the queue in time
            self.metrics.lock_timeouts.inc()
            raise
        except BaseException:
            if granted is not None:
                granted.cancel()  # asyncpg asks the server to cancel the wait
                await asyncio.gather(granted, return_exceptions=True)
            if conn is not None:
                await self._unlock(key, conn)
            raise
        return conn

    async def _waiting(self, pid: int) -> bool:
        """Whether that session is in the queue of an advisory lock."""
        return await self._fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted)", pid
        )

    async def _unlock(self, key: ConversationKey, conn: asyncpg.Connection) -> None:
        # Giving the connection back resets its session, which releases the advisory lock; a lost
        # connection released it already (the server ends the session).
        try:
            await self._lock_pool.release(conn, timeout=self._timeout)
        except (asyncio.TimeoutError, *UNREACHABLE) as exc:
            log.warning("the lock session of %s ended with the connection: %s", key, exc)

    # ---- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost or refused database into StoreUnavailable (saying where, never a password)."""
        try:
            yield
        except UNREACHABLE as exc:
            self.metrics.unavailable.inc()
            reason = str(exc) or ("timed out" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__)
            raise StoreUnavailable(f"{self.where}: {reason}") from None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (bulk work: `ttt db`); a lost database raises StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable(f"{self.where}: the store is closed")
        with self._reachable():
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn

    async def _fetch(self, query: str, *args) -> list:
        async with self.connection() as conn:
            return await conn.fetch(query, *args)

    async def _fetchrow(self, query: str, *args):
        async with self.connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args):
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def _execute(self, query: str, *args) -> str:
        async with self.connection() as conn:
            return await conn.execute(query, *args)

    async def _sweep(self) -> None:
        """Now and then, delete expired claims and rate counters (expired ones no longer count anyway)."""
        if time.monotonic() - self._swept < SWEEP_EVERY_S:
            return
        self._swept = time.monotonic()
        await self._execute(
            "WITH c AS (DELETE FROM claims WHERE expires < extract(epoch FROM clock_timestamp())) "
            "DELETE FROM rate_events WHERE expires < extract(epoch FROM clock_timestamp())"
        )


async def check_postgres(database: DatabaseSection, password: str | None) -> str | None:
    """Why PostgreSQL at database.url cannot serve as the store now (unreachable, refused, a newer
    schema); None when it can. Connects once and changes nothing."""
    where = describe(database.url)
    try:
        conn = await asyncpg.connect(database.url, password=password, timeout=database.timeout_s,
                                     command_timeout=database.timeout_s)
    except (asyncpg.PostgresError, *UNREACHABLE) as exc:
        return f"{where}: {str(exc) or type(exc).__name__}"
    try:
        version = 0
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is not None:
            version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
    except (asyncpg.PostgresError, *UNREACHABLE) as exc:
        return f"{where}: {str(exc) or type(exc).__name__}"
    finally:
        conn.terminate()
    if version > SCHEMA_VERSION:
        return f"{where}: schema version {version}, newer than this release knows ({SCHEMA_VERSION})"
    return None


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The read/write pool sets no session state: giving a connection back needs no reset query."""


def storable(text: str) -> str:
    """PostgreSQL text cannot hold NUL: it is kept as U+FFFD rather than refusing the turn."""
    return text.replace("\x00", "\ufffd")


def _row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


class StoreMetrics:
    """ttt_db_* metrics: pool usage (read at scrape time), lock waits, unreachable calls."""

    def __init__(self, store: PostgresStore, registry: CollectorRegistry):
        self._store = store
        self.lock_wait = Histogram(
            "ttt_db_lock_wait_seconds", "Wait for a conversation's lock (its earlier reply, on any replica)",
            buckets=LOCK_WAIT_BUCKETS, registry=registry,
        )
        self.lock_timeouts = Counter(
            "ttt_db_lock_timeouts", "Replies refused because the conversation stayed busy past database.lock_wait_s",
            registry=registry,
        )
        self.unavailable = Counter(
            "ttt_db_unavailable", "Store calls that failed because the database could not be reached", registry=registry
        )
        registry.register(_PoolCollector(self))

    def pool_usage(self) -> dict[str, dict[str, int]]:
        """{"query"|"lock": {"open", "in_use", "max"}} for each open pool."""
        usage = {}
        for name, pool in (("query", self._store._pool), ("lock", self._store._lock_pool)):
            if pool is not None:
                size = pool.get_size()
                usage[name] = {"open": size, "in_use": size - pool.get_idle_size(), "max": pool.get_max_size()}
        return usage


class _PoolCollector(Collector):
    def __init__(self, metrics: StoreMetrics):
        self._metrics = metrics

    def collect(self):
        in_use = GaugeMetricFamily("ttt_db_pool_in_use", "PostgreSQL connections in use", labels=["pool"])
        open_ = GaugeMetricFamily("ttt_db_pool_open", "PostgreSQL connections open", labels=["pool"])
        most = GaugeMetricFamily("ttt_db_pool_max", "PostgreSQL connections allowed", labels=["pool"])
        for name, usage in self._metrics.pool_usage().items():
            in_use.add_metric([name], usage["in_use"])
            open_.add_metric([name], usage["open"])
            most.add_metric([name], usage["max"])
        yield from (in_use, open_, most)
