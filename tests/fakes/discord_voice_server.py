"""A local fake Discord voice server, for end-to-end tests of unmodified discord.py voice.

Speaks the real protocol on 127.0.0.1:

* Voice websocket v8 over TLS (discord.py hard-codes ``wss://{endpoint}/?v=8``): HELLO, IDENTIFY
  (checked against the VOICE_SERVER_UPDATE the fake gateway sent) -> READY, SELECT_PROTOCOL ->
  SESSION_DESCRIPTION (``dave_protocol_version`` 0: transport encryption only), HEARTBEAT ->
  HEARTBEAT_ACK with ``seq_ack``, SPEAKING (recorded with its time), RESUME -> RESUMED. Server
  messages carry ``seq``.
* UDP: IP discovery (74-byte request/response), then RTP packets, decrypted in the negotiated
  ``aead_xchacha20_poly1305_rtpsize`` mode and Opus-decoded to 48 kHz stereo s16le PCM.

The certificate comes from a throwaway CA (trustme) with an IP SAN for 127.0.0.1; use
``trusted_by_aiohttp(server.ca)`` so that discord.py's aiohttp session trusts it.

A session keeps the client's UDP address, its key and mode: what sending audio to the bot (a fake
user speaking) needs, next to the receiving path below. All recorded changes call ``changed()``
(FakeDiscord's waiters wake up on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import trustme
from aiohttp import WSMsgType, web

# Voice gateway opcodes.
IDENTIFY, SELECT_PROTOCOL, READY, HEARTBEAT, SESSION_DESCRIPTION, SPEAKING = 0, 1, 2, 3, 4, 5
HEARTBEAT_ACK, RESUME, HELLO, RESUMED = 6, 7, 8, 9
MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]  # what Discord offers, best first
SUPPORTED = "aead_xchacha20_poly1305_rtpsize"  # what this fake can decrypt (and discord.py speaks)
OPUS_SILENCE = b"\xf8\xff\xfe"
FRAME_SAMPLES = 960  # 20 ms at 48 kHz


@dataclass
class RtpPacket:
    sequence: int
    timestamp: int
    ssrc: int
    received_at: float  # time.monotonic()
    opus: bytes
    pcm: bytes  # decoded, 48 kHz stereo s16le

    @property
    def silence(self) -> bool:
        return self.opus == OPUS_SILENCE


@dataclass(eq=False)
class VoiceSession:
    """One bot's voice connection in one guild, as the server saw it."""

    guild_id: int
    user_id: int
    session_id: str
    token: str
    ssrc: int
    identify: Optional[dict] = None
    mode: Optional[str] = None
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    client_address: Optional[tuple] = None  # (host, port) from IP discovery
    speaking: list = field(default_factory=list)  # (time.monotonic(), flags)
    packets: list = field(default_factory=list)  # RtpPacket, in arrival order
    heartbeats: int = 0
    resumes: int = 0
    ws: Optional[web.WebSocketResponse] = None
    request: Optional[web.Request] = None
    seq: int = 0
    decoder: object = None

    def audio(self, *, include_silence: bool = False) -> list:
        return [p for p in self.packets if include_silence or not p.silence]

    def pcm(self) -> bytes:
        return b"".join(p.pcm for p in self.audio())

    def talk_spurts(self) -> list:
        """Runs of audio packets between a SPEAKING on and the silence frames that end playback."""
        spurts, current = [], []
        for packet in self.packets:
            if packet.silence:
                if current:
                    spurts.append(current)
                current = []
            else:
                current.append(packet)
        return spurts + ([current] if current else [])


