"""A local fake Discord voice server, for end-to-end tests of unmodified discord.py voice.

Speaks the real protocol on 127.0.0.1:

* Voice websocket v8 over TLS (discord.py hard-codes ``wss://{endpoint}/?v=8``): HELLO, IDENTIFY
  (checked against the VOICE_SERVER_UPDATE the fake gateway sent) -> READY, SELECT_PROTOCOL ->
  SESSION_DESCRIPTION (``dave_protocol_version`` 0: transport encryption only), HEARTBEAT ->
  HEARTBEAT_ACK with ``seq_ack``, SPEAKING (recorded with its time), RESUME -> RESUMED. Server
  messages carry ``seq``.
* UDP: IP discovery (74-byte request/response), then RTP packets, decrypted in the negotiated
  ``aead_xchacha20_poly1305_rtpsize`` mode and Opus-decoded to 48 kHz stereo s16le PCM.
* Fake people speaking to the bot (``speak``): SPEAKING (op 5, with their SSRC) to the bot, then
  Opus frames encrypted in the negotiated mode, sent to the bot's UDP address at real-time pace, and
  Discord's 5 silence frames at the end; CLIENT_DISCONNECT (op 13) when one leaves.
* DAVE (``dave=True``): SESSION_DESCRIPTION says protocol version 1 and the server acts as the MLS
  group's external sender (tests/fakes/dave.py): op 25, the bot's key package (op 26), external Add
  proposals for the people who speak (op 27), the bot's commit and Welcome (op 28), the commit
  announced as a transition (op 29), TRANSITION_READY (op 23) -> EXECUTE_TRANSITION (op 22). The fake
  people are real davey sessions: their frames are end-to-end encrypted, and the bot's are
  decrypted before decoding.

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

from fakes.dave import ExternalSender, split_commit_welcome

# Voice gateway opcodes.
IDENTIFY, SELECT_PROTOCOL, READY, HEARTBEAT, SESSION_DESCRIPTION, SPEAKING = 0, 1, 2, 3, 4, 5
HEARTBEAT_ACK, RESUME, HELLO, RESUMED = 6, 7, 8, 9
CLIENT_DISCONNECT, DAVE_EXECUTE_TRANSITION, DAVE_TRANSITION_READY = 13, 22, 23
MLS_EXTERNAL_SENDER, MLS_KEY_PACKAGE, MLS_PROPOSALS, MLS_COMMIT_WELCOME = 25, 26, 27, 28
MLS_ANNOUNCE_COMMIT_TRANSITION = 29
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
class FakeSpeaker:
    """A person speaking to the bot: their RTP stream, Opus encoder and (with DAVE) MLS session."""

    user_id: int
    ssrc: int
    encoder: object
    dave: object = None  # davey.DaveSession, a member of the bot's group
    sequence: int = 0
    timestamp: int = 0
    nonce: int = 0


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
    speakers: dict = field(default_factory=dict)  # user id -> FakeSpeaker
    key_package: Optional[bytes] = None  # the bot's (DAVE op 26)
    epoch: int = 0  # of the bot's MLS group
    transitions: list = field(default_factory=list)  # DAVE transition ids the bot said it is ready for
    commit_welcome: Optional[asyncio.Future] = None
    undecryptable: int = 0  # bot frames the fake people could not decrypt

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
    def __init__(self, changed: Callable[[], None] = lambda: None, *, ca: Optional[trustme.CA] = None,
                 dave: bool = False, channel_of: Callable[[int, int], Optional[int]] = lambda guild, user: None):
        self.changed = changed
        # DAVE: the MLS group of a connection is its voice channel (`channel_of(guild_id, bot_id)`).
        self.dave = ExternalSender() if dave else None
        self.channel_of = channel_of
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
                elif msg.type == WSMsgType.BINARY and state["session"] is not None:
                    await self._on_binary(state["session"], msg.data)
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
                "mode": mode, "secret_key": list(session.secret_key), "dave_protocol_version": 1 if self.dave else 0,
                "audio_codec": "opus", "media_session_id": secrets.token_hex(8),
            })
            if self.dave:
                await self._send_binary(session, MLS_EXTERNAL_SENDER, self.dave.package)
        elif op == DAVE_TRANSITION_READY:
            session.transitions.append(d["transition_id"])
            await self._send(ws, session, DAVE_EXECUTE_TRANSITION, {"transition_id": d["transition_id"]})
        elif op == SPEAKING:
            session.speaking.append((time.monotonic(), d["speaking"]))
        else:
            self.other_ops.append(frame)
        self.changed()

    async def _on_binary(self, session: VoiceSession, data: bytes) -> None:
        op, payload = data[0], data[1:]
        if op == MLS_KEY_PACKAGE:
            session.key_package = payload
        elif op == MLS_COMMIT_WELCOME and session.commit_welcome is not None and not session.commit_welcome.done():
            session.commit_welcome.set_result(split_commit_welcome(payload))
        else:
            self.other_ops.append({"op": op, "binary": payload})
        self.changed()

    async def _send_binary(self, session: VoiceSession, op: int, payload: bytes) -> None:
        session.seq += 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.ws.send_bytes(struct.pack(">HB", session.seq, op) + payload)

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
        opus = self._end_to_end_decrypted(session, opus)
        if session.decoder is None:
            session.decoder = Decoder()
        pcm = session.decoder.decode(opus, fec=False)
        session.packets.append(RtpPacket(sequence, timestamp, ssrc, time.monotonic(), opus, pcm))

    @staticmethod
    def _end_to_end_decrypted(session: VoiceSession, opus: bytes) -> bytes:
        """The bot's frame as the people in its DAVE group hear it (plain before the group is formed)."""
        import davey

        member = next((s.dave for s in session.speakers.values() if s.dave is not None and s.dave.ready), None)
        if member is None or opus == OPUS_SILENCE:
            return opus
        try:
            return member.decrypt(session.user_id, davey.MediaType.audio, opus)
        except ValueError:
            if opus[-2:] == b"\xfa\xfa":  # DAVE's magic marker: encrypted, and not for us
                session.undecryptable += 1
                return OPUS_SILENCE
            return opus

    # ---- fake people speaking ------------------------------------------------------------------

    async def speak(self, guild_id: int, user_id: int, pcm: bytes, *, padded_every: int = 0,
                    ssrc: Optional[int] = None, speaking_after: int = 0) -> None:
        """`user_id` says `pcm` (48 kHz stereo s16le) to the bot in `guild_id`: SPEAKING, then one Opus
        frame per 20 ms (end-to-end encrypted with DAVE), paced like real time, then 5 silence frames.
        `padded_every`: every n-th packet carries RTP padding (as some Discord clients send). `ssrc`: the
        stream's SSRC (the bot's own: its audio coming back to it). `speaking_after`: SPEAKING (which maps
        the SSRC to the person) comes only after that many frames, as it sometimes does on Discord."""
        session = self.session(guild_id)
        speaker = await self._speaker(session, user_id, ssrc)
        speaking = {"user_id": str(user_id), "ssrc": speaker.ssrc, "speaking": 1}
        if not speaking_after:
            await self._send(session.ws, session, SPEAKING, speaking)
        frame_bytes = FRAME_SAMPLES * 4
        pcm = pcm + bytes(-len(pcm) % frame_bytes)
        frames = [speaker.encoder.encode(pcm[i:i + frame_bytes], FRAME_SAMPLES)
                  for i in range(0, len(pcm), frame_bytes)]
        frames += [OPUS_SILENCE] * 5
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, opus in enumerate(frames):
            if speaking_after and i == speaking_after:
                await self._send(session.ws, session, SPEAKING, speaking)
            if speaker.dave is not None:
                opus = speaker.dave.encrypt_opus(opus)
            padding = 4 if padded_every and i % padded_every == padded_every - 1 else 0
            self._udp.sendto(rtp_packet(session.secret_key, speaker, opus, padding), session.client_address)
            self.changed()
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))

    async def user_left(self, guild_id: int, user_id: int) -> None:
        """Tell the bot that `user_id` left the call (op 13)."""
        session = self.session(guild_id)
        session.speakers.pop(user_id, None)
        await self._send(session.ws, session, CLIENT_DISCONNECT, {"user_id": str(user_id)})

    async def _speaker(self, session: VoiceSession, user_id: int, ssrc: Optional[int]) -> FakeSpeaker:
        speaker = session.speakers.get(user_id)
        if speaker is None:
            from discord.opus import Encoder

            encoder = Encoder(application="voip")
            speaker = session.speakers[user_id] = FakeSpeaker(user_id, ssrc or secrets.randbelow(2**31) + 1, encoder)
            if self.dave is not None:
                speaker.dave = await self._join_group(session, user_id)
        return speaker

    async def _join_group(self, session: VoiceSession, user_id: int):
        """Add `user_id` to the bot's MLS group, as Discord's voice server does when someone joins."""
        import davey

        channel_id = self.channel_of(session.guild_id, session.user_id)
        member = davey.DaveSession(1, user_id, channel_id)
        member.set_external_sender(self.dave.package)
        session.commit_welcome = asyncio.get_running_loop().create_future()
        proposals = self.dave.add_proposals(channel_id, session.epoch, [member.get_serialized_key_package()])
        members = [other.dave for other in session.speakers.values() if other.dave is not None]
        for other in members:  # every member sees the proposals; the bot's commit is the one that counts
            other.process_proposals(davey.ProposalsOperationType.append, proposals)
        await self._send_binary(session, MLS_PROPOSALS, bytes([0]) + proposals)  # 0: append
        commit, welcome = await asyncio.wait_for(session.commit_welcome, 10)
        for other in members:
            other.process_commit(commit)
        member.process_welcome(welcome)
        session.epoch += 1
        transition = len(session.transitions) + 1
        await self._send_binary(session, MLS_ANNOUNCE_COMMIT_TRANSITION, struct.pack(">H", transition) + commit)
        return member


def rtp_packet(secret_key: bytes, speaker: FakeSpeaker, opus: bytes, padding: int = 0) -> bytes:
    """The speaker's next RTP packet carrying `opus`, sealed in aead_xchacha20_poly1305_rtpsize (header as
    associated data, a 4-byte counter nonce at the end); `padding` bytes of RTP padding inside it."""
    from nacl.secret import Aead

    header = bytearray(12)
    header[0] = 0x80 | (0x20 if padding else 0)
    header[1] = 0x78
    struct.pack_into(">HII", header, 2, speaker.sequence, speaker.timestamp, speaker.ssrc)
    speaker.sequence = (speaker.sequence + 1) & 0xFFFF
    speaker.timestamp = (speaker.timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
    payload = opus + (bytes(padding - 1) + bytes([padding]) if padding else b"")
    nonce = struct.pack(">I", speaker.nonce)
    speaker.nonce += 1
    sealed = Aead(secret_key).encrypt(payload, bytes(header), nonce + bytes(20)).ciphertext
    return bytes(header) + sealed + nonce


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
