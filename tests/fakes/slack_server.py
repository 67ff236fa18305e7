"""A local fake Slack for end-to-end tests.

Speaks the real wire protocol on 127.0.0.1 (ephemeral port), so an unmodified slack_bolt
``AsyncApp(client=AsyncWebClient(token=fake.bot_token, base_url=fake.api_url))`` with an
``AsyncSocketModeHandler(app, fake.app_token)`` works against it:

* Web API under ``fake.api_url`` (``http://127.0.0.1:PORT/api/``), bearer token checked.
* Socket Mode websocket at the URL that ``apps.connections.open`` returns.
* ``response_url`` endpoint for slash commands.
* Private file downloads (``url_private``) of files shared with a message (``add_file``): served
  only with the bot token, as Slack does; without it, a redirect to the sign-in page.
* Rate limits per method and workspace like Slack's (``fake.rate_limits``; by default
  ``chat.update``, 50 a minute): past one, HTTP 429 with ``Retry-After`` and
  ``{"ok": false, "error": "ratelimited"}`` (recorded in ``fake.rate_limited``).

Everything is recorded for assertions; ``wait_for`` / ``wait_for_message`` wake up on every
recorded change (an ``asyncio.Condition``), so tests never need bare sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from aiohttp import WSMsgType, web


@dataclass
class ApiCall:
    method: str
    params: dict
    token: Optional[str]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Envelope:
    envelope_id: str
    type: str  # "events_api", "slash_commands", "interactive", ...
    payload: dict
    sent_at: float = field(default_factory=time.monotonic)
    acked: bool = False
    acked_at: Optional[float] = None
    ack_payload: Optional[dict] = None  # the "payload" the app sent back with its ack, if any

    @property
    def ack_latency(self) -> Optional[float]:
        return None if self.acked_at is None else self.acked_at - self.sent_at


def _channel_type(channel: str) -> str:
    return {"D": "im", "G": "group"}.get(channel[:1], "channel")


class FakeSlack:
    def __init__(
        self,
        *,
        bot_token: str = "xoxb-fake-bot-token",
        app_token: str = "xapp-fake-app-token",
        team_id: str = "T0FAKE",
        bot_user_id: str = "U0BOT",
        bot_id: str = "B0BOT",
        app_id: str = "A0APP",
        bot_name: str = "ttt",
        echo_bot_messages: bool = True,
    ):
        self.bot_token, self.app_token = bot_token, app_token
        self.team_id, self.bot_user_id, self.bot_id = team_id, bot_user_id, bot_id
        self.app_id, self.bot_name = app_id, bot_name
        self.echo_bot_messages = echo_bot_messages  # deliver chat.postMessage back as message events
        self.verification_token = "fake-verification-token"
        self.users: dict[str, dict] = {}  # extra/override users for users.info
        self.files: dict[str, tuple[dict, bytes]] = {}  # file id -> (file object, content) (add_file)
        self.file_downloads: list[tuple[str, bool]] = []  # (file id, whether the bot token came with it)

        # --- recordings -------------------------------------------------------------------
        self.calls: list[ApiCall] = []  # every Web API call, including failed ones
        self.unknown_methods: list[str] = []
        self.messages: list[dict] = []  # every channel message (user events sent + bot posts)
        self.posted: list[dict] = []  # messages the bot posted (chat.postMessage / startStream)
        self.updates: list[dict] = []  # chat.update params (after parsing)
        self.deleted: list[dict] = []  # chat.delete params
        self.ephemerals: list[dict] = []  # chat.postEphemeral params
        self.reactions: set[tuple[str, str, str]] = set()  # (channel, ts, name) currently present
        self.reaction_calls: list[tuple[str, str, str, str]] = []  # (method, channel, ts, name)
        self.statuses: list[dict] = []  # assistant.threads.setStatus params
        self.envelopes: dict[str, Envelope] = {}  # by envelope_id, in send order
        self.response_url_posts: list[dict] = []  # {"id", "body"}
        self.connections = 0  # websocket connections accepted so far
        self.hellos = 0

        # method -> (calls, per seconds) in any sliding window, for the one workspace.
        self.rate_limits: dict[str, tuple[int, float]] = {"chat.update": (50, 60.0)}
        self.rate_limited: list[ApiCall] = []  # calls answered 429
        self._recent: dict[str, deque] = {}  # method -> times of the calls counted
        self._errors: dict[str, list[tuple]] = {}  # method -> queued (error, when) (inject_error)
        self._holds: list[tuple[str, dict, asyncio.Event]] = []  # (method, params, released) (hold)
        self._tickets: set[str] = set()
        self._sockets: list[web.WebSocketResponse] = []  # open ones, newest last
        self._transports: dict[int, Any] = {}  # id(ws) -> its TCP transport (for drop_socket)
        self._ts_counter = 0
        self._event_counter = 0
        self._cond = asyncio.Condition()
        self._runner: Optional[web.AppRunner] = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> "FakeSlack":
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_get("/link/", self._handle_ws)
        app.router.add_post("/response_url/{rid}", self._handle_response_url)
        app.router.add_get("/files-pri/{file_id}/{name}", self._handle_file)
        app.router.add_get("/files-pri/{file_id}/download/{name}", self._handle_file)
        app.router.add_get("/signin", self._handle_signin)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "FakeSlack":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    # ------------------------------------------------------------------ waiting
    async def _changed(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
        """Wait until predicate() is truthy (re-checked on every recorded change); return it."""
        async with self._cond:
            try:
                return await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
            except asyncio.TimeoutError:
                msg = f"timed out after {timeout}s waiting for {what or predicate}; {self.summary()}"
                raise AssertionError(msg) from None

    async def wait_for_message(
        self, channel: str, predicate: Optional[Callable[[dict], bool]] = None, timeout: float = 10
    ) -> dict:
        """First message the bot posted in channel matching predicate(msg) (already posted counts)."""

        def find():
            matches = (m for m in self.posted if m["channel"] == channel and (predicate is None or predicate(m)))
            return next(matches, None)

        return await self.wait_for(find, timeout, f"a bot message in {channel}")

    async def wait_for_ack(self, envelope_id: str, timeout: float = 10) -> Envelope:
        return await self.wait_for(
            lambda: self.envelopes[envelope_id] if self.envelopes[envelope_id].acked else None,
            timeout,
            f"ack of {envelope_id}",
        )

    async def wait_for_connections(self, n: int, timeout: float = 10) -> None:
        """Wait until n websocket connections were accepted in total and one is open."""
        await self.wait_for(lambda: self.connections >= n and self._sockets, timeout, f"{n} connections")

    @property
    def open_sockets(self) -> int:
        """Socket Mode connections open now."""
        return len(self._sockets)

    def summary(self) -> str:
        return (
            f"calls={[c.method for c in self.calls]}, posted={[(m['channel'], m['text']) for m in self.posted]}, "
            f"connections={self.connections} (open {len(self._sockets)}), "
            f"unacked={[e.envelope_id for e in self.envelopes.values() if not e.acked]}"
        )

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def inject_error(self, method: str, error: str, times: int = 1,
                     when: Optional[Callable[[dict], bool]] = None) -> None:
        """The next `times` calls to method (whose params satisfy `when`, if given) answer
        {"ok": false, "error": error}."""
        self._errors.setdefault(method, []).extend([(error, when)] * times)

    def _injected(self, method: str, params: dict) -> Optional[str]:
        queued = self._errors.get(method, [])
        for i, (error, when) in enumerate(queued):
            if when is None or when(params):
                del queued[i]
                return error
        return None

    def hold(self, method: str, **params) -> asyncio.Event:
        """Calls to method with these params wait (a slow Slack) until the returned event is set."""
        released = asyncio.Event()
        self._holds.append((method, params, released))
        return released

    # ------------------------------------------------------------------ ids
    def next_ts(self) -> str:
        self._ts_counter += 1
        micros = 1_700_000_000_000_000 + self._ts_counter * 100
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _next_event_id(self) -> str:
        self._event_counter += 1
        return f"Ev{self._event_counter:08d}"

    # ------------------------------------------------------------------ files
    def add_file(self, name: str, data: bytes, mimetype: str = "text/plain", user: str = "U0USER") -> dict:
        """A file someone uploaded: its file object (as in an event's ``files``), served at ``url_private``."""
        file_id = f"F{len(self.files) + 1:08d}"
        url = f"{self.base_url}/files-pri/{self.team_id}-{file_id}/{name}"
        extension = name.rpartition(".")[2] if "." in name else "binary"
        obj = {"id": file_id, "created": int(time.time()), "timestamp": int(time.time()), "name": name,
               "title": name, "mimetype": mimetype, "filetype": extension, "pretty_type": extension.upper(),
               "user": user, "user_team": self.team_id, "mode": "hosted", "editable": False, "is_external": False,
               "external_type": "", "is_public": False, "size": len(data), "url_private": url,
               "url_private_download": url.rsplit("/", 1)[0] + f"/download/{name}",
               "permalink": f"{self.base_url}/files/{user}/{file_id}/{name}"}  # fmt: skip
        self.files[file_id] = (obj, data)
        return obj

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"].rpartition("-")[2]
        authorized = request.headers.get("Authorization") == f"Bearer {self.bot_token}"
        self.file_downloads.append((file_id, authorized))
        await self._changed()
        if not authorized:  # Slack sends a request without a valid token to its sign-in page
            raise web.HTTPFound("/signin")
        if file_id not in self.files:
            raise web.HTTPNotFound()
        obj, data = self.files[file_id]
        return web.Response(body=data, content_type=obj["mimetype"])

    @staticmethod
    async def _handle_signin(request: web.Request) -> web.Response:
        return web.Response(text="<html>Sign in to Slack</html>", content_type="text/html")

    # ------------------------------------------------------------------ event builders
    def _user_message(self, channel: str, user: str, text: str, thread_ts: Optional[str],
                      files: Optional[list] = None) -> dict:
        ts = self.next_ts()
        event = {
            "user": user, "text": text, "ts": ts, "event_ts": ts, "channel": channel, "team": self.team_id,
            "client_msg_id": str(uuid.uuid4()),
            "blocks": [{"type": "rich_text", "block_id": "b1", "elements": [
                {"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}]}],
        }  # fmt: skip
        if thread_ts:
            event["thread_ts"] = thread_ts
        if files:
            event.update(files=list(files), upload=False, display_as_bot=False)
        return event

    def app_mention(self, channel: str, user: str, text: str, thread_ts: Optional[str] = None,
                    files: Optional[list] = None) -> dict:
        """An app_mention event; '<@BOT> ' is prefixed to text unless it already mentions the bot.
        ``files``: file objects from ``add_file`` shared with it."""
        mention = f"<@{self.bot_user_id}>"
        if mention not in text:
            text = f"{mention} {text}"
        return {"type": "app_mention", **self._user_message(channel, user, text, thread_ts, files)}

    def dm(self, channel: str, user: str, text: str, thread_ts: Optional[str] = None,
           files: Optional[list] = None) -> dict:
        """A message.im event (channel should look like 'D...'); with ``files``, subtype file_share."""
        event = {"type": "message", **self._user_message(channel, user, text, thread_ts, files), "channel_type": "im"}
        if files:
            event["subtype"] = "file_share"
        return event

    def channel_message(self, channel: str, user: str, text: str, thread_ts: Optional[str] = None) -> dict:
        """A message.channels / message.groups event, optionally a thread reply."""
        event = {"type": "message", **self._user_message(channel, user, text, thread_ts)}
        event["channel_type"] = _channel_type(channel)
        if thread_ts:
            parent = self._find(channel, thread_ts)
            event["parent_user_id"] = parent["user"] if parent else user
        return event

    def event_payload(self, event: dict, event_id: Optional[str] = None) -> dict:
        """The event_callback body Slack sends (inside a socket envelope, or as the HTTP body)."""
        return {
            "token": self.verification_token, "team_id": self.team_id, "context_team_id": self.team_id,
            "api_app_id": self.app_id, "event": event, "type": "event_callback",
            "event_id": event_id or self._next_event_id(), "event_time": int(float(event.get("event_ts", time.time()))),
            "authorizations": [{"team_id": self.team_id, "user_id": self.bot_user_id, "is_bot": True,
                                "is_enterprise_install": False, "enterprise_id": None}],
            "is_ext_shared_channel": False, "event_context": f"4-fake-{uuid.uuid4().hex[:12]}",
        }  # fmt: skip

    @staticmethod
    def signed_request_headers(body: bytes, signing_secret: str, timestamp: Optional[int] = None) -> dict:
        """Headers for POSTing body to a bot's /slack/events endpoint (HTTP / Events API mode)."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        base = b"v0:" + ts.encode() + b":" + body
        sig = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
        return {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": ts, "Content-Type": "application/json"}

    # ------------------------------------------------------------------ socket mode: sending
    async def send_envelope(self, type_: str, payload: dict, *, accepts_response_payload: bool = False,
                            extra: Optional[dict] = None, timeout: float = 10) -> str:
        """Send any envelope to the newest open socket (waiting for one); returns the envelope_id."""
        await self.wait_for(lambda: self._sockets, timeout, "an open socket mode connection")
        envelope_id = str(uuid.uuid4())
        frame = {"envelope_id": envelope_id, "payload": payload, "type": type_,
                 "accepts_response_payload": accepts_response_payload, **(extra or {})}  # fmt: skip
        self.envelopes[envelope_id] = Envelope(envelope_id, type_, payload)
        await self._sockets[-1].send_str(json.dumps(frame))
        await self._changed()
        return envelope_id

    async def send_event(self, event: dict, event_id: Optional[str] = None, retry_num: Optional[int] = None,
                         retry_reason: Optional[str] = None) -> str:
        """Deliver an Events API event over socket mode; returns the envelope_id (see wait_for_ack)."""
        if event.get("type") in ("message", "app_mention") and event.get("subtype") in (None, "file_share"):
            self._store(event)
        extra = {"retry_attempt": retry_num or 0, "retry_reason": retry_reason or ""}
        return await self.send_envelope("events_api", self.event_payload(event, event_id), extra=extra)

    async def send_slash_command(self, command: str = "/ttt", text: str = "", user_id: str = "U0USER",
                                 channel_id: str = "C0GENERAL", timeout: float = 10) -> Optional[dict]:
        """Send a slash command, wait for the ack and return its payload (None for an empty ack)."""
        rid = uuid.uuid4().hex
        payload = {
            "token": self.verification_token, "team_id": self.team_id, "team_domain": "fake",
            "channel_id": channel_id, "channel_name": channel_id.lower(), "user_id": user_id,
            "user_name": f"user_{user_id.lower()}", "command": command, "text": text, "api_app_id": self.app_id,
            "is_enterprise_install": "false", "response_url": f"{self.base_url}/response_url/{rid}",
            "trigger_id": f"{self._event_counter}.{rid}",
        }  # fmt: skip
        envelope_id = await self.send_envelope("slash_commands", payload, accepts_response_payload=True)
        return (await self.wait_for_ack(envelope_id, timeout)).ack_payload

    async def drop_socket(self, abrupt: bool = True) -> None:
        """Kill the newest socket mode connection.

        abrupt=True aborts the TCP connection without a close frame: slack_sdk notices in its
        monitor loop, i.e. after up to ~2x the handler's ping_interval (default 10 s).
        abrupt=False sends a websocket close frame: slack_sdk reconnects immediately.
        """
        await self.wait_for(lambda: self._sockets, 10, "an open socket to drop")
        ws = self._sockets.pop()
        if abrupt:
            self._transports[id(ws)].abort()
        else:
            await ws.close(code=1001)
        await self._changed()

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Slack's polite `{"type": "disconnect"}` message; slack_sdk then reconnects."""
        await self.wait_for(lambda: self._sockets, 10, "an open socket")
        await self._sockets[-1].send_str(json.dumps({"type": "disconnect", "reason": reason}))

    # ------------------------------------------------------------------ socket mode: server
    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket")
        if ticket not in self._tickets:
            return web.Response(status=401, text="invalid ticket")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._transports[id(ws)] = request.transport
        self.connections += 1
        self._sockets.append(ws)
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": len(self._sockets),
            "debug_info": {"host": "fake-applink", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id},
        }))  # fmt: skip
        self.hellos += 1
        await self._changed()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                env = self.envelopes.get(data.get("envelope_id", ""))
                if env is not None and not env.acked:
                    env.acked, env.acked_at, env.ack_payload = True, time.monotonic(), data.get("payload")
                    await self._changed()
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
            self._transports.pop(id(ws), None)
            await self._changed()
        return ws

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        raw = await request.text()
        self.response_url_posts.append({"id": request.match_info["rid"], "body": json.loads(raw) if raw else {}})
        await self._changed()
        return web.Response(text="ok")

    # ------------------------------------------------------------------ web api
    async def _read_params(self, request: web.Request) -> dict:
        params: dict = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.method == "POST":
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        for key in ("blocks", "attachments", "metadata", "prompts", "chunks"):
            value = params.get(key)
            if isinstance(value, str) and value[:1] in "[{":
                params[key] = json.loads(value)
        for key in ("unfurl_links", "unfurl_media"):
            if isinstance(params.get(key), str):
                params[key] = params[key].lower() in ("1", "true")
        return params

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._read_params(request)
        auth = request.headers.get("Authorization", "")
        body_token = params.pop("token", None)
        token = auth[7:] if auth.startswith("Bearer ") else body_token
        self.calls.append(ApiCall(method, params, token))
        for held, wanted, released in self._holds:
            if held == method and all(params.get(k) == v for k, v in wanted.items()):
                await released.wait()
        handler = getattr(self, "_api_" + method.replace(".", "_"), None)
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        retry_after = self._count(method)
        if retry_after is not None:
            self.rate_limited.append(self.calls[-1])
            await self._changed()
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(retry_after)})
        if handler is None:
            self.unknown_methods.append(method)
            body: dict = {"ok": False, "error": "unknown_method"}
        elif token != expected:
            body = {"ok": False, "error": "invalid_auth"}
        elif (error := self._injected(method, params)) is not None:
            body = {"ok": False, "error": error}
        else:
            body = await handler(params)
        await self._changed()
        return web.json_response(body, headers={"x-oauth-scopes": "app_mentions:read,chat:write,im:history"})

    def _count(self, method: str) -> Optional[int]:
        """Counts a call against its method's limit; the seconds to wait when over it."""
        if method not in self.rate_limits:
            return None
        limit, per = self.rate_limits[method]
        now = time.monotonic()
        recent = self._recent.setdefault(method, deque())
        while recent and recent[0] <= now - per:
            recent.popleft()
        if len(recent) >= limit:
            return max(1, math.ceil(recent[0] + per - now))
        recent.append(now)
        return None

    def _find(self, channel: str, ts: str) -> Optional[dict]:
        return next((m for m in self.messages if m["channel"] == channel and m["ts"] == ts), None)

    def _store(self, event: dict) -> None:
        if self._find(event["channel"], event["ts"]) is None:
            self.messages.append({k: v for k, v in event.items() if k not in ("event_ts", "channel_type")})

    def _bot_message(self, params: dict, text: str) -> dict:
        msg = {
            "type": "message", "user": self.bot_user_id, "bot_id": self.bot_id, "app_id": self.app_id,
            "text": text, "ts": self.next_ts(), "channel": params["channel"], "team": self.team_id,
            "bot_profile": {"id": self.bot_id, "app_id": self.app_id, "name": self.bot_name, "team_id": self.team_id},
        }  # fmt: skip
        for key in ("thread_ts", "blocks", "attachments", "metadata", "unfurl_links", "unfurl_media"):
            if params.get(key) is not None:
                msg[key] = params[key]
        self.messages.append(msg)
        self.posted.append(msg)
        return msg

    async def _api_auth_test(self, p: dict) -> dict:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake Team", "user": self.bot_name,
                "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id,
                "is_enterprise_install": False}  # fmt: skip

    async def _api_apps_connections_open(self, p: dict) -> dict:
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link/?ticket={ticket}&app_id={self.app_id}"}

    async def _api_chat_postMessage(self, p: dict) -> dict:
        if not p.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        msg = self._bot_message(p, p.get("text", ""))
        if self.echo_bot_messages and self._sockets:  # real Slack echoes the bot's own messages as events
            echo = {**msg, "event_ts": msg["ts"], "channel_type": _channel_type(msg["channel"])}
            if echo.get("thread_ts"):
                parent = self._find(msg["channel"], echo["thread_ts"])
                echo["parent_user_id"] = parent["user"] if parent else self.bot_user_id
            extra = {"retry_attempt": 0, "retry_reason": ""}
            await self.send_envelope("events_api", self.event_payload(echo), extra=extra)
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"], "message": msg}

    async def _api_chat_update(self, p: dict) -> dict:
        msg = self._find(p.get("channel", ""), p.get("ts", ""))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        for key in ("text", "blocks", "attachments", "metadata"):
            if key in p:
                msg[key] = p[key]
        msg["edited"] = {"user": self.bot_user_id, "ts": self.next_ts()}
        self.updates.append(p)
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"], "text": msg["text"], "message": msg}

    async def _api_chat_delete(self, p: dict) -> dict:
        msg = self._find(p.get("channel", ""), p.get("ts", ""))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        self.messages.remove(msg)
        self.deleted.append(p)
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"]}

    async def _api_chat_postEphemeral(self, p: dict) -> dict:
        self.ephemerals.append(p)
        return {"ok": True, "message_ts": self.next_ts()}

    async def _api_chat_startStream(self, p: dict) -> dict:
        msg = self._bot_message(p, p.get("markdown_text", ""))
        msg["streaming"] = True
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"]}

    async def _api_chat_appendStream(self, p: dict) -> dict:
        msg = self._find(p.get("channel", ""), p.get("ts", ""))
        if msg is None or not msg.get("streaming"):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        msg["text"] += p.get("markdown_text", "")
        self.updates.append(p)
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"]}

    async def _api_chat_stopStream(self, p: dict) -> dict:
        result = await self._api_chat_appendStream(p)
        if result["ok"]:
            msg = self._find(p["channel"], p["ts"])
            msg["streaming"] = False  # type: ignore[index]
            if "blocks" in p:
                msg["blocks"] = p["blocks"]  # type: ignore[index]
            result["message"] = msg
        return result

    async def _reaction(self, method: str, p: dict) -> dict:
        key = (p.get("channel", ""), p.get("timestamp", ""), p.get("name", ""))
        if self._find(key[0], key[1]) is None:
            return {"ok": False, "error": "message_not_found"}
        self.reaction_calls.append((method, *key))
        if method == "add":
            if key in self.reactions:
                return {"ok": False, "error": "already_reacted"}
            self.reactions.add(key)
        else:
            if key not in self.reactions:
                return {"ok": False, "error": "no_reaction"}
            self.reactions.discard(key)
        return {"ok": True}

    async def _api_reactions_add(self, p: dict) -> dict:
        return await self._reaction("add", p)

    async def _api_reactions_remove(self, p: dict) -> dict:
        return await self._reaction("remove", p)

    async def _api_conversations_info(self, p: dict) -> dict:
        cid = p.get("channel", "")
        is_im = cid.startswith("D")
        return {"ok": True, "channel": {
            "id": cid, "name": None if is_im else cid.lower(), "is_channel": cid.startswith("C"),
            "is_group": cid.startswith("G"), "is_im": is_im, "is_private": not cid.startswith("C"),
            "is_member": True, "is_archived": False, "context_team_id": self.team_id,
        }}  # fmt: skip

    async def _api_conversations_replies(self, p: dict) -> dict:
        channel, ts = p.get("channel", ""), p.get("ts", "")
        thread = [m for m in self.messages if m["channel"] == channel and (m["ts"] == ts or m.get("thread_ts") == ts)]
        if not thread:
            return {"ok": False, "error": "thread_not_found"}
        thread.sort(key=lambda m: float(m["ts"]))
        return {"ok": True, "messages": thread[: int(p.get("limit") or 1000)], "has_more": False}

    async def _api_conversations_history(self, p: dict) -> dict:
        channel = p.get("channel", "")
        top = [m for m in self.messages if m["channel"] == channel and m.get("thread_ts", m["ts"]) == m["ts"]]
        top.sort(key=lambda m: float(m["ts"]), reverse=True)
        return {"ok": True, "messages": top[: int(p.get("limit") or 100)], "has_more": False}

    async def _api_users_info(self, p: dict) -> dict:
        uid = p.get("user", "")
        if uid in self.users:
            return {"ok": True, "user": self.users[uid]}
        if uid == self.bot_user_id:
            name, is_bot = self.bot_name, True
        elif uid[:1] in ("U", "W"):
            name, is_bot = f"user_{uid.lower()}", False
        else:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": {
            "id": uid, "team_id": self.team_id, "name": name, "real_name": name.title(), "is_bot": is_bot,
            "deleted": False, "tz": "Etc/UTC",
            "profile": {"display_name": name, "real_name": name.title(), "bot_id": self.bot_id if is_bot else None},
        }}  # fmt: skip

    async def _api_assistant_threads_setStatus(self, p: dict) -> dict:
        self.statuses.append(p)
        return {"ok": True}

    async def _api_assistant_threads_setTitle(self, p: dict) -> dict:
        return {"ok": True}

    async def _api_assistant_threads_setSuggestedPrompts(self, p: dict) -> dict:
        return {"ok": True}