class FakeVoiceServer:
    def __init__(self, changed: Callable[[], None] = lambda: None, *, ca: Optional[trustme.CA] = None):
        self.changed = changed
        self.ca = ca or trustme.CA()
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self._tls)
        self.expected: dict[str, VoiceSession] = {}  # token -> session announced by VOICE_SERVER_UPDATE
        self.sessions: list[VoiceSession] = []  # identified sessions, oldest first
        self.connections = 0
        self.refused: list[dict] = []  # IDENTIFY/RESUME payloads that matched no session
        self.other_ops: list[dict] = []
        self._by_ssrc: dict[int, VoiceSession] = {}
        self._runner: Optional[web.AppRunner] = None
        self._udp: Optional[asyncio.DatagramTransport] = None
        self.port: Optional[int] = None
        self.udp_port: Optional[int] = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> "FakeVoiceServer":
        app = web.Application()
        app.router.add_get("/", self._websocket)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=("127.0.0.1", 0))
        self.udp_port = self._udp.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        """Gone for good: websockets closed abruptly, no new connections, UDP closed."""
        if self._runner is not None:
            await self.drop()
            await self._runner.cleanup()
            self._runner = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def __aenter__(self) -> "FakeVoiceServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def endpoint(self) -> str:
        """What VOICE_SERVER_UPDATE's ``endpoint`` says (discord.py adds wss:// and /?v=8)."""
        return f"127.0.0.1:{self.port}"

    def expect(self, guild_id: int, user_id: int, session_id: str) -> str:
        """Announces a connection (the gateway's VOICE_SERVER_UPDATE); returns its token."""
        token = secrets.token_hex(8)
        self.expected[token] = VoiceSession(guild_id, user_id, session_id, token, ssrc=secrets.randbelow(2**31) + 1)
        return token

    def session(self, guild_id: int) -> Optional[VoiceSession]:
        """The newest identified session of the bot in a guild."""
        found = [s for s in self.sessions if s.guild_id == guild_id]
        return found[-1] if found else None

    # ---- disruptions -------------------------------------------------------------------------

    async def drop(self, code: Optional[int] = None) -> int:
        """Closes every voice websocket with ``code`` (4015: "server crashed, resume"), or with
        ``None`` by cutting the connection (the client sees 1006)."""
        dropped = 0
        for session in self.sessions:
            ws, session.ws = session.ws, None
            if ws is None or ws.closed:
                continue
            dropped += 1
            if code is None:
                session.request.transport.close()
            else:
                await ws.close(code=code, message=b"FakeVoiceServer")
        return dropped

    async def disconnect(self, guild_id: int) -> None:
        """The bot was removed from the guild's voice: close its websocket with 4014."""
        session = self.session(guild_id)
        if session is not None and session.ws is not None and not session.ws.closed:
            await session.ws.close(code=4014, message=b"Disconnected.")

    # ---- websocket -----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.connections += 1
        state = {"session": None, "request": request}
        await self._send(ws, None, HELLO, {"heartbeat_interval": 5000.0})
        self.changed()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(ws, state, json.loads(msg.data))
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.changed()
        return ws

    async def _on_message(self, ws: web.WebSocketResponse, state: dict, frame: dict) -> None:
        op, d = frame["op"], frame["d"]  # discord.py always sends "d"
        session: Optional[VoiceSession] = state["session"]
        if op == IDENTIFY:
            session = self.expected.pop(d.get("token"), None)
            if session is None or (int(d["server_id"]), int(d["user_id"]), d["session_id"]) != (
                    session.guild_id, session.user_id, session.session_id):
                self.refused.append(d)
                await ws.close(code=4004, message=b"Authentication failed.")
                return
            session.identify, session.ws, session.request, state["session"] = d, ws, state["request"], session
            self.sessions.append(session)
            self._by_ssrc[session.ssrc] = session
            await self._send(ws, session, READY, {"ssrc": session.ssrc, "ip": "127.0.0.1", "port": self.udp_port,
                                            "modes": MODES, "experiments": []})
        elif op == RESUME:
            found = [s for s in self.sessions if s.token == d.get("token") and s.session_id == d.get("session_id")]
            if not found:
                self.refused.append(d)
                await ws.close(code=4006, message=b"Session no longer valid.")
                return
            session = state["session"] = found[-1]
            session.ws, session.request, session.resumes = ws, state["request"], session.resumes + 1
            await self._send(ws, session, RESUMED, None)
        elif op == HEARTBEAT:
            if session is not None:
                session.heartbeats += 1
            await self._send(ws, session, HEARTBEAT_ACK, {"t": d["t"]})
        elif session is None:
            await ws.close(code=4003, message=b"Not authenticated.")
        elif op == SELECT_PROTOCOL:
            mode = d["data"]["mode"]
            if mode != SUPPORTED:
                await ws.close(code=4016, message=b"Unknown encryption mode.")
                return
            session.mode = mode
            await self._send(ws, session, SESSION_DESCRIPTION, {
                "mode": mode, "secret_key": list(session.secret_key), "dave_protocol_version": 0,
                "audio_codec": "opus", "media_session_id": secrets.token_hex(8),
            })
        elif op == SPEAKING:
            session.speaking.append((time.monotonic(), d["speaking"]))
        else:
            self.other_ops.append(frame)
        self.changed()

    @staticmethod
    async def _send(ws: web.WebSocketResponse, session: Optional[VoiceSession], op: int, d) -> None:
        frame = {"op": op, "d": d}
        if session is not None:
            session.seq += 1
            frame["seq"] = session.seq
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(json.dumps(frame))

    # ---- UDP -------------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, address: tuple) -> None:
        if len(data) == 74 and data[:2] == b"\x00\x01":
            ssrc = struct.unpack_from(">I", data, 4)[0]
            session = self._by_ssrc.get(ssrc)
            if session is None:
                return
            session.client_address = address
            reply = bytearray(74)
            struct.pack_into(">HHI", reply, 0, 2, 70, ssrc)
            reply[8:8 + len(address[0])] = address[0].encode()
            struct.pack_into(">H", reply, 72, address[1])
            self._udp.sendto(bytes(reply), address)
        elif len(data) > 12 and data[0] >> 6 == 2:
            self._on_rtp(data)
        self.changed()

    def _on_rtp(self, data: bytes) -> None:
        from discord.opus import Decoder
        from nacl.secret import Aead

        sequence, timestamp, ssrc = struct.unpack_from(">HII", data, 2)
        session = self._by_ssrc.get(ssrc)
        if session is None or session.mode != SUPPORTED:
            return
        header_end = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:  # an extension header: its 4-byte preamble stays unencrypted in *_rtpsize
            header_end += 4
        header, nonce = data[:header_end], data[-4:] + bytes(20)
        opus = Aead(session.secret_key).decrypt(data[header_end:-4], header, nonce)
        if session.decoder is None:
            session.decoder = Decoder()
        pcm = session.decoder.decode(opus, fec=False)
        session.packets.append(RtpPacket(sequence, timestamp, ssrc, time.monotonic(), opus, pcm))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeVoiceServer):
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.server._on_datagram(data, addr)


@contextlib.contextmanager
def trusted_by_aiohttp(ca: trustme.CA):
    """Makes aiohttp's default verified TLS context (built once, at import) trust ``ca`` too."""
    import aiohttp.connector

    context = ssl.create_default_context()
    ca.configure_trust(context)
    saved = aiohttp.connector._SSL_CONTEXT_VERIFIED
    aiohttp.connector._SSL_CONTEXT_VERIFIED = context
    try:
        yield
    finally:
        aiohttp.connector._SSL_CONTEXT_VERIFIED = saved
