"""Several replicas on one PostgreSQL: every message answered once, in order, nothing answered lost.

Two real `ttt serve` processes in Slack HTTP mode (the Events API behind a load balancer) share
one database; the fake Slack delivers signed events to whichever replica a test picks. The
store-level tests use two PostgresStores in one process: two sessions, like two replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import yaml

from bots.slack.format import PLACEHOLDER, STREAMING_MARK
from conftest import make_config
from core.config.schema import DatabaseSection
from core.conversation import ConversationKey, Turn
from core.metrics import Metrics
from core.errors import MEMORY_UNAVAILABLE
from core.stores import open_store
from fakes.slack_server import FakeSlack
from pg import PostgresServer, pg_url, postgres  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
SECRET = "replica-signing-secret"
RATE_LIMIT = 3  # messages a minute per person (slack.rate_limit_per_minute)


# ---- two stores, two sessions ----------------------------------------------------------------


@pytest.fixture
async def two_stores(pg_url):
    stores = [await open_store(DatabaseSection(url=pg_url, lock_wait_s=10), Metrics()) for _ in range(2)]
    yield stores
    for store in stores:
        await store.close()


async def lock_waiters(url: str) -> int:
    """Sessions waiting for an advisory lock in this database."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()


async def until(predicate, timeout: float = 30, what: str = "") -> None:
    """Poll an async condition (something in another process) until it holds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_conversation_lock_is_shared_and_granted_in_arrival_order(two_stores, pg_url):
    a, b = two_stores
    key = ConversationKey("slack", "C1/1.0")
    order: list[str] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(store, name: str) -> None:
        async with store.lock(key):
            order.append(name)
            if name == "first":
                entered.set()
                await release.wait()

    first = asyncio.create_task(hold(a, "first"))
    await asyncio.wait_for(entered.wait(), 10)
    tasks = []
    for n, (store, name) in enumerate([(b, "second"), (a, "third"), (b, "fourth")], start=1):
        tasks.append(asyncio.create_task(hold(store, name)))
        await until(lambda n=n: _waiting(pg_url, n), what=f"{n} waiter(s)")
    assert order == ["first"]
    async with a.lock(ConversationKey("slack", "C2/1.0")):  # another conversation is not held up
        pass
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *tasks), 10)
    assert order == ["first", "second", "third", "fourth"]


async def _waiting(url: str, n: int) -> bool:
    return await lock_waiters(url) >= n


@pytest.mark.timeout(60)
async def test_claims_and_rate_counts_are_shared(two_stores):
    a, b = two_stores
    results = await asyncio.gather(*(store.claim("slack-event", "Ev1", 60) for store in (a, b, a, b)))
    assert sorted(results) == [False, False, False, True]
    counted = [await store.count_event("rate:slack", "U1", 3, 60.0) for store in (a, b, a, b)]
    assert counted[:3] == [0.0, 0.0, 0.0] and 0 < counted[3] <= 60


# ---- two `ttt serve` processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `ttt serve` process: Slack over HTTP, the web adapter for /healthz."""

    def __init__(self, name: str, root: Path, config: dict, env: dict[str, str]):
        self.name = name
        self.slack_port, self.web_port = free_port(), free_port()
        config = {**config, "slack": {**config["slack"], "http_port": self.slack_port},
                  "web": {"enabled": "on", "port": self.web_port}}
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / f"{name}.log"
        self.env = env
        self.root = root
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ttt", "--config", str(self.config_path), "serve"],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.slack_port}/slack/events"

    def logs(self) -> str:
        return self.log_path.read_text()[-3000:]

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.alive, f"{self.name} exited:\n{self.logs()}"
            try:
                async with http.get(f"http://127.0.0.1:{self.web_port}/healthz") as response:
                    if (await response.json()).get("ready"):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} did not become ready:\n{self.logs()}")

    async def health(self, http: aiohttp.ClientSession) -> tuple[int, dict]:
        async with http.get(f"http://127.0.0.1:{self.web_port}/healthz") as response:
            return response.status, await response.json()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown, no flushing
        self.process.wait(timeout=30)

    async def stop(self) -> None:
        if self.alive:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 60)


