"""DAVE's server side, for the fake voice server and the shim's unit test: the voice server is the MLS
group's external sender (RFC 9420 12.1.8.1). It proposes to add members' key packages; a member
commits; people joining get the Welcome. Members are real davey sessions.

Only what a voice server needs is here: the ExternalSender struct (op 25), external Add proposals as
MLSMessage PublicMessages signed with ECDSA P-256 / SHA-256 (op 27, cipher suite 2, what DAVE v1
uses), and splitting a member's commit from its Welcome (op 28). TLS presentation language: vectors
carry a variable-length (QUIC-style) size prefix.
"""

from __future__ import annotations

import struct

import davey
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

MLS10, PUBLIC_MESSAGE = 1, 1
SENDER_EXTERNAL, CONTENT_PROPOSAL, PROPOSAL_ADD = 2, 2, 1
BASIC_CREDENTIAL, CIPHER_SUITE = 1, 2  # MLS_128_DHKEMP256_AES128GCM_SHA256_P256


def vector(data: bytes) -> bytes:
    size = len(data)
    if size < 1 << 6:
        return bytes([size]) + data
    if size < 1 << 14:
        return struct.pack(">H", 0x4000 | size) + data
    return struct.pack(">I", 0x8000_0000 | size) + data


def read_vector(data: bytes, at: int) -> tuple[bytes, int]:
    """The vector starting at `at`, and where the next field starts."""
    prefix = data[at] >> 6
    if prefix == 0:
        size, at = data[at], at + 1
    elif prefix == 1:
        size, at = struct.unpack_from(">H", data, at)[0] & 0x3FFF, at + 2
    else:
        size, at = struct.unpack_from(">I", data, at)[0] & 0x3FFF_FFFF, at + 4
    return data[at:at + size], at + size


class ExternalSender:
    """The voice server's signing identity in a channel's MLS group."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = self._key.public_key().public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint)
        self.package = vector(public) + struct.pack(">H", BASIC_CREDENTIAL) + vector(b"\x00")  # opcode 25

    def add_proposals(self, group_id: int, epoch: int, key_packages: list[bytes]) -> bytes:
        """Opcode 27's `proposal_messages`: one signed external Add proposal per key package."""
        messages = b""
        for key_package in key_packages:
            content = (vector(struct.pack(">Q", group_id)) + struct.pack(">QBI", epoch, SENDER_EXTERNAL, 0)
                       + vector(b"") + bytes([CONTENT_PROPOSAL]) + struct.pack(">H", PROPOSAL_ADD) + key_package)
            signed = vector(b"MLS 1.0 FramedContentTBS") + vector(struct.pack(">HH", MLS10, PUBLIC_MESSAGE) + content)
            signature = self._key.sign(signed, ec.ECDSA(hashes.SHA256()))
            messages += struct.pack(">HH", MLS10, PUBLIC_MESSAGE) + content + vector(signature)
        return vector(messages)


def split_commit_welcome(data: bytes) -> tuple[bytes, bytes | None]:
    """Opcode 28's payload: a commit (an MLSMessage PublicMessage from a member), optionally followed by
    a Welcome for the members it adds."""
    end = _commit_end(data)
    return data[:end], data[end:] or None


def _commit_end(data: bytes) -> int:
    _, at = read_vector(data, 4)  # after version and wire format: group_id
    sender = data[at + 8]  # after the epoch
    at += 9 + (4 if sender in (1, 2) else 0)  # a member's or an external sender's index
    _, at = read_vector(data, at)  # authenticated_data
    _, at = read_vector(data, at + 1)  # after the content type: the commit's proposals
    if data[at]:  # an UpdatePath: the committer's new leaf, then the path's nodes
        at = _leaf_node_end(data, at + 1)
        _, at = read_vector(data, at)
    else:
        at += 1
    _, at = read_vector(data, at)  # signature
    _, at = read_vector(data, at)  # confirmation_tag
    if sender == 1:
        _, at = read_vector(data, at)  # membership_tag
    return at


def _leaf_node_end(data: bytes, at: int) -> int:
    _, at = read_vector(data, at)  # encryption_key
    _, at = read_vector(data, at)  # signature_key
    _, at = read_vector(data, at + 2)  # a basic credential's identity
    for _ in range(5):  # capabilities: versions, cipher suites, extensions, proposals, credentials
        _, at = read_vector(data, at)
    source, at = data[at], at + 1
    if source == 1:  # key package: lifetime
        at += 16
    elif source == 3:  # commit: parent hash
        _, at = read_vector(data, at)
    _, at = read_vector(data, at)  # extensions
    _, at = read_vector(data, at)  # signature
    return at


def group_of(channel_id: int, *user_ids: int) -> tuple[ExternalSender, list[davey.DaveSession]]:
    """A formed DAVE group: one session per user (the first one committed the others' addition)."""
    sender = ExternalSender()
    sessions = [davey.DaveSession(1, user_id, channel_id) for user_id in user_ids]
    packages = []
    for session in sessions:
        session.set_external_sender(sender.package)
        packages.append(session.get_serialized_key_package())
    result = sessions[0].process_proposals(davey.ProposalsOperationType.append,
                                           sender.add_proposals(channel_id, 0, packages[1:]))
    sessions[0].process_commit(result.commit)
    for session in sessions[1:]:
        session.process_welcome(result.welcome)
    return sender, sessions
