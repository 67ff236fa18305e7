"""Opening the configured conversation store: SQLite (the default) or PostgreSQL (`database.url`)."""

from __future__ import annotations

import os
from typing import Mapping

from core.config import DatabaseSection
from core.conversation import ConversationStore, SQLiteStore
from core.metrics import Metrics


async def open_store(database: DatabaseSection, metrics: Metrics,
                     environ: Mapping[str, str] | None = None) -> ConversationStore:
    """The store `database` names, open and migrated; raises StoreUnavailable when PostgreSQL
    cannot be reached. The password comes from TTT_DATABASE_PASSWORD in `environ` (default: the
    process environment), else from libpq's PGPASSWORD or ~/.pgpass."""
    if not database.url:
        return await SQLiteStore(database.path, database.lock_wait_s).open()
    from core.stores.postgres import PostgresStore  # asyncpg is needed only here

    environ = os.environ if environ is None else environ
    store = PostgresStore(database, password=environ.get("TTT_DATABASE_PASSWORD"), registry=metrics.registry)
    return await store.open()