class Cluster:
    def __init__(self, fake: FakeSlack, replicas: list[Replica], url: str, http: aiohttp.ClientSession):
        self.fake = fake
        self.replicas = replicas
        self.url = url
        self.http = http

    async def ensure_running(self) -> None:
        """Every replica up (a test may have killed one)."""
        for replica in self.replicas:
            if not replica.alive:
                replica.start()
        for replica in self.replicas:
            await replica.wait_ready(self.http)

    async def deliver(self, replica: Replica, event: dict, event_id: str | None = None, retry: int = 0) -> None:
        """POST a signed Events API delivery to a replica, as Slack (or a load balancer) would."""
        body = json.dumps(self.fake.event_payload(event, event_id=event_id or f"Ev{event['ts']}")).encode()
        headers = self.fake.signed_request_headers(body, SECRET)
        if retry:
            headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
        async with self.http.post(replica.events_url, data=body, headers=headers) as response:
            assert response.status == 200, await response.text()

    def messages(self, channel: str, thread_ts: str | None) -> list[dict]:
        return [m for m in self.fake.posted if m["channel"] == channel and m.get("thread_ts") == thread_ts]

    async def replies(self, channel: str, thread_ts: str | None, count: int, timeout: float = 60) -> list[str]:
        """The bot's messages in a thread once at least `count` are there and all are final."""

        def done():
            shown = self.messages(channel, thread_ts)
            return [m["text"] for m in shown] if len(shown) >= count and all(map(is_final, shown)) else None

        return await self.fake.wait_for(done, timeout, f"{count} final repl(ies) in {channel}/{thread_ts}")

    async def turns(self, scope: str) -> list[tuple[str, str]]:
        conn = await asyncpg.connect(self.url)
        try:
            rows = await conn.fetch("SELECT role, text FROM turns WHERE conversation = $1 ORDER BY id", f"slack:{scope}")
        finally:
            await conn.close()
        return [(r["role"], r["text"]) for r in rows]


def word_game(word: str, agains: int = 0) -> list[tuple[str, str]]:
    """The stored turns of a word game: the word, then "again" `agains` times, each answered with it."""
    return [("user", f"the word is {word}"), ("bot", f"{word}!")] + [("user", "again"), ("bot", f"{word}!")] * agains


