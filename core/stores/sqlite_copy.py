"""Copy a SQLite conversation history into the PostgreSQL store (`ttt db migrate-sqlite`).

Turns keep their conversations, authors, author ids, exchanges, times and order; personas chosen
per conversation, people's standing choices and servers' settings (preferences) come along. Each
copied turn records where it came from (`origin`, a digest of
the SQLite row), so running the copy again skips what is already there.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.stores.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from core.stores.postgres import PostgresStore, storable

BATCH = 2000


class CopyError(Exception):
    """The file is not a conversation history this release can read."""


@dataclass(frozen=True)
class CopyReport:
    conversations: int  # settings rows read
    turns: int  # turns read
    copied: int  # turns new to PostgreSQL
    skipped: int  # turns already there (an earlier copy)


async def open_history(path: Path) -> sqlite3.Connection:
    """The SQLite history at `path`, read-only; CopyError for a file that is not one."""
    return await asyncio.to_thread(_open, Path(path))


async def copy_sqlite_history(source: sqlite3.Connection, store: PostgresStore,
                              progress: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy every turn and persona of the history `source` (from `open_history`, closed here) into
    `store`; `progress(done, total)` is called after each batch of turns."""
    try:
        conversations = await asyncio.to_thread(
            lambda: source.execute("SELECT key, persona, updated_at FROM conversations").fetchall()
        )
        async with store.connection() as conn:
            # A persona chosen since (on PostgreSQL) wins over the copied one.
            await conn.execute(
                "INSERT INTO conversations (key, persona, updated_at) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::float8[]) "
                "ON CONFLICT (key) DO UPDATE SET persona = coalesce(conversations.persona, excluded.persona), "
                "updated_at = greatest(conversations.updated_at, excluded.updated_at)",
                [r[0] for r in conversations], [r[1] for r in conversations], [r[2] for r in conversations],
            )
        await _copy_preferences(source, store)
        total = await asyncio.to_thread(lambda: source.execute("SELECT count(*) FROM turns").fetchone()[0])
        columns = await asyncio.to_thread(_turn_columns, source)
        done = copied = 0
        last_id = 0
        while True:
            rows = await asyncio.to_thread(
                lambda: source.execute(
                    f"SELECT {columns} FROM turns WHERE id > ? ORDER BY id LIMIT ?", (last_id, BATCH)
                ).fetchall()
            )
            if not rows:
                break
            copied += await _insert(store, rows)
            last_id = rows[-1][0]
            done += len(rows)
            if progress:
                progress(done, total)
        return CopyReport(len(conversations), done, copied, done - copied)
    finally:
        source.close()


def _open(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise CopyError(f"{path} does not exist")
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        version = source.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise CopyError(f"{path} is not a SQLite database: {exc}") from None
    if not {"turns", "conversations"} <= tables or version < 1:
        source.close()
        raise CopyError(f"{path} is not a conversation history (no turns and conversations tables)")
    if version > SQLITE_SCHEMA_VERSION:
        source.close()
        raise CopyError(f"{path} has schema version {version}, newer than this release knows ({SQLITE_SCHEMA_VERSION})")
    return source


async def _copy_preferences(source: sqlite3.Connection, store: PostgresStore) -> None:
    """Standing choices and server settings; one made since (on PostgreSQL) wins over the copied one."""
    def read() -> list[tuple]:
        if not source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'preferences'").fetchone():
            return []  # a history from before preferences
        return source.execute("SELECT namespace, ident, value FROM preferences").fetchall()

    rows = await asyncio.to_thread(read)
    async with store.connection() as conn:
        await conn.execute(
            "INSERT INTO preferences (namespace, ident, value) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            [r[0] for r in rows], [r[1] for r in rows], [storable(r[2]) for r in rows],
        )


def _turn_columns(source: sqlite3.Connection) -> str:
    """The columns to read; a history from before author ids and exchanges reads them as NULL."""
    present = {row[1] for row in source.execute("PRAGMA table_info(turns)")}
    optional = [name if name in present else f"NULL AS {name}" for name in ("author_id", "exchange")]
    return ", ".join(["id", "conversation", "role", "author", "text", "time", "persona", *optional])


async def _insert(store: PostgresStore, rows: list[tuple]) -> int:
    columns = list(zip(*rows))
    _, conversation, role, author, text, when, persona, author_id, exchange = columns
    origin = [_origin(row) for row in rows]
    async with store.connection() as conn:
        status = await conn.execute(
            "INSERT INTO turns (conversation, role, author, text, time, persona, author_id, exchange, origin) "
            "SELECT c, r, a, x, w, p, i, e, o FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
            "  $5::float8[], $6::text[], "
            "  $7::text[], $8::text[], $9::text[]) WITH ORDINALITY AS t(c, r, a, x, w, p, i, e, o, n) "
            "ORDER BY n ON CONFLICT (origin) DO NOTHING",
            list(conversation), list(role), [storable(a) for a in author], [storable(x) for x in text],
            list(when), list(persona), list(author_id), list(exchange), origin,
        )
    return int(status.rsplit(" ", 1)[-1])


def _origin(row: tuple) -> str:
    """Names a SQLite turn wherever its file has moved: its id, conversation, time, role and text."""
    turn_id, conversation, role, _, text, when = row[:6]
    digest = hashlib.blake2b(f"{turn_id}\0{conversation}\0{when!r}\0{role}\0{text}".encode(), digest_size=16)
    return "sqlite:" + digest.hexdigest()
