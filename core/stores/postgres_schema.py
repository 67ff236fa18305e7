"""The PostgreSQL schema, as versioned migrations applied at start under an advisory lock.

Replicas that start together queue on the lock: the first applies what is missing, the others
then find the schema current. A database newer than this release is refused, as with SQLite.
"""

from __future__ import annotations

import asyncpg

from core.conversation import StoreUnusable

# Any constant works; it only has to differ from the conversation locks (hashed keys) in practice.
MIGRATION_LOCK = 0x7474745F736368  # "ttt_sch"

MIGRATIONS = [
    """
    CREATE TABLE conversations (
        key text PRIMARY KEY,
        persona text,
        updated_at double precision NOT NULL
    );
    CREATE TABLE turns (
        id bigserial PRIMARY KEY,
        conversation text NOT NULL,
        role text NOT NULL CHECK (role IN ('user', 'bot')),
        author text NOT NULL,
        text text NOT NULL,
        time double precision NOT NULL,
        persona text,
        author_id text,
        exchange text,
        origin text UNIQUE  -- where a copied turn came from (`ttt db migrate-sqlite`): copies are idempotent
    );
    CREATE INDEX turns_by_conversation ON turns (conversation, id);
    CREATE INDEX turns_by_author ON turns (author_id) WHERE author_id IS NOT NULL;
    CREATE INDEX turns_by_exchange ON turns (exchange);
    CREATE INDEX turns_by_time ON turns (time);
    CREATE TABLE claims (
        namespace text NOT NULL,
        ident text NOT NULL,
        expires double precision NOT NULL,
        PRIMARY KEY (namespace, ident)
    );
    CREATE INDEX claims_by_expiry ON claims (expires);
    CREATE TABLE rate_events (
        namespace text NOT NULL,
        ident text NOT NULL,
        times double precision[] NOT NULL,  -- the events counted in the latest window, oldest first
        expires double precision NOT NULL,
        PRIMARY KEY (namespace, ident)
    );
    CREATE INDEX rate_events_by_expiry ON rate_events (expires);
    -- One round trip, atomic under the row lock, on the database's clock (replicas' clocks may differ).
    CREATE FUNCTION ttt_count_event(p_namespace text, p_ident text, p_limit integer, p_window double precision)
    RETURNS double precision LANGUAGE plpgsql AS $$
    DECLARE
        now_s double precision := extract(epoch FROM clock_timestamp());
        recent double precision[];
    BEGIN
        INSERT INTO rate_events (namespace, ident, times, expires) VALUES (p_namespace, p_ident, '{}', 0)
            ON CONFLICT DO NOTHING;
        SELECT times INTO recent FROM rate_events WHERE namespace = p_namespace AND ident = p_ident FOR UPDATE;
        recent := ARRAY(SELECT t FROM unnest(recent) AS t WHERE t > now_s - p_window ORDER BY t);
        IF cardinality(recent) >= p_limit THEN
            RETURN p_window - (now_s - recent[1]);
        END IF;
        UPDATE rate_events SET times = recent || now_s, expires = now_s + p_window
            WHERE namespace = p_namespace AND ident = p_ident;
        RETURN 0;
    END $$;
    """,
    """
    CREATE TABLE preferences (
        namespace text NOT NULL,
        ident text NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (namespace, ident)
    );
    """,
    """
    CREATE TABLE token_usage (
        server text NOT NULL,
        day date NOT NULL,  -- a UTC day
        person text NOT NULL,
        tokens bigint NOT NULL,
        PRIMARY KEY (server, day, person)
    );
    CREATE INDEX token_usage_by_day ON token_usage (day);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the number of migrations applied.

    Raises StoreUnusable for a database migrated by a newer release.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        if version > SCHEMA_VERSION:
            raise StoreUnusable(
                f"the database has schema version {version}, newer than this release knows ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[number])
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number + 1)
        return SCHEMA_VERSION - version
