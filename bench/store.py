"""Benchmark: the conversation store, SQLite against PostgreSQL, with 1 and 2 replicas.

Each replica is its own process with its own store (as `ttt serve` replicas are); its tasks
each own a conversation. Three phases, side by side for every setup:
  write  add_turns of one exchange (2 turns), CONCURRENCY tasks per replica -> turns written/s
  read   recent_turns(40) of a 40-turn history, CONCURRENCY tasks per replica -> turns read/s
  reply  what the store adds to one reply: lock, recent_turns(40), add_turns(2), unlock;
         one task per replica, one reply after the other -> added latency (p50, p95)
PostgreSQL is a local server started here with default durability (fsync on), or --url. SQLite
serves one process only (its locks and rate counters live in memory), so it runs 1 replica.
Run: python bench/store.py [--seconds 3] [--concurrency 16] [--url postgresql://...]
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HISTORY = 40


async def worker(args: argparse.Namespace) -> dict:
    from core.config.schema import DatabaseSection
    from core.conversation import ConversationKey, Turn
    from core.metrics import Metrics
    from core.stores import open_store

    store = await open_store(DatabaseSection(path=Path(args.sqlite), url=args.url or None), Metrics())
    keys = [ConversationKey("bench", f"{args.replica}-{i}") for i in range(args.concurrency)]
    exchange = [Turn("user", "alice", "a message of a typical length, a sentence or two " * 2, author_id="U1"),
                Turn("bot", "persona", "and a reply of about the same length, give or take a few words " * 2)]
    for key in keys:  # every conversation starts with a full history to read
        await store.add_turns(key, exchange * (HISTORY // 2))
    await asyncio.sleep(max(0.0, args.start_at - time.time()))  # all replicas begin together

    async def loop(step, key, until: float) -> list[float]:
        took = []
        while time.monotonic() < until:
            started = time.monotonic()
            await step(key)
            took.append(time.monotonic() - started)
        return took

    async def write(key):
        await store.add_turns(key, exchange)

    async def read(key):
        assert len(await store.recent_turns(key, HISTORY)) == HISTORY

    async def reply(key):
        async with store.lock(key):
            await store.recent_turns(key, HISTORY)
            await store.add_turns(key, exchange)

    result = {}
    for phase, step, tasks in (("write", write, keys), ("read", read, keys), ("reply", reply, keys[:1])):
        until = time.monotonic() + args.seconds
        took = await asyncio.gather(*(loop(step, key, until) for key in tasks))
        result[phase] = [t for task in took for t in task]
    await store.close()
    return result


def run_setup(name: str, replicas: int, url: str | None, root: Path, args: argparse.Namespace) -> dict:
    sqlite = root / f"{name}.sqlite3"
    start_at = time.time() + 3.0  # time for every replica to open its store and fill its histories
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--replica", str(r), "--sqlite", str(sqlite), "--url", url or "",
             "--seconds", str(args.seconds), "--concurrency", str(args.concurrency), "--start-at", str(start_at)],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        for r in range(replicas)
    ]
    outputs = [json.loads(p.communicate()[0]) for p in processes]
    if any(p.returncode for p in processes):
        raise SystemExit(f"{name}: a replica failed")
    writes = sum(len(o["write"]) for o in outputs) * 2 / args.seconds
    reads = sum(len(o["read"]) for o in outputs) * HISTORY / args.seconds
    reply = sorted(t for o in outputs for t in o["reply"])
    row = dict(name=name, replicas=replicas, written_s=writes, read_s=reads,
               reply_p50_ms=statistics.median(reply) * 1000, reply_p95_ms=reply[int(0.95 * (len(reply) - 1))] * 1000)
    print(f"{name:<22} turns written/s {writes:9.0f}  turns read/s {reads:10.0f}  "
          f"added per reply p50 {row['reply_p50_ms']:6.2f} ms  p95 {row['reply_p95_ms']:6.2f} ms", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=16, help="conversations per replica")
    parser.add_argument("--url", help="an existing PostgreSQL database (default: start a local server)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sqlite", default="", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))))
        return

    server = None
    url = args.url
    if not url:
        sys.path.insert(0, str(REPO / "tests"))
        from pg import start_server  # the test suite's throwaway server, here with fsync on

        server = start_server()
        url = server.url(server.create_database())
    print(f"{args.concurrency} conversations per replica, {args.seconds:g} s per phase; PostgreSQL: "
          f"{'--url' if args.url else 'local server, default durability'}; SQLite: WAL, synchronous=FULL", flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = {
                "sqlite-1": run_setup("SQLite, 1 replica", 1, None, Path(tmp), args),
                "pg-1": run_setup("PostgreSQL, 1 replica", 1, url, Path(tmp), args),
                "pg-2": run_setup("PostgreSQL, 2 replicas", 2, url, Path(tmp), args),
            }
    finally:
        if server is not None:
            server.destroy()
    sqlite, pg1, pg2 = rows["sqlite-1"], rows["pg-1"], rows["pg-2"]
    ratios = {
        "pg1_vs_sqlite_written": pg1["written_s"] / sqlite["written_s"],
        "pg1_vs_sqlite_read": pg1["read_s"] / sqlite["read_s"],
        "pg1_vs_sqlite_reply_p50": pg1["reply_p50_ms"] / sqlite["reply_p50_ms"],
        "pg2_vs_pg1_written": pg2["written_s"] / pg1["written_s"],
        "pg2_vs_pg1_read": pg2["read_s"] / pg1["read_s"],
        "pg2_vs_pg1_reply_p50": pg2["reply_p50_ms"] / pg1["reply_p50_ms"],
    }
    print("ratios: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"rows": list(rows.values()), "ratios": ratios}))


if __name__ == "__main__":
    main()
