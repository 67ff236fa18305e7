"""Opening the configured conversation store: SQLite (the default) or PostgreSQL (`database.url`)."""

from __future__ import annotations

import os
from typing import Mapping

from core.config.schema import DatabaseSection
from core.conversation import ConversationStore
from core.stores.sqlite import SQLiteStore, check_sqlite
from core.metrics import Metrics


async def open_store(database: DatabaseSection, metrics: Metrics,
                     environ: Mapping[str, str] | None = None) -> ConversationStore:
    """The store `database` names, open and migrated.

    Raises StoreUnusable (a database that cannot be used: refused, damaged, newer) or, for
    PostgreSQL, StoreUnavailable (the server cannot be reached). The password comes from
    TTT_DATABASE_PASSWORD in `environ` (default: the process environment), else from libpq's
    PGPASSWORD or ~/.pgpass.
    """
    if not database.url:
        return await SQLiteStore(database.path, database.lock_wait_s).open()
    from core.stores.postgres import PostgresStore  # asyncpg is needed only here

    store = PostgresStore(database, password=_password(environ), registry=metrics.registry)
    return await store.open()


async def check_database(database: DatabaseSection, environ: Mapping[str, str] | None = None) -> str | None:
    """What would stop `open_store` now, without creating or changing anything; None if nothing."""
    if not database.url:
        return check_sqlite(database.path)
    from core.stores.postgres import check_postgres

    return await check_postgres(database, _password(environ))


def _password(environ: Mapping[str, str] | None) -> str | None:
    return (os.environ if environ is None else environ).get("TTT_DATABASE_PASSWORD")
