"""Conversations: keys, turns and where they are kept (SQLite by default).

The store interface is small on purpose so that a server store (Redis, Postgres) can stand in
for multi-process deployments.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Literal, Protocol, Sequence

Role = Literal["user", "bot"]


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation lives: a platform and a scope in it (channel, thread, DM, session)."""

    platform: str
    scope: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.scope}"

    @classmethod
    def parse(cls, text: str) -> "ConversationKey":
        platform, _, scope = text.partition(":")
        return cls(platform, scope)


@dataclass(frozen=True)
class Turn:
    role: Role
    author: str
    text: str
    time: float = field(default_factory=time.time)
    persona: str | None = None


class ConversationStore(Protocol):
    async def recent_turns(self, key: ConversationKey, limit: int) -> list[Turn]:
        """The newest `limit` turns, oldest first."""

    async def add_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Append turns atomically; durable when this returns."""

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns (its settings stay)."""

    async def persona(self, key: ConversationKey) -> str | None:
        """The persona chosen for this conversation, if any."""

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        """Choose the conversation's persona (None: back to the default)."""

    async def close(self) -> None:
        """Flush and release."""


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
]
SCHEMA_VERSION = len(_MIGRATIONS)


class SQLiteStore:
    """ConversationStore on one SQLite file (WAL), used from one dedicated thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> "SQLiteStore":
        await self._run(self._open)
        return self

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this release knows ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            db.executescript("BEGIN;" + _MIGRATIONS[number] + f"PRAGMA user_version={number + 1}; COMMIT;")
        self._db = db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def recent_turns(self, key: ConversationKey, limit: int) -> list[Turn]:
        def query() -> list[Turn]:
            rows = self._db.execute(
                "SELECT role, author, text, time, persona FROM turns WHERE conversation = ? "
                "ORDER BY id DESC LIMIT ?",
                (str(key), limit),
            ).fetchall()
            return [Turn(*row) for row in reversed(rows)]

        return await self._run(query)

    async def add_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        def write() -> None:
            with self._transaction():
                self._touch(key, turns[-1].time if turns else time.time())
                self._db.executemany(
                    "INSERT INTO turns (conversation, role, author, text, time, persona) VALUES (?, ?, ?, ?, ?, ?)",
                    [(str(key), t.role, t.author, t.text, t.time, t.persona) for t in turns],
                )

        await self._run(write)

    async def reset(self, key: ConversationKey) -> None:
        def write() -> None:
            with self._transaction():
                self._db.execute("DELETE FROM turns WHERE conversation = ?", (str(key),))

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


def current_session(turns: Sequence[Turn], idle_seconds: float, now: float | None = None) -> list[Turn]:
    """The turns since the conversation last went idle for longer than `idle_seconds`."""
    now = time.time() if now is None else now
    kept: list[Turn] = []
    later = now
    for turn in reversed(turns):
        if later - turn.time > idle_seconds:
            break
        kept.append(turn)
        later = turn.time
    return kept[::-1]


class KeyedLocks:
    """One asyncio lock per conversation, alive only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, list] = {}  # key -> [lock, users]

    @asynccontextmanager
    async def hold(self, key: Hashable):
        entry = self._entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._entries[key]
