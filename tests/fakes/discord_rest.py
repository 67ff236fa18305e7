"""REST API v10 handlers of the fake Discord, and its message/interaction bookkeeping.

A mixin of ``FakeDiscord`` (discord_server.py), which owns the state and the route table. Handlers
take the recorded ``RestCall`` plus the path parameters and return a payload, or ``(status,
payload)``; ``DiscordError`` becomes Discord's JSON error body.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import unquote

from .discord_models import (
    EVERYONE_PERMISSIONS, GUILD_TEXT, PRIVATE_THREAD, PUBLIC_THREAD, ROLE_MENTION_RE, USER_MENTION_RE,
    FakeChannel, FakeGuild, FakeRole, FakeUser, channel_permissions, iso_now, snowflake, snowflake_id,
)

EPHEMERAL, LOADING, HAS_THREAD = 1 << 6, 1 << 7, 1 << 5
MESSAGE_DEFAULT, MESSAGE_REPLY, MESSAGE_CHAT_INPUT_COMMAND = 0, 19, 20
_NOT_ON_WIRE = ("allowed_mentions", "at")  # kept on stored messages for assertions only ("at": time.monotonic())


class WaitTimeout(AssertionError):
    """A ``wait_*`` helper ran out of time."""


class DiscordError(Exception):
    def __init__(self, status: int, code: int, message: str, errors: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors


@dataclass
class RestCall:
    method: str
    path: str  # below /api/v10, e.g. "/channels/123/messages"
    json: Any  # the JSON body (payload_json of a multipart body); None without one
    query: dict
    files: list  # multipart files: {"field", "filename", "content_type", "data"}
    status: int = 0
    unknown: bool = False  # no such route in the fake


@dataclass(eq=False)
class FakeInteraction:
    """An INTERACTION_CREATE sent to the bot and everything the bot answered to it."""

    id: int
    token: str
    type: int  # 2 application command, 4 autocomplete
    channel_id: int
    guild_id: Optional[int]
    user: FakeUser
    payload: dict  # as dispatched
    responses: list = field(default_factory=list)  # callbacks: {"type", "data", "flags", "ephemeral"}
    followups: list = field(default_factory=list)  # {"body", "flags", "ephemeral", "message"}
    edits: list = field(default_factory=list)  # {"message_id" ("@original" or id), "body"}
    original: Optional[dict] = None  # message created by a type 4/5 response

    @property
    def response(self) -> Optional[dict]:
        return self.responses[0] if self.responses else None

    @property
    def choices(self) -> Optional[list]:
        """Autocomplete choices of a type 8 response."""
        r = self.response
        return r["data"].get("choices") if r and r["type"] == 8 else None


class RestHandlers:
    """REST route handlers; mixed into FakeDiscord."""

    # -- lookups (404 like Discord) ------------------------------------------------------------

    def _channel(self, channel) -> FakeChannel:
        found = self.channels.get(snowflake_id(channel))
        if found is None:
            raise DiscordError(404, 10003, "Unknown Channel")
        return found

    def _guild(self, guild_id) -> FakeGuild:
        if int(guild_id) not in self.guilds:
            raise DiscordError(404, 10004, "Unknown Guild")
        return self.guilds[int(guild_id)]

    def _user(self, user_id) -> FakeUser:
        if int(user_id) not in self.users:
            raise DiscordError(404, 10013, "Unknown User")
        return self.users[int(user_id)]

    def _message(self, message_id) -> dict:
        msg = self._message_index.get(int(message_id)) if str(message_id).isdigit() else None
        if msg is None:
            raise DiscordError(404, 10008, "Unknown Message")
        return msg

    def _bot_user_payload(self) -> dict:
        return dict(self.bot_user.payload(), verified=True, mfa_enabled=False, flags=0, locale="en-US")

    # -- gateway, users, guilds ----------------------------------------------------------------

    def _get_gateway(self, call):
        return {"url": self.gateway_url}

    def _get_gateway_bot(self, call):
        return {"url": self.gateway_url, "shards": self.shard_count, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}}

    def _get_application(self, call):
        owner = next(u for u in self.users.values() if not u.bot) if len(self.users) > 1 else self.bot_user
        return {"id": str(self.application_id), "name": self.bot_user.name, "description": "", "icon": None,
                "bot_public": True, "bot_require_code_grant": False, "owner": owner.payload(), "team": None,
                "verify_key": "0" * 64, "flags": 0, "rpc_origins": [], "summary": "",
                "bot": self.bot_user.payload(), "interactions_endpoint_url": None}

    def _create_dm(self, call):
        channel = self.dm_channel(self._user(call.json["recipient_id"]))
        self.dm_channels_created.append(channel)
        return channel.payload()

    def _get_guild_channels(self, call, guild_id):
        return [c.payload() for c in self._guild(guild_id).channels.values() if not c.is_thread]

    def _get_member(self, call, guild_id, user_id):
        member = self._guild(guild_id).members.get(int(user_id))
        if member is None:
            raise DiscordError(404, 10007, "Unknown Member")
        return member.payload()

    def _members_chunk(self, d: dict) -> dict:
        """GUILD_MEMBERS_CHUNK for a REQUEST_GUILD_MEMBERS (op 8)."""
        guild = self.guilds.get(int(d["guild_id"]))
        members = list(guild.members.values()) if guild else []
        if d.get("user_ids"):
            wanted = {int(u) for u in d["user_ids"]}
            members = [m for m in members if m.user.id in wanted]
        elif d.get("query"):
            members = [m for m in members if m.user.name.lower().startswith(d["query"].lower())]
        if d.get("limit"):
            members = members[: d["limit"]]
        chunk = {"guild_id": str(d["guild_id"]), "members": [m.payload() for m in members],
                 "chunk_index": 0, "chunk_count": 1}
        if d.get("nonce"):
            chunk["nonce"] = d["nonce"]
        return chunk

    # -- messages ------------------------------------------------------------------------------

    def _new_message(self, channel: FakeChannel, author: FakeUser, body: dict, *, extra_mentions=(),
                     extra_role_mentions=(), files=(), msg_type: Optional[int] = None) -> dict:
        content = body.get("content") or ""
        mentioned = {snowflake_id(u) for u in extra_mentions}
        mentioned |= {int(i) for i in USER_MENTION_RE.findall(content) if int(i) in self.users}
        roles = {snowflake_id(r) for r in extra_role_mentions} | {int(i) for i in ROLE_MENTION_RE.findall(content)}
        msg = {
            "id": str(snowflake()),
            "channel_id": str(channel.id),
            "author": author.payload(),
            "content": content,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts")),
            "mention_everyone": bool(body.get("mention_everyone")),
            "mentions": [self.users[i].payload() for i in sorted(mentioned) if i in self.users],
            "mention_roles": [str(r) for r in sorted(roles)],
            "attachments": self._make_attachments(channel, body.get("attachments") or [], files),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "type": msg_type if msg_type is not None else MESSAGE_DEFAULT,
            "flags": body.get("flags") or 0,
            "at": time.monotonic(),
        }
        if body.get("nonce") is not None:
            msg["nonce"] = body["nonce"]
        if channel.guild_id:
            msg["guild_id"] = str(channel.guild_id)
        ref = body.get("message_reference")
        if ref and ref.get("message_id"):
            target = self._message_index.get(int(ref["message_id"]))
            if target is None and ref.get("fail_if_not_exists", True):
                raise DiscordError(400, 50035, "Invalid Form Body", {"message_reference": {"_errors": [
                    {"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]}})
            if target is not None:
                msg["message_reference"] = {"type": 0, "message_id": target["id"],
                                            "channel_id": target["channel_id"], "guild_id": target.get("guild_id")}
                msg["referenced_message"] = {k: v for k, v in self._wire(target).items() if k != "referenced_message"}
                if msg_type is None:
                    msg["type"] = MESSAGE_REPLY
        return msg

    def _make_attachments(self, channel: FakeChannel, declared: list, files) -> list:
        """Attachment payloads; ``declared`` are user_says dicts (with ``data``) or, for uploads,
        the ``attachments`` of discord.py's payload_json (``id`` = index of ``files[i]``)."""
        out = []
        uploads = {f["field"]: f for f in files}
        for i, att in enumerate(declared):
            upload = uploads.get(f"files[{att.get('id', i)}]")
            data = upload["data"] if upload else att.get("data", b"")
            filename = att.get("filename") or (upload or {}).get("filename") or f"file{i}"
            aid = snowflake()
            self._attachments[aid] = data
            url = f"{self.base_url}/attachments/{channel.id}/{aid}/{filename}"
            out.append({"id": str(aid), "filename": filename, "size": len(data), "url": url, "proxy_url": url,
                        "content_type": att.get("content_type") or (upload or {}).get("content_type"),
                        "description": att.get("description")})
        return out

    @staticmethod
    def _validate(body: Optional[dict], files) -> dict:
        body = body or {}
        content = body.get("content") or ""
        if len(content) > 2000:
            raise DiscordError(400, 50035, "Invalid Form Body", {"content": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}})
        if not (content or body.get("embeds") or files or body.get("components") or body.get("sticker_ids")
                or body.get("poll")):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        return body

    @staticmethod
    def _wire(msg: dict) -> dict:
        return {k: v for k, v in msg.items() if k not in _NOT_ON_WIRE}

    def _gateway_message(self, msg: dict) -> dict:
        """A stored message as MESSAGE_CREATE/UPDATE carries it: with ``member`` in guilds."""
        data = self._wire(msg)
        guild = self.guilds.get(int(msg.get("guild_id") or 0))
        if guild is not None:
            author = guild.members.get(int(msg["author"]["id"]))
            if author is not None and not msg.get("webhook_id"):
                data["member"] = author.payload(with_user=False)
            data["mentions"] = [dict(u, member=guild.members[int(u["id"])].payload(with_user=False))
                                if int(u["id"]) in guild.members else u for u in msg["mentions"]]
        return data

    def _store_and_dispatch(self, msg: dict, *, visible: bool = True) -> None:
        self._message_index[int(msg["id"])] = msg
        if visible:
            self.messages[int(msg["channel_id"])].append(msg)
            guild_id = int(msg.get("guild_id") or 0) or None
            mentions_bot = any(int(u["id"]) == self.bot_user.id for u in msg["mentions"])
            self.gateway.dispatch("MESSAGE_CREATE", self._gateway_message(msg), guild_id=guild_id,
                                  mentions_bot=mentions_bot)
        self._changed()

    def _apply_edit(self, msg: dict, body: dict, *, visible: bool = True) -> dict:
        for key in ("content", "embeds", "components", "allowed_mentions"):
            if key in body and body[key] is not None:
                msg[key] = body[key]
        if "flags" in body and body["flags"] is not None:
            msg["flags"] = body["flags"]
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = iso_now()
        if visible:
            self.gateway.dispatch("MESSAGE_UPDATE", self._gateway_message(msg),
                                  guild_id=int(msg.get("guild_id") or 0) or None)
        return self._wire(msg)

    def _create_message(self, call, channel_id):
        channel = self._channel(channel_id)
        if channel.recipient is not None and not channel.recipient.accepts_dms:
            raise DiscordError(403, 50007, "Cannot send messages to this user")
        body = self._validate(call.json, call.files)
        msg = self._new_message(channel, self.bot_user, body, files=call.files)
        msg["allowed_mentions"] = body.get("allowed_mentions")
        self._store_and_dispatch(msg)
        return self._wire(msg)

    def _list_messages(self, call, channel_id):
        msgs = self.messages[self._channel(channel_id).id]
        limit = int(call.query.get("limit", 50))
        q = call.query
        if "after" in q:
            picked = [m for m in msgs if int(m["id"]) > int(q["after"])][:limit]
        elif "before" in q:
            picked = [m for m in msgs if int(m["id"]) < int(q["before"])][-limit:]
        elif "around" in q:
            idx = next((i for i, m in enumerate(msgs) if int(m["id"]) >= int(q["around"])), len(msgs))
            picked = msgs[max(0, idx - limit // 2): idx - limit // 2 + limit]
        else:
            picked = msgs[-limit:]
        return [self._wire(m) for m in reversed(picked)]

    def _get_message(self, call, channel_id, message_id):
        msg = self._message(message_id)
        if msg["channel_id"] != str(self._channel(channel_id).id):
            raise DiscordError(404, 10008, "Unknown Message")
        return self._wire(msg)

    def _edit_message(self, call, channel_id, message_id):
        msg = self._message(message_id)
        if int(msg["author"]["id"]) != self.bot_user.id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        body = call.json or {}
        self.edits.append({"channel_id": int(channel_id), "message_id": int(message_id), "body": body,
                           "at": time.monotonic()})
        return self._apply_edit(msg, body)

    def _delete_message(self, call, channel_id, message_id):
        msg = self._message(message_id)
        self._message_index.pop(int(message_id))
        with contextlib.suppress(ValueError):
            self.messages[int(channel_id)].remove(msg)
        self.deletions.append({"channel_id": int(channel_id), "message_id": int(message_id)})
        guild_id = int(msg.get("guild_id") or 0) or None
        self.gateway.dispatch("MESSAGE_DELETE", {"id": msg["id"], "channel_id": msg["channel_id"],
                                                 **({"guild_id": msg["guild_id"]} if guild_id else {})},
                              guild_id=guild_id)
        return 204, None

    def _typing(self, call, channel_id):
        self.typing.append(self._channel(channel_id).id)
        return 204, None

    def _react(self, call, channel_id, message_id, emoji):
        self._message(message_id)
        self.reactions.append({"channel_id": int(channel_id), "message_id": int(message_id),
                               "emoji": unquote(emoji), "added": call.method == "PUT"})
        return 204, None

    # -- threads -------------------------------------------------------------------------------

    def _new_thread(self, call, parent: FakeChannel, thread_id: int, thread_type: int) -> FakeChannel:
        if parent.type != GUILD_TEXT:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        body = call.json or {}
        thread = FakeChannel(thread_id, thread_type, body.get("name") or "thread", guild_id=parent.guild_id,
                             parent_id=parent.id, owner_id=self.bot_user.id,
                             auto_archive_duration=body.get("auto_archive_duration") or 1440)
        self._add_channel(thread, newly_created=True)
        self.threads_created.append(thread)
        return thread

    def _thread_from_message(self, call, channel_id, message_id):
        parent, msg = self._channel(channel_id), self._message(message_id)
        if msg.get("thread"):
            raise DiscordError(400, 160004, "A thread has already been created for this message")
        thread = self._new_thread(call, parent, int(message_id), PUBLIC_THREAD)  # id == starter message id
        msg["thread"] = thread.payload()
        msg["flags"] |= HAS_THREAD
        return 201, thread.payload()

    def _thread_without_message(self, call, channel_id):
        thread_type = (call.json or {}).get("type") or PRIVATE_THREAD
        return 201, self._new_thread(call, self._channel(channel_id), snowflake(), thread_type).payload()

    # -- application commands ------------------------------------------------------------------

    def _commands_list(self, app_id, guild_id) -> list:
        if int(app_id) != self.application_id:
            raise DiscordError(403, 50001, "Missing Access")
        if guild_id is None:
            return self.global_commands
        return self.guild_commands.setdefault(self._guild(guild_id).id, [])

    def _get_commands(self, call, app_id, guild_id=None):
        return self._commands_list(app_id, guild_id)

    def _put_commands(self, call, app_id, guild_id=None):
        old = {(c["name"], c.get("type", 1)): c for c in self._commands_list(app_id, guild_id)}
        stored = []
        for cmd in call.json or []:
            prev = old.get((cmd["name"], cmd.get("type", 1)))
            entry = {"default_member_permissions": None, "dm_permission": True, "nsfw": False,
                     "options": [], "description": "", **cmd}
            entry.update(id=prev["id"] if prev else str(snowflake()), application_id=str(self.application_id),
                         version=str(snowflake()), type=cmd.get("type", 1))
            if guild_id:
                entry["guild_id"] = str(guild_id)
            stored.append(entry)
        if guild_id is None:
            self.global_commands = stored
        else:
            self.guild_commands[int(guild_id)] = stored
        self.command_syncs.append((int(guild_id) if guild_id else None, call.json))
        return stored

    def _registered_command(self, guild: Optional[FakeGuild], name: str) -> dict:
        candidates = (self.guild_commands.get(guild.id, []) if guild else []) + self.global_commands
        for cmd in candidates:
            if cmd["name"] == name and cmd.get("type", 1) == 1:
                return cmd
        raise LookupError(f"slash command /{name} is not registered (guild: "
                          f"{[c['name'] for c in candidates if c.get('guild_id')]}, "
                          f"global: {[c['name'] for c in self.global_commands]}); did the bot sync its tree?")

    def _option(self, guild, schema: list, name: str, value, resolved: dict, focused: bool) -> dict:
        declared = next((o for o in schema if o["name"] == name), None)
        if declared is not None:
            opt_type = declared["type"]
        elif isinstance(value, bool):
            opt_type = 5
        elif isinstance(value, (int, float)):
            opt_type = 4 if isinstance(value, int) else 10
        elif isinstance(value, FakeUser):
            opt_type = 6
        elif isinstance(value, FakeChannel):
            opt_type = 7
        elif isinstance(value, FakeRole):
            opt_type = 8
        else:
            opt_type = 3
        if opt_type in (6, 7, 8, 9):
            oid = snowflake_id(value)
            if oid in self.users:
                resolved.setdefault("users", {})[str(oid)] = self.users[oid].payload()
                if guild is not None and oid in guild.members:
                    resolved.setdefault("members", {})[str(oid)] = guild.members[oid].payload(
                        with_user=False, permissions=guild.base_permissions(oid))
            elif oid in self.channels:
                ch = self.channels[oid]
                resolved.setdefault("channels", {})[str(oid)] = ch.payload(
                    permissions=channel_permissions(guild, ch, self.bot_user.id) if guild else 0)
            elif guild is not None and oid in guild.roles:
                resolved.setdefault("roles", {})[str(oid)] = guild.roles[oid].payload()
            value = str(oid)
        option = {"type": opt_type, "name": name, "value": str(value) if focused else value}
        if focused:
            option["focused"] = True
        return option

    # -- interactions --------------------------------------------------------------------------

    def _dispatch_interaction(self, channel: FakeChannel, user: FakeUser, itype: int, data: dict,
                              locale: str) -> FakeInteraction:
        guild = self.guilds.get(channel.guild_id)
        iid, token = snowflake(), "itok-" + secrets.token_urlsafe(24)
        payload = {
            "id": str(iid), "application_id": str(self.application_id), "type": itype, "token": token,
            "version": 1, "attachment_size_limit": 8 * 1024 * 1024, "data": data, "locale": locale,
            "channel_id": str(channel.id), "entitlements": [], "entitlement_sku_ids": [],
        }
        if guild is not None:
            if user.id not in guild.members:
                self.add_member(guild, user)
            payload.update(
                guild_id=str(guild.id), guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US", context=0, authorizing_integration_owners={"0": str(guild.id)},
                member=guild.members[user.id].payload(permissions=channel_permissions(guild, channel, user.id)),
                channel=channel.payload(permissions=channel_permissions(guild, channel, user.id)),
                app_permissions=str(channel_permissions(guild, channel, self.bot_user.id)),
            )
        else:
            payload.update(user=user.payload(), context=1, authorizing_integration_owners={"0": str(user.id)},
                           channel=channel.payload(), app_permissions=str(EVERYONE_PERMISSIONS))
        interaction = FakeInteraction(iid, token, itype, channel.id, guild.id if guild else None, user, payload)
        self.interactions[iid] = interaction
        self.gateway.dispatch("INTERACTION_CREATE", payload, guild_id=interaction.guild_id)
        self._changed()
        return interaction

    def _interaction_for_token(self, app_id, token) -> FakeInteraction:
        found = next((i for i in self.interactions.values() if i.token == token), None)
        if found is None or int(app_id) != self.application_id:
            raise DiscordError(404, 10015, "Unknown Webhook")
        return found

    def _interaction_message(self, inter: FakeInteraction, body: dict, files, *, original: bool) -> dict:
        channel = self.channels[inter.channel_id]
        msg = self._new_message(channel, self.bot_user, body, files=files,
                                msg_type=MESSAGE_CHAT_INPUT_COMMAND if original else MESSAGE_DEFAULT)
        msg.update(webhook_id=str(self.application_id), application_id=str(self.application_id),
                   allowed_mentions=body.get("allowed_mentions"),
                   interaction_metadata={"id": str(inter.id), "type": inter.type, "user": inter.user.payload(),
                                         "authorizing_integration_owners": {}})
        self._store_and_dispatch(msg, visible=not msg["flags"] & EPHEMERAL)
        return msg

    def _interaction_callback(self, call, interaction_id, token):
        inter = self.interactions.get(int(interaction_id)) if interaction_id.isdigit() else None
        if inter is None or inter.token != token:
            raise DiscordError(404, 10062, "Unknown interaction")
        if inter.responses:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        body = call.json or {}
        rtype, data = body.get("type"), body.get("data") or {}
        flags = data.get("flags") or 0
        if rtype == 4:
            self._validate(data, call.files)
        inter.responses.append({"type": rtype, "data": data, "flags": flags, "ephemeral": bool(flags & EPHEMERAL)})
        info = {"id": str(inter.id), "type": inter.type, "response_message_loading": rtype == 5,
                "response_message_ephemeral": bool(flags & EPHEMERAL)}
        resource: dict = {"type": rtype}
        if rtype in (4, 5):
            msg_body = data if rtype == 4 else {"content": "", "flags": flags | LOADING}
            inter.original = self._interaction_message(inter, msg_body, call.files, original=True)
            info["response_message_id"] = inter.original["id"]
            resource["message"] = self._wire(inter.original)
        return {"interaction": info, "resource": resource}

    def _followup(self, call, app_id, token):
        inter = self._interaction_for_token(app_id, token)
        if not inter.responses:
            raise DiscordError(404, 10015, "Unknown Webhook")
        body = self._validate(call.json, call.files)
        flags = body.get("flags") or 0
        original = inter.original
        if original is not None and original["flags"] & LOADING:
            # Like Discord: the first followup after a defer fills the deferred message, whose
            # ephemerality was decided by the defer (the followup's flags do not change it).
            self._apply_edit(original, dict(body, flags=original["flags"]),
                             visible=not original["flags"] & EPHEMERAL)
            msg = original
        else:
            msg = self._interaction_message(inter, body, call.files, original=False)
        inter.followups.append({"body": body, "flags": flags, "ephemeral": bool(flags & EPHEMERAL), "message": msg})
        if call.query.get("wait") in ("1", "true", "True"):
            return self._wire(msg)
        return 204, None

    def _webhook_message(self, inter: FakeInteraction, message_id: str) -> dict:
        if message_id == "@original":
            if inter.original is None:
                raise DiscordError(404, 10008, "Unknown Message")
            return inter.original
        msg = self._message(message_id)
        if msg is not inter.original and all(f["message"] is not msg for f in inter.followups):
            raise DiscordError(404, 10008, "Unknown Message")
        return msg

    def _get_webhook_message(self, call, app_id, token, message_id):
        return self._wire(self._webhook_message(self._interaction_for_token(app_id, token), message_id))

    def _edit_webhook_message(self, call, app_id, token, message_id):
        inter = self._interaction_for_token(app_id, token)
        msg = self._webhook_message(inter, message_id)
        body = call.json or {}
        inter.edits.append({"message_id": message_id, "body": body})
        return self._apply_edit(msg, dict(body, flags=msg["flags"]), visible=not msg["flags"] & EPHEMERAL)

    def _delete_webhook_message(self, call, app_id, token, message_id):
        msg = self._webhook_message(self._interaction_for_token(app_id, token), message_id)
        self._message_index.pop(int(msg["id"]), None)
        with contextlib.suppress(ValueError):
            self.messages[int(msg["channel_id"])].remove(msg)
        self.deletions.append({"channel_id": int(msg["channel_id"]), "message_id": int(msg["id"])})
        return 204, None
