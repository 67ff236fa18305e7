"""The embedded conversation store: one SQLite file (WAL), used from one dedicated thread."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import AsyncContextManager, Sequence

from core.budgets import utc_day
from core.conversation import ConversationKey, StoreUnusable, Turn
from core.stores.locks import KeyedLocks
from core.stores.ratelimit import RateLimiter

_MIGRATIONS = [
    """
    CREATE TABLE conversations (
        key TEXT PRIMARY KEY,
        persona TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        author TEXT NOT NULL,
        text TEXT NOT NULL,
        time REAL NOT NULL,
        persona TEXT
    );
    CREATE INDEX turns_by_conversation ON turns (conversation, id);
    """,
    """
    ALTER TABLE turns ADD COLUMN author_id TEXT;
    ALTER TABLE turns ADD COLUMN exchange TEXT;
    CREATE INDEX turns_by_author ON turns (author_id) WHERE author_id IS NOT NULL;
    CREATE INDEX turns_by_time ON turns (time);
    CREATE TABLE claims (
        namespace TEXT NOT NULL,
        ident TEXT NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY (namespace, ident)
    );
    """,
    """
    CREATE TABLE preferences (
        namespace TEXT NOT NULL,
        ident TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, ident)
    );
    """,
    """
    CREATE TABLE token_usage (
        server TEXT NOT NULL,
        day TEXT NOT NULL,  -- a UTC date, YYYY-MM-DD
        person TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (server, day, person)
    );
    CREATE INDEX token_usage_by_day ON token_usage (day);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


