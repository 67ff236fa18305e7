"""State objects of the fake Discord and their wire (JSON) payloads.

Ids are ints here and strings on the wire, as Discord sends them. Payloads carry every field
discord.py 2.7 reads with ``data['...']`` (a missing one raises inside its gateway parser).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Optional

DISCORD_EPOCH_MS = 1420070400000
_counter = itertools.count(1)


def snowflake() -> int:
    """A real-looking, strictly increasing snowflake (discord.py derives created_at from it)."""
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return (ms << 22) | (next(_counter) & 0x3FFFFF)


def iso_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def snowflake_id(obj) -> int:
    """Accepts a fake object, a discord.py object, a message dict or an id."""
    if isinstance(obj, dict):
        return int(obj["id"])
    return int(getattr(obj, "id", obj))


# Permission bits (https://discord.com/developers/docs/topics/permissions).
class P:
    CREATE_INSTANT_INVITE = 1 << 0
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    CONNECT = 1 << 20
    SPEAK = 1 << 21
    USE_VAD = 1 << 25
    USE_APPLICATION_COMMANDS = 1 << 31
    MANAGE_THREADS = 1 << 34
    CREATE_PUBLIC_THREADS = 1 << 35
    CREATE_PRIVATE_THREADS = 1 << 36
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1


EVERYONE_PERMISSIONS = (
    P.CREATE_INSTANT_INVITE | P.ADD_REACTIONS | P.VIEW_CHANNEL | P.SEND_MESSAGES | P.EMBED_LINKS
    | P.ATTACH_FILES | P.READ_MESSAGE_HISTORY | P.USE_EXTERNAL_EMOJIS | P.CONNECT | P.SPEAK
    | P.USE_VAD | P.USE_APPLICATION_COMMANDS | P.CREATE_PUBLIC_THREADS | P.SEND_MESSAGES_IN_THREADS
)
BOT_ROLE_PERMISSIONS = EVERYONE_PERMISSIONS | P.MANAGE_MESSAGES | P.MANAGE_THREADS | P.CREATE_PRIVATE_THREADS

# Channel types.
GUILD_TEXT, DM, GUILD_VOICE, GUILD_CATEGORY = 0, 1, 2, 4
PUBLIC_THREAD, PRIVATE_THREAD = 11, 12
THREAD_TYPES = (10, PUBLIC_THREAD, PRIVATE_THREAD)

USER_MENTION_RE = re.compile(r"<@!?(\d+)>")
ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")


@dataclass(eq=False)
class FakeUser:
    id: int
    name: str
    bot: bool = False
    global_name: Optional[str] = None
    accepts_dms: bool = True  # False: the bot's direct messages are refused (50007), as Discord does

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.global_name or self.name,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass(eq=False)
class FakeRole:
    id: int
    guild_id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False
    bot_id: Optional[int] = None
    mentionable: bool = True

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def payload(self) -> dict:
        data = {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": self.managed,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass(eq=False)
class FakeChannel:
    """A guild text/voice channel, a thread (``parent_id`` set) or a DM (``recipient`` set)."""

    id: int
    type: int
    name: Optional[str]
    guild_id: Optional[int] = None
    parent_id: Optional[int] = None
    position: int = 0
    owner_id: Optional[int] = None
    recipient: Optional[FakeUser] = None
    overwrites: list = field(default_factory=list)  # raw permission_overwrites dicts
    topic: Optional[str] = None
    auto_archive_duration: int = 1440

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    def payload(self, *, permissions: Optional[int] = None) -> dict:
        if self.type == DM:
            return {"id": str(self.id), "type": DM, "last_message_id": None,
                    "recipients": [self.recipient.payload()]}
        data = {
            "id": str(self.id),
            "type": self.type,
            "name": self.name,
            "guild_id": str(self.guild_id),
            "position": self.position,
            "permission_overwrites": list(self.overwrites),
            "parent_id": str(self.parent_id) if self.parent_id else None,
            "nsfw": False,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }
        if self.type == GUILD_TEXT:
            data["topic"] = self.topic
        if self.type == GUILD_VOICE:
            data.update(bitrate=64000, user_limit=0, rtc_region=None, video_quality_mode=1)
        if self.is_thread:
            data.update(
                owner_id=str(self.owner_id),
                message_count=0,
                member_count=1,
                total_message_sent=0,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": self.auto_archive_duration,
                    "archive_timestamp": iso_now(),
                    "locked": False,
                    "invitable": True,
                    "create_timestamp": iso_now(),
                },
            )
            del data["permission_overwrites"], data["position"]
        if permissions is not None:  # interaction / resolved channel shape
            data["permissions"] = str(permissions)
        return data


@dataclass(eq=False)
class FakeMember:
    user: FakeUser
    roles: list  # role ids, without @everyone
    nick: Optional[str] = None
    joined_at: str = field(default_factory=iso_now)

    def payload(self, *, with_user: bool = True, permissions: Optional[int] = None) -> dict:
        data = {
            "roles": [str(r) for r in self.roles],
            "nick": self.nick,
            "avatar": None,
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass(eq=False)
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: dict = field(default_factory=dict)  # id -> FakeRole (incl. @everyone, id == guild id)
    channels: dict = field(default_factory=dict)  # id -> FakeChannel (threads included)
    members: dict = field(default_factory=dict)  # user id -> FakeMember
    voice_states: dict = field(default_factory=dict)  # user id -> FakeVoiceState

    @property
    def everyone(self) -> FakeRole:
        return self.roles[self.id]

    def base_permissions(self, user_id: int) -> int:
        """Guild-level permissions (owner/administrator => all)."""
        if user_id == self.owner_id:
            return P.ALL
        member = self.members.get(user_id)
        perms = self.everyone.permissions
        for role_id in member.roles if member else ():
            perms |= self.roles[role_id].permissions
        return P.ALL if perms & P.ADMINISTRATOR else perms

    def payload(self) -> dict:
        channels = [c for c in self.channels.values() if not c.is_thread]
        threads = [c for c in self.channels.values() if c.is_thread]
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [r.payload() for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "nsfw_level": 0,
            "unavailable": False,
            "large": False,
            "member_count": len(self.members),
            "joined_at": iso_now(),
            "channels": [c.payload() for c in channels],
            "threads": [c.payload() for c in threads],
            "members": [m.payload() for m in self.members.values()],
            "voice_states": [v.payload() for v in self.voice_states.values()],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass(eq=False)
class FakeVoiceState:
    """Who is in which voice channel of a guild (VOICE_STATE_UPDATE, GUILD_CREATE's voice_states)."""

    guild_id: int
    user_id: int
    channel_id: Optional[int]
    session_id: str
    self_mute: bool = False
    self_deaf: bool = False

    def payload(self, member: Optional[FakeMember] = None) -> dict:
        data = {
            "guild_id": str(self.guild_id),
            "channel_id": str(self.channel_id) if self.channel_id else None,
            "user_id": str(self.user_id),
            "session_id": self.session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": self.self_deaf,
            "self_mute": self.self_mute,
            "self_video": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }
        if member is not None:
            data["member"] = member.payload()
        return data


def channel_permissions(guild: FakeGuild, channel: FakeChannel, user_id: int) -> int:
    """Discord's permission algorithm: base permissions, then @everyone/role/member overwrites
    of the channel (of the parent channel for threads)."""
    perms = guild.base_permissions(user_id)
    if perms == P.ALL:
        return perms
    if channel.is_thread and channel.parent_id in guild.channels:
        channel = guild.channels[channel.parent_id]
    overwrites = {int(o["id"]): o for o in channel.overwrites}

    def apply(o):
        nonlocal perms
        if o is not None:
            perms = (perms & ~int(o.get("deny", 0))) | int(o.get("allow", 0))

    apply(overwrites.get(guild.id))
    member = guild.members.get(user_id)
    role_ids = member.roles if member else []
    role_allow = role_deny = 0
    for rid in role_ids:
        o = overwrites.get(rid)
        if o is not None:
            role_allow |= int(o.get("allow", 0))
            role_deny |= int(o.get("deny", 0))
    perms = (perms & ~role_deny) | role_allow
    apply(overwrites.get(user_id))
    return perms
