"""Exports as the tools people use write them, built for tests: DiscordChatExporter's JSON of a
channel, a Slack workspace export (a folder, or its zip), JSON Lines conversations."""

from __future__ import annotations

import json
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2024, 3, 1, 18, 0, tzinfo=timezone.utc)


class DiscordExport:
    """One channel's export; `say` appends a message `at` minutes after START and returns its id."""

    def __init__(self, channel: str = "general", channel_id: str = "880000000000000001"):
        self.channel = {"id": channel_id, "type": "GuildTextChat", "categoryId": "870000000000000001",
                        "category": "Text Channels", "name": channel, "topic": None}
        self.messages: list[dict] = []

    def say(self, user: dict, text: str, at: float, reply_to: str | None = None, kind: str | None = None,
            mentions: list[dict] = ()) -> str:
        message_id = str(900000000000000000 + len(self.messages) + 1)
        message = {
            "id": message_id, "type": kind or ("Reply" if reply_to else "Default"),
            "timestamp": (START + timedelta(minutes=at)).isoformat(), "timestampEdited": None,
            "callEndedTimestamp": None, "isPinned": False, "content": text,
            "author": {"id": user["id"], "name": user["name"], "discriminator": "0000",
                       "nickname": user.get("nickname", user["name"]), "color": None,
                       "isBot": user.get("bot", False), "avatarUrl": "https://cdn.example/a.png"},
            "attachments": [], "embeds": [], "stickers": [], "reactions": [],
            "mentions": [{"id": m["id"], "name": m["name"], "discriminator": "0000",
                          "nickname": m.get("nickname", m["name"]), "isBot": False} for m in mentions],
        }
        if reply_to:
            message["reference"] = {"messageId": reply_to, "channelId": self.channel["id"],
                                    "guildId": "860000000000000001"}
        self.messages.append(message)
        return message_id

    def document(self) -> dict:
        return {"guild": {"id": "860000000000000001", "name": "Study Group", "iconUrl": "https://cdn.example/g.png"},
                "channel": self.channel, "dateRange": {"after": None, "before": None},
                "messages": self.messages, "messageCount": len(self.messages)}

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.document(), indent=2), encoding="utf-8")
        return path


def discord_user(user_id: str, name: str, nickname: str | None = None, bot: bool = False) -> dict:
    return {"id": user_id, "name": name, "nickname": nickname or name, "bot": bot}


class SlackExport:
    """A workspace export: users, channels, and messages per channel and day."""

    def __init__(self):
        self.users: list[dict] = []
        self.channels: dict[str, list[dict]] = {}

    def user(self, user_id: str, name: str, real_name: str, bot: bool = False) -> str:
        self.users.append({"id": user_id, "name": name, "real_name": real_name, "deleted": False, "is_bot": bot,
                           "profile": {"real_name": real_name, "display_name": name}})
        return user_id

    def say(self, channel: str, user: str, text: str, at: float, thread_of: str | None = None,
            subtype: str | None = None, bot: bool = False) -> str:
        ts = f"{(START + timedelta(minutes=at)).timestamp():.6f}"
        message = {"type": "message", "text": text, "ts": ts}
        message.update({"bot_id": "B0BOT"} if bot else {"user": user})
        if subtype:
            message["subtype"] = subtype
        if thread_of:
            message["thread_ts"] = thread_of
        self.channels.setdefault(channel, []).append(message)
        return ts

    def files(self) -> dict[str, str]:
        out = {"users.json": json.dumps(self.users),
               "channels.json": json.dumps([{"id": f"C{i:04d}", "name": name, "created": 1700000000}
                                            for i, name in enumerate(self.channels)])}
        for name, messages in self.channels.items():
            days: dict[str, list[dict]] = {}
            for message in messages:
                day = datetime.fromtimestamp(float(message["ts"]), timezone.utc).date().isoformat()
                days.setdefault(day, []).append(message)
            for day, items in days.items():
                out[f"{name}/{day}.json"] = json.dumps(items)
        return out

    def write_folder(self, folder: Path) -> Path:
        for name, text in self.files().items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
        return folder

    def write_zip(self, path: Path) -> Path:
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in self.files().items():
                archive.writestr(name, text)
        return path


def write_jsonl(path: Path, conversations: list[list[tuple[str, str]]], minutes_apart: float = 1) -> Path:
    """Conversations of (author, text) turns, one per line, with ISO times."""
    lines = []
    for n, turns in enumerate(conversations):
        start = START + timedelta(days=n)
        lines.append(json.dumps({"id": f"c{n}", "turns": [
            {"author": author, "text": text, "time": (start + timedelta(minutes=i * minutes_apart)).isoformat()}
            for i, (author, text) in enumerate(turns)]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chitchat_conversations(count: int, first: int = 0) -> list[list[dict]]:
    """Real conversations between people (chitchat-dataset, MIT): each a list of messages
    {"text", "timestamp", "sender"}, in order."""
    import chitchat_dataset

    data = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text(encoding="utf-8"))
    chosen = list(data.values())[first:first + count]
    return [[message for turn in conversation["messages"] for message in turn] for conversation in chosen]


def chitchat_discord_export(count: int) -> DiscordExport:
    """A channel where `count` real conversations happened one after the other, hours apart, each
    message answering the one before it as plain channel history."""
    export = DiscordExport("student-lounge")
    users: dict[str, dict] = {}
    minute = 0.0
    for conversation in chitchat_conversations(count):
        for message in conversation:
            sender = message["sender"]
            if sender not in users:
                users[sender] = discord_user(str(700000000000000000 + len(users)), f"student{len(users)}")
            export.say(users[sender], message["text"], minute)
            minute += 0.5
        minute += 180
    return export