class SQLiteStore:
    """ConversationStore on one SQLite file (WAL), used from one dedicated thread.

    One process owns the file, so ordering locks and rate-limit counters live in its memory;
    claims are in the file, so a restarted process still knows what it answered. Deleted words are
    overwritten (`secure_delete`), and whatever deletes people's words (forget-me, a reset, the
    retention sweep) also checkpoints the write-ahead log and truncates it, so the words are gone
    from the files at once, not at the next clean shutdown.
    """

    def __init__(self, path: Path, lock_wait_s: float | None = None):
        self.path = Path(path)
        self.lock_wait_s = lock_wait_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._locks = KeyedLocks()
        self._limiters: dict[tuple[str, int, float], RateLimiter] = {}

    async def open(self) -> "SQLiteStore":
        """Open (creating or migrating) the database; raises StoreUnusable saying what is wrong with it."""
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        return self

    def _open(self) -> None:
        problem = _unusable_parent(self.path)
        if problem:
            raise StoreUnusable(f"database {self.path}: {problem}")
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreUnusable(
                    f"database {self.path} has schema version {version}, newer than this release knows "
                    f"({SCHEMA_VERSION})"
                )
            _check_integrity(db, self.path)
            for number in range(version, SCHEMA_VERSION):
                db.executescript("BEGIN;" + _MIGRATIONS[number] + f"PRAGMA user_version={number + 1}; COMMIT;")
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise StoreUnusable(f"database {self.path}: {_explain(exc)}") from None
        except StoreUnusable:
            db.close()
            raise
        self._db = db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def recent_turns(self, key: ConversationKey, limit: int) -> list[Turn]:
        def query() -> list[Turn]:
            rows = self._db.execute(
                "SELECT role, author, text, time, persona, author_id FROM turns WHERE conversation = ? "
                "ORDER BY id DESC LIMIT ?",
                (str(key), limit),
            ).fetchall()
            return [Turn(*row) for row in reversed(rows)]

        return await self._run(query)

    async def add_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        exchange = uuid.uuid4().hex  # the turns of one call answer each other: "forget me" deletes them together

        def write() -> None:
            with self._transaction():
                self._touch(key, turns[-1].time if turns else time.time())
                self._db.executemany(
                    "INSERT INTO turns (conversation, role, author, text, time, persona, author_id, exchange) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(str(key), t.role, t.author, t.text, t.time, t.persona, t.author_id, exchange) for t in turns],
                )

        await self._run(write)

    async def forget_author(self, platform: str, author_id: str) -> int:
        scope = (f"{platform}:", f"{platform};")  # every key "platform:..." sorts in [platform:, platform;)

        def write() -> int:
            with self._transaction():
                deleted = self._db.execute(
                    "DELETE FROM turns WHERE exchange IN (SELECT exchange FROM turns WHERE author_id = ? "
                    "AND conversation >= ? AND conversation < ?)",
                    (author_id, *scope),
                ).rowcount
            self._erase_log()
            return deleted

        return await self._run(write)

    async def delete_before(self, cutoff: float) -> int:
        def write() -> int:
            with self._transaction():
                self._db.execute("DELETE FROM token_usage WHERE day < ?", (utc_day(cutoff).isoformat(),))
                deleted = self._db.execute("DELETE FROM turns WHERE time < ?", (cutoff,)).rowcount
            if deleted:
                self._erase_log()
            return deleted

        return await self._run(write)

    async def add_tokens(self, server: str, person: str, day: datetime.date, tokens: int) -> None:
        def write() -> None:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO token_usage (server, day, person, tokens) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (server, day, person) DO UPDATE SET tokens = tokens + excluded.tokens",
                    (server, day.isoformat(), person, tokens),
                )

        await self._run(write)

    async def tokens_used(self, server: str, person: str, day: datetime.date) -> tuple[int, int]:
        def query() -> tuple[int, int]:
            theirs, everyone = self._db.execute(
                "SELECT coalesce(sum(CASE WHEN person = ? THEN tokens END), 0), coalesce(sum(tokens), 0) "
                "FROM token_usage WHERE server = ? AND day = ?",
                (person, server, day.isoformat()),
            ).fetchone()
            return theirs, everyone

        return await self._run(query)

    async def preferences(self, namespace: str) -> dict[str, str]:
        def query() -> dict[str, str]:
            return dict(self._db.execute("SELECT ident, value FROM preferences WHERE namespace = ?", (namespace,)))

        return await self._run(query)

    async def set_preference(self, namespace: str, ident: str, value: str | None) -> None:
        def write() -> None:
            with self._transaction():
                if value is None:
                    self._db.execute("DELETE FROM preferences WHERE namespace = ? AND ident = ?", (namespace, ident))
                else:
                    self._db.execute(
                        "INSERT INTO preferences (namespace, ident, value) VALUES (?, ?, ?) "
                        "ON CONFLICT (namespace, ident) DO UPDATE SET value = excluded.value",
                        (namespace, ident, value),
                    )

        await self._run(write)

    async def claim(self, namespace: str, ident: str, ttl_s: float) -> bool:
        def write() -> bool:
            now = time.time()
            with self._transaction():
                self._db.execute("DELETE FROM claims WHERE expires < ?", (now,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO claims (namespace, ident, expires) VALUES (?, ?, ?)",
                    (namespace, ident, now + ttl_s),
                ).rowcount
            return inserted == 1

        return await self._run(write)

    async def count_event(self, namespace: str, ident: str, limit: int, window_s: float) -> float:
        limiter = self._limiters.setdefault((namespace, limit, window_s), RateLimiter(limit, window_s))
        return limiter.check(ident)

    def lock(self, key: ConversationKey) -> AsyncContextManager[None]:
        return self._locks.hold(key, self.lock_wait_s)

    async def health(self) -> dict:
        try:
            await self._run(lambda: self._db.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            return {"backend": "sqlite", "ok": False, "problem": str(exc)}
        return {"backend": "sqlite", "ok": True}

    async def reset(self, key: ConversationKey) -> None:
        def write() -> None:
            with self._transaction():
                self._db.execute("DELETE FROM turns WHERE conversation = ?", (str(key),))
            self._erase_log()

        await self._run(write)

    async def persona(self, key: ConversationKey) -> str | None:
        def query() -> str | None:
            row = self._db.execute("SELECT persona FROM conversations WHERE key = ?", (str(key),)).fetchone()
            return row[0] if row else None

        return await self._run(query)

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        def write() -> None:
            with self._transaction():
                self._touch(key, time.time())
                self._db.execute("UPDATE conversations SET persona = ? WHERE key = ?", (persona, str(key)))

        await self._run(write)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None

        await self._run(close)
        self._executor.shutdown(wait=True)

    def _erase_log(self) -> None:
        """Copy the write-ahead log into the database and empty it: the log still holds the pages as
        they were before a delete (the deleted words in them)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _touch(self, key: ConversationKey, when: float) -> None:
        self._db.execute(
            "INSERT INTO conversations (key, updated_at) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET updated_at = excluded.updated_at",
            (str(key), when),
        )

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def check_sqlite(path: Path) -> str | None:
    """What would stop SQLiteStore from opening `path`, without creating or changing anything; None if nothing."""
    path = Path(path)
    problem = _unusable_parent(path)
    if problem is None:
        directory = next(parent for parent in path.parents if parent.exists())
        try:
            with _probe(directory):
                pass
        except OSError as exc:
            problem = f"{directory} is not writable ({exc.strerror})"
    if problem is None and path.exists():
        try:
            with open(path, "r+b"):  # opened for writing, nothing written
                pass
        except OSError as exc:
            problem = f"the file is not writable ({exc.strerror})"
    if problem is None and path.exists():
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                db.execute("PRAGMA user_version").fetchone()
                _check_integrity(db, path)
            finally:
                db.close()
        except StoreUnusable as exc:
            return str(exc)
        except sqlite3.Error as exc:
            problem = _explain(exc)
    return f"database {path}: {problem}" if problem else None


def _unusable_parent(path: Path) -> str | None:
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a directory"
    return None


@contextmanager
def _probe(directory: Path):
    """Create and delete a file in `directory`: the one test of writability that also holds for root."""
    with tempfile.TemporaryFile(dir=directory):
        yield


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    result = [" ".join(row[0].split()) for row in db.execute("PRAGMA quick_check(1)")]
    if result != ["ok"]:
        raise StoreUnusable(
            f"database {path} is damaged ({'; '.join(result)}): restore it from a backup, or move it away "
            "to start afresh"
        )


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or text} ({exc.filename or 'its directory'})"
    if "unable to open" in text or "readonly" in text:
        return f"cannot open or write it: are the file and its directory writable? ({text})"
    if "not a database" in text:
        return f"not an SQLite database (garbage or truncated?): move it away to start afresh ({text})"
    if "malformed" in text:
        return f"damaged ({text}): restore it from a backup, or move it away to start afresh"
    return text
