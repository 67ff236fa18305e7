"""Benchmark: deadline-aware admission keeps its promise, tried as an outside check tries it.

`ttt serve` starts in a process of its own (the shipped persona, web only, generator.request_timeout_s
8); as soon as /healthz says ready, bursts of 48 concurrent 64-token /v1/chat/completions requests
(temperature 0), no warm-up. Each request is answered in time (200), refused at once (503 within
a second) or late (anything else: a 503 after waiting, a timeout): late must be 0. The expected
wait on /metrics is read while each burst runs. Then a neighbour spins on half the cores (about
half the speed), a few lone replies let the engine see the new speed, and the bursts are repeated.
Run: python bench/admission.py [--requests 48] [--deadline 8] [--bursts 3] [--cpu-dtype int4]
(set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 to run the server
as an AVX2-only CPU would). The last line is machine-readable:
answered=A refused=R late=L refused_max_ms=X expected_wait_max_s=Y ready_s=Z
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
AT_ONCE_S = 1.0  # a refusal later than this is a request that waited


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_ready(session: aiohttp.ClientSession, base: str, server: subprocess.Popen, limit: float) -> float:
    """Seconds until /healthz says ready (the server's start, its model load and its timing included)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if server.poll() is not None:
            raise SystemExit(f"ttt serve exited with status {server.returncode}")
        try:
            async with session.get(f"{base}/healthz") as response:
                if (await response.json()).get("ready"):
                    return time.monotonic() - started
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"ttt serve was not ready within {limit:.0f} s")


async def expected_wait(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    values = [float(v) for v in re.findall(r"^ttt_generator_expected_wait_seconds\{[^}]*\} (\S+)$", text, re.M)]
    return max(values, default=0.0)


async def ask(session: aiohttp.ClientSession, base: str, i: int, tokens: int) -> tuple[str, float]:
    body = {"model": "smol", "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me a long story about dragon number {i}."}]}
    started = time.monotonic()
    try:
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        status = 0
    seconds = time.monotonic() - started
    if status == 200:
        return "answered", seconds
    return ("refused" if status == 503 and seconds < AT_ONCE_S else "late"), seconds


async def burst(session: aiohttp.ClientSession, base: str, label: str, requests: int, tokens: int) -> dict:
    tasks = [asyncio.create_task(ask(session, base, i, tokens)) for i in range(requests)]
    waits = []
    while not all(task.done() for task in tasks):
        waits.append(await expected_wait(session, base))
        await asyncio.sleep(0.2)
    outcomes = [task.result() for task in tasks]
    by = {kind: [s for k, s in outcomes if k == kind] for kind in ("answered", "refused", "late")}
    row = {kind: len(seconds) for kind, seconds in by.items()}
    row.update(refused_max_ms=1000 * max(by["refused"], default=0.0), expected_wait_max_s=max(waits, default=0.0))
    print(f"{label:<34} answered {row['answered']:2} (slowest {max(by['answered'], default=0):5.2f} s), "
          f"refused {row['refused']:2} (slowest {row['refused_max_ms']:4.0f} ms), late {row['late']}; "
          f"expected wait up to {row['expected_wait_max_s']:.2f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    return row


def _spin(stop) -> None:
    while not stop.is_set():
        pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=8.0, help="generator.request_timeout_s")
    parser.add_argument("--bursts", type=int, default=3, help="bursts before, and again beside, the neighbour")
    parser.add_argument("--cpu-dtype", default="float32")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TTT_WEB__PORT": str(port),
               "TTT_DATABASE__PATH": str(Path(data) / "bench.sqlite3"), "TTT_GENERATOR__DEVICE": "cpu",
               "TTT_GENERATOR__CPU_DTYPE": args.cpu_dtype, "TTT_GENERATOR__REQUEST_TIMEOUT_S": str(args.deadline),
               "TTT_SERVICE__LOG_LEVEL": "WARNING"}
        for secret in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "TTT_API_KEY"):
            env.pop(secret, None)
        server = subprocess.Popen([sys.executable, "-m", "ttt", "serve"], cwd=ROOT, env=env)
        rows = []
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=4 * args.deadline + 60)) as session:
                ready = await wait_ready(session, base, server, 600)
                print(f"ready after {ready:.1f} s (cpu_dtype {args.cpu_dtype}, capability "
                      f"{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}); {args.requests} x {args.tokens} tokens, "
                      f"deadline {args.deadline:.0f} s", flush=True)
                for i in range(args.bursts):
                    rows.append(await burst(session, base, f"burst {i + 1}", args.requests, args.tokens))
                stop = multiprocessing.Event()
                neighbours = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                              for _ in range(max(1, os.cpu_count() // 2))]
                for neighbour in neighbours:
                    neighbour.start()
                try:
                    for i in range(3):  # the engine sees the new speed
                        await ask(session, base, 1000 + i, args.tokens)
                    for i in range(args.bursts):
                        rows.append(await burst(session, base, f"beside a neighbour, burst {i + 1}", args.requests,
                                                args.tokens))
                finally:
                    stop.set()
                    for neighbour in neighbours:
                        neighbour.join(10)
        finally:
            server.terminate()
            server.wait(60)
    total = {kind: sum(r[kind] for r in rows) for kind in ("answered", "refused", "late")}
    print(f"target: late 0 (every request answered in time or refused within {AT_ONCE_S:.0f} s)", flush=True)
    print(f"answered={total['answered']} refused={total['refused']} late={total['late']} "
          f"refused_max_ms={max(r['refused_max_ms'] for r in rows):.0f} "
          f"expected_wait_max_s={max(r['expected_wait_max_s'] for r in rows):.2f} ready_s={ready:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
