"""The gateway (websocket) half of the fake Discord.

Plain-text JSON frames, no compression (discord.py asks for zlib-stream but reads text frames
as they come). Implements HELLO, IDENTIFY (token checked, intents recorded) -> READY + one
GUILD_CREATE per guild, HEARTBEAT -> ACK, RESUME (missed events replayed, then RESUMED; unknown
session -> INVALID_SESSION), REQUEST_GUILD_MEMBERS -> GUILD_MEMBERS_CHUNK, and dispatch with
sequence numbers, intents filtering and message-content redaction like Discord.

Sending is synchronous for callers: each connection has a queue drained by a writer task, so
state helpers of the fake can dispatch without awaiting, in order.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from .discord_server import FakeDiscord

# Opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE_UPDATE, VOICE_STATE_UPDATE = 0, 1, 2, 3, 4
RESUME, RECONNECT, REQUEST_GUILD_MEMBERS, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 6, 7, 8, 9, 10, 11

# Intents.
GUILDS, GUILD_MEMBERS, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = 1, 1 << 1, 1 << 9, 1 << 12, 1 << 15
GUILD_VOICE_STATES = 1 << 7
_GUILD_EVENT_INTENTS = {
    "GUILD_CREATE": GUILDS, "CHANNEL_CREATE": GUILDS, "THREAD_CREATE": GUILDS,
    "GUILD_ROLE_CREATE": GUILDS, "GUILD_MEMBER_ADD": GUILD_MEMBERS, "VOICE_STATE_UPDATE": GUILD_VOICE_STATES,
}
_MESSAGE_EVENTS = ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE")
BACKLOG = 1000


@dataclass(eq=False)
class GatewayConnection:
    ws: web.WebSocketResponse
    request: web.Request
    path: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    session: Optional["GatewaySession"] = None
    closed: bool = False

    def send(self, frame) -> None:
        """Queues a frame (a dict, or JSON text already serialized)."""
        if not self.closed:
            self.queue.put_nowait(frame if isinstance(frame, str) else json.dumps(frame))

    async def write_loop(self) -> None:
        while True:
            frame = await self.queue.get()
            try:
                await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError):
                return


@dataclass(eq=False)
class GatewaySession:
    id: str
    intents: int
    shard: Optional[tuple]  # (shard_id, shard_count) or None
    seq: int = 0
    backlog: list = field(default_factory=list)  # (seq, JSON frame)
    conn: Optional[GatewayConnection] = None
    ready: bool = False  # READY and the GUILD_CREATEs were queued

    def handles_guild(self, guild_id: Optional[int]) -> bool:
        if not self.shard:
            return True
        shard_id, count = self.shard
        return ((guild_id >> 22) % count if guild_id else 0) == shard_id

    def push(self, event: str, data: dict) -> None:
        self.seq += 1
        # Serialized now: later changes to the fake's state do not alter what was "sent".
        frame = json.dumps({"op": DISPATCH, "t": event, "s": self.seq, "d": data})
        self.backlog.append((self.seq, frame))
        del self.backlog[:-BACKLOG]
        if self.conn is not None:
            self.conn.send(frame)


class Gateway:
    def __init__(self, fake: "FakeDiscord", heartbeat_interval_ms: int):
        self.fake = fake
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.sessions: dict[str, GatewaySession] = {}
        self.connections: list[GatewayConnection] = []
        # Recorded for assertions.
        self.connection_count = 0
        self.identifies: list[dict] = []  # IDENTIFY payloads ("d"), token included
        self.resumes: list[dict] = []  # RESUME payloads ("d")
        self.replays: list[dict] = []  # per accepted RESUME: {"at": time.monotonic(), "events": how many replayed}
        self.heartbeats = 0
        self.member_requests: list[dict] = []  # REQUEST_GUILD_MEMBERS payloads (discord.py chunking)
        self.other_ops: list[dict] = []  # presence/voice-state updates etc.

    # -- websocket endpoint --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = GatewayConnection(ws=ws, request=request, path=request.path)
        self.connections.append(conn)
        self.connection_count += 1
        writer = asyncio.create_task(conn.write_loop())
        conn.send({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        self.fake._changed()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_frame(conn, json.loads(msg.data))
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            conn.closed = True
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            writer.cancel()
            self.connections.remove(conn)
            self.fake._changed()
        return ws

    async def _on_frame(self, conn: GatewayConnection, frame: dict) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == HEARTBEAT:
            self.heartbeats += 1
            conn.send({"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(conn, d)
        elif op == RESUME:
            await self._resume(conn, d)
        elif op == VOICE_STATE_UPDATE:  # the bot joins, moves or leaves a voice channel
            self.other_ops.append(frame)
            if conn.session is not None:
                self.fake._bot_voice_state(conn.session, d)
        elif op == REQUEST_GUILD_MEMBERS:
            self.member_requests.append(d)
            if conn.session is not None:
                conn.session.push("GUILD_MEMBERS_CHUNK", self.fake._members_chunk(d))
        else:
            self.other_ops.append(frame)
        self.fake._changed()

    async def _identify(self, conn: GatewayConnection, d: dict) -> None:
        self.identifies.append(d)
        if d.get("token") != self.fake.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = tuple(d["shard"]) if d.get("shard") else None
        # A new IDENTIFY replaces the previous session of the same shard.
        for sid, old in list(self.sessions.items()):
            if old.shard == shard:
                del self.sessions[sid]
        session = GatewaySession(id=uuid.uuid4().hex, intents=d.get("intents", 0), shard=shard, conn=conn)
        self.sessions[session.id] = session
        conn.session = session
        guilds = [g for g in self.fake.guilds.values() if session.handles_guild(g.id)]
        ready = {
            "v": 10,
            "user": self.fake._bot_user_payload(),
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.fake.gateway_url + "/resume",
            "application": {"id": str(self.fake.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
        }
        if shard:
            ready["shard"] = list(shard)
        session.push("READY", ready)
        for guild in guilds:
            session.push("GUILD_CREATE", guild.payload())
        session.ready = True

    async def _resume(self, conn: GatewayConnection, d: dict) -> None:
        self.resumes.append(d)
        session = self.sessions.get(d.get("session_id"))
        if session is None or d.get("token") != self.fake.token:
            conn.send({"op": INVALID_SESSION, "d": False})
            return
        if session.conn is not None and session.conn is not conn:
            session.conn.session = None
        session.conn = conn
        conn.session = session
        missed = [frame for seq, frame in session.backlog if seq > (d.get("seq") or 0)]
        for frame in missed:
            conn.send(frame)
        self.replays.append({"at": time.monotonic(), "events": len(missed)})
        session.push("RESUMED", {})

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(self, event: str, data: dict, *, guild_id: Optional[int] = None,
                 mentions_bot: bool = False, session: Optional[GatewaySession] = None) -> int:
        """Queues an event for every live session that would receive it; returns how many."""
        delivered = 0
        for s in [session] if session else list(self.sessions.values()):
            if not s.handles_guild(guild_id) or not self._intended(s, event, guild_id):
                continue
            payload = data
            if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and not self._may_read_content(s, data, guild_id,
                                                                                        mentions_bot):
                payload = dict(data, content="", embeds=[], attachments=[], components=[])
            s.push(event, payload)
            delivered += 1
        return delivered

    @staticmethod
    def _intended(s: GatewaySession, event: str, guild_id: Optional[int]) -> bool:
        if event in _MESSAGE_EVENTS:
            return bool(s.intents & (GUILD_MESSAGES if guild_id else DIRECT_MESSAGES))
        needed = _GUILD_EVENT_INTENTS.get(event)
        return needed is None or bool(s.intents & needed)

    def _may_read_content(self, s: GatewaySession, data: dict, guild_id, mentions_bot: bool) -> bool:
        if s.intents & MESSAGE_CONTENT or not guild_id or mentions_bot:
            return True
        return int(data.get("author", {}).get("id", 0)) == self.fake.bot_user.id

    # -- disruptions ---------------------------------------------------------------------------

    async def drop(self, code: Optional[int] = 4000) -> int:
        """Closes every gateway connection: with a close frame of ``code``, or, with ``code=None``,
        by cutting the TCP connection (the client sees 1006). Sessions stay resumable."""
        conns = list(self.connections)
        for conn in conns:
            conn.closed = True
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            if code is None:
                conn.request.transport.close()
            else:
                await conn.ws.close(code=code, message=b"dropped by FakeDiscord")
        return len(conns)

    def send_reconnect(self) -> None:
        """Sends op 7 RECONNECT on every connection (the client closes and resumes)."""
        for conn in self.connections:
            conn.send({"op": RECONNECT, "d": None})

    def invalidate_sessions(self) -> None:
        """Forgets all sessions: a later RESUME gets INVALID_SESSION and must IDENTIFY again."""
        self.sessions.clear()

    async def close_all(self) -> None:
        for conn in list(self.connections):
            conn.closed = True
            await conn.ws.close(code=1001, message=b"FakeDiscord stopping")
