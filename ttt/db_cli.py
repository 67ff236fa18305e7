"""`ttt db migrate-sqlite PATH`: move a SQLite conversation history into PostgreSQL.

The target is the configured `database.url` (TTT_DATABASE__URL); the copy can run again
(it skips turns copied before), so it can follow the old instance's last writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from core.config.loading import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `ttt db ...` to the `ttt` parser."""
    db = commands.add_parser("db", help="database tasks (copy a SQLite history into PostgreSQL)")
    tasks = db.add_subparsers(dest="task", required=True)
    p = tasks.add_parser(
        "migrate-sqlite", help="copy a SQLite history (turns, authors, personas) into database.url",
        description="Copy every conversation of a SQLite file (database.path of a single-process\n"
                    "install) into the PostgreSQL database at database.url: turns with their authors,\n"
                    "author ids and exchanges, in order, and each conversation's persona. Running it again\n"
                    "copies only what is new. Best run before the replicas take traffic.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", type=Path, help="the SQLite file, e.g. data/conversations.sqlite3")
    p.set_defaults(run=run_migrate_sqlite)


def run_migrate_sqlite(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.config.database.url:
        print("ttt db migrate-sqlite: set database.url (or TTT_DATABASE__URL) to the PostgreSQL database "
              "to copy into", file=sys.stderr)
        return 2
    return asyncio.run(_migrate(settings, args.path))


async def _migrate(settings: Settings, path: Path) -> int:
    from core.conversation import StoreUnavailable, StoreUnusable
    from core.metrics import Metrics
    from core.stores import open_store
    from core.stores.sqlite_copy import CopyError, copy_sqlite_history, open_history

    def progress(done: int, total: int) -> None:
        print(f"turns: {done}/{total} ({100 * done // max(total, 1)}%)", file=sys.stderr, flush=True)

    try:  # the file first: a wrong path changes nothing in PostgreSQL (opening it runs migrations)
        source = await open_history(path.expanduser().resolve())
    except CopyError as exc:
        print(f"ttt db migrate-sqlite: {exc}", file=sys.stderr)
        return 2
    try:
        store = await open_store(settings.config.database, Metrics(), os.environ)
    except (StoreUnavailable, StoreUnusable) as exc:
        source.close()
        reach = "reach" if isinstance(exc, StoreUnavailable) else "use"
        print(f"ttt db migrate-sqlite: cannot {reach} the database: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, StoreUnavailable) else 2
    try:
        report = await copy_sqlite_history(source, store, progress)
    except StoreUnavailable as exc:
        print(f"ttt db migrate-sqlite: the database went away: {exc}; run it again to finish", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"copied {report.copied} turn(s) from {path} into {store.where} "
          f"({report.skipped} already there; {report.conversations} conversation setting(s))")
    return 0