def is_final(message: dict) -> bool:
    return message["text"] != PLACEHOLDER and not message["text"].endswith(STREAMING_MARK)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory, postgres: PostgresServer, word_model_dir):
    root = tmp_path_factory.mktemp("replicas")
    url = postgres.url(postgres.create_database())
    fake = await FakeSlack(echo_bot_messages=False).start()
    config = make_config(
        root, word_model_dir, database={"url": url, "timeout_s": 3},
        slack={"enabled": "on", "mode": "http", "api_base_url": fake.api_url, "stream_edit_interval_s": 0.2,
               "rate_limit_per_minute": RATE_LIMIT},
    ).model_dump(mode="json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_", "TTT_"))}
    env.update(SLACK_BOT_TOKEN=fake.bot_token, SLACK_SIGNING_SECRET=SECRET, HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    replicas = [Replica(name, root, config, env) for name in ("replica-1", "replica-2")]
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(fake, replicas, url, http)
        try:
            await cluster.ensure_running()
            yield cluster
        finally:
            for replica in replicas:
                await replica.stop()
            await fake.stop()


async def deliver_while_busy(cluster: Cluster, key: ConversationKey, deliveries: list[tuple[Replica, dict]]) -> None:
    """Deliver each event to its replica while `key` is held (as a long reply on a third replica would
    hold it), each time until that many replicas wait for the conversation."""
    holder = await open_store(DatabaseSection(url=cluster.url), Metrics())
    try:
        async with holder.lock(key):
            for waiting, (replica, event) in enumerate(deliveries, 1):
                await cluster.deliver(replica, event)
                await until(lambda n=waiting: _waiting(cluster.url, n), what=f"{replica.name} waiting for {key}")
    finally:
        await holder.close()


in_cluster_loop = pytest.mark.asyncio(loop_scope="module")  # the loop of the `cluster` fixture (the fake Slack)


@in_cluster_loop
@pytest.mark.timeout(180)
async def test_the_same_event_delivered_to_both_replicas_is_answered_once(cluster):
    await cluster.ensure_running()
    one, two = cluster.replicas
    mention = cluster.fake.app_mention("C0GENERAL", "U0AMY", "the word is tiger")
    await asyncio.gather(cluster.deliver(one, mention), cluster.deliver(two, mention),
                         cluster.deliver(two, mention, retry=1))
    assert await cluster.replies("C0GENERAL", mention["ts"], 1) == ["tiger!"]
    # A later message of the thread, on the replica that lost the race: had the duplicate been
    # answered too, its reply would stand between the two.
    again = cluster.fake.app_mention("C0GENERAL", "U0AMY", "again", thread_ts=mention["ts"])
    await cluster.deliver(two, again)
    assert await cluster.replies("C0GENERAL", mention["ts"], 2) == ["tiger!", "tiger!"]
    assert await cluster.turns(f"C0GENERAL/{mention['ts']}") == word_game("tiger", agains=1)


@in_cluster_loop
@pytest.mark.timeout(180)
@pytest.mark.parametrize("word, user, mentioned", [("river", "U0BEN", True), ("falcon", "U0DEV", False)])
async def test_two_messages_of_a_thread_on_different_replicas_are_answered_in_arrival_order(
        cluster, word, user, mentioned):
    """Both arrive while the conversation is busy; a follow-up without a mention is answered too: the
    thread is the bot's from the moment a replica takes its mention, before its first reply is stored."""
    await cluster.ensure_running()
    one, two = cluster.replicas
    first = cluster.fake.app_mention("C0GENERAL", user, f"the word is {word}")
    thread = {"thread_ts": first["ts"]}
    second = (cluster.fake.app_mention("C0GENERAL", user, "again", **thread) if mentioned
              else cluster.fake.channel_message("C0GENERAL", user, "again", **thread))
    # Hold the conversation (as a long reply on a third replica would), so both arrive while it is busy.
    await deliver_while_busy(cluster, ConversationKey("slack", f"C0GENERAL/{first['ts']}"), [(one, first), (two, second)])
    # "again" only says the word when the reply to "the word is ..." was stored before it was answered.
    assert await cluster.replies("C0GENERAL", first["ts"], 2) == [f"{word}!", f"{word}!"]
    assert await cluster.turns(f"C0GENERAL/{first['ts']}") == word_game(word, agains=1)


@in_cluster_loop
@pytest.mark.timeout(180)
async def test_a_conversation_begun_on_one_replica_continues_on_the_other(cluster):
    await cluster.ensure_running()
    one, two = cluster.replicas
    await cluster.deliver(one, cluster.fake.dm("D0CAROL", "U0CAROL", "the word is cloud"))
    assert await cluster.replies("D0CAROL", None, 1) == ["cloud!"]
    await cluster.deliver(two, cluster.fake.dm("D0CAROL", "U0CAROL", "again"))
    assert await cluster.replies("D0CAROL", None, 2) == ["cloud!", "cloud!"]
    await cluster.deliver(one, cluster.fake.dm("D0CAROL", "U0CAROL", "again"))
    assert await cluster.replies("D0CAROL", None, 3) == ["cloud!"] * 3


@in_cluster_loop
@pytest.mark.timeout(180)
async def test_rate_limits_count_across_replicas(cluster):
    await cluster.ensure_running()
    one, two = cluster.replicas
    words = ["apple", "lemon", "piano", "candle"]
    mentions = [cluster.fake.app_mention("C0RATE", "U0DAN", f"the word is {w}") for w in words]
    for n, (mention, replica) in enumerate(zip(mentions[:RATE_LIMIT], [one, two, one])):
        await cluster.deliver(replica, mention)
        assert await cluster.replies("C0RATE", mention["ts"], 1) == [f"{words[n]}!"]
    await cluster.deliver(two, mentions[RATE_LIMIT])
    await cluster.fake.wait_for(lambda: any(e["user"] == "U0DAN" for e in cluster.fake.ephemerals), 60,
                                "a rate-limit notice for U0DAN")
    assert cluster.messages("C0RATE", mentions[RATE_LIMIT]["ts"]) == []
    assert await cluster.turns(f"C0RATE/{mentions[RATE_LIMIT]['ts']}") == []


@in_cluster_loop
@pytest.mark.timeout(240)
async def test_kill_9_of_a_replica_mid_reply_loses_no_answered_turn(cluster):
    await cluster.ensure_running()
    one, two = cluster.replicas
    known = cluster.fake.app_mention("C0KILL", "U0EVE", "the word is falcon")
    await cluster.deliver(one, known)
    assert await cluster.replies("C0KILL", known["ts"], 1) == ["falcon!"]

    words = ["harbor", "meadow", "copper", "violet", "garden", "silver"]
    burst = [cluster.fake.app_mention("C0KILL", f"U0K{i}", f"the word is {w}") for i, w in enumerate(words)]
    await asyncio.gather(*(cluster.deliver(one, m) for m in burst))
    await cluster.fake.wait_for(lambda: any(is_final(m) for e in burst for m in cluster.messages("C0KILL", e["ts"])),
                                60, "a first answer of the burst")
    one.kill()

    answered = 0
    for event, word in zip(burst, words):
        shown = [m["text"] for m in cluster.messages("C0KILL", event["ts"]) if is_final(m)]
        stored = await cluster.turns(f"C0KILL/{event['ts']}")
        if shown:  # the user saw the answer: it was stored first
            answered += 1
            assert shown == [f"{word}!"] and stored == word_game(word)
        else:  # never half an exchange
            assert stored in ([], word_game(word))
    assert answered >= 1

    # The dead replica's sessions (and any lock they held) are gone; the other one carries on.
    again = cluster.fake.app_mention("C0KILL", "U0EVE", "again", thread_ts=known["ts"])
    await cluster.deliver(two, again)
    assert await cluster.replies("C0KILL", known["ts"], 2) == ["falcon!", "falcon!"]


@in_cluster_loop
@pytest.mark.timeout(240)
async def test_a_lost_database_gets_clear_replies_and_service_resumes_when_it_returns(cluster, postgres):
    await cluster.ensure_running()
    one, two = cluster.replicas
    postgres.stop()
    try:
        for n, replica in enumerate((one, two, one)):
            mention = cluster.fake.app_mention("C0DOWN", f"U0F{n}", "the word is dragon")
            await cluster.deliver(replica, mention)
            assert await cluster.replies("C0DOWN", mention["ts"], 1) == [MEMORY_UNAVAILABLE]
        async with aiohttp.ClientSession() as http:
            status, health = await one.health(http)
        assert status == 200 and not health["ready"] and health["status"] == "degraded"
        assert health["database"]["backend"] == "postgresql" and not health["database"]["ok"]
    finally:
        postgres.start()
    assert one.alive and two.alive
    async with aiohttp.ClientSession() as http:
        await one.wait_ready(http)
        assert (await one.health(http))[1]["database"]["ok"]
    for replica, word in ((one, "island"), (two, "pepper")):
        mention = cluster.fake.app_mention("C0DOWN", "U0GUS", f"the word is {word}")
        await cluster.deliver(replica, mention)
        assert await cluster.replies("C0DOWN", mention["ts"], 1) == [f"{word}!"]
        assert await cluster.turns(f"C0DOWN/{mention['ts']}") == word_game(word)
