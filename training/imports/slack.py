"""A Slack workspace export (a folder, or the .zip Slack gives) -> messages.

The export holds `users.json`, `channels.json` (and, when exported with them, `groups.json`,
`mpims.json`, `dms.json`) and one folder per conversation with a `YYYY-MM-DD.json` list of messages
per day (`ts`, `user`, `text`, `thread_ts`; `subtype` for joins, bots and the like).
"""

from __future__ import annotations

import html
import re
import zipfile
from pathlib import Path, PurePosixPath

from training.imports.messages import Export, ExportError, Message, epoch_seconds, parse_json

EXPECTED = ("a Slack workspace export: a folder or .zip with users.json, channels.json and a folder of "
            "YYYY-MM-DD.json files per channel")
# Conversation lists, and whether a conversation's folder is named by its name or (DMs) its id.
LISTS = (("channels.json", "name"), ("groups.json", "name"), ("mpims.json", "name"), ("dms.json", "id"))
PERSON_SUBTYPES = {None, "thread_broadcast", "me_message", "file_share"}
DAY_FILE = re.compile(r"\d{4}-\d{2}-\d{2}\.json")
_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")


class _ExportFiles:
    """The files of an export, in a folder or a zip (whose entries may sit in one top folder)."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.names = {p.relative_to(path).as_posix() for p in path.rglob("*.json")}
            self._zip = None
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self.names = {n for n in self._zip.namelist() if n.endswith(".json")}
        elif path.exists():
            raise ExportError(f"{path}: neither a folder nor a readable .zip (a half-written download?); "
                              f"expected {EXPECTED}")
        else:
            raise ExportError(f"{path} does not exist; expected {EXPECTED}")
        tops = {PurePosixPath(n).parts[0] for n in self.names}
        self.prefix = f"{tops.pop()}/" if len(tops) == 1 and "users.json" not in self.names else ""

    def has(self, name: str) -> bool:
        return self.prefix + name in self.names

    def json(self, name: str):
        where = f"{self.path}: {name}"
        try:
            data = self._zip.read(self.prefix + name) if self._zip else (self.path / self.prefix / name).read_bytes()
            text = data.decode("utf-8-sig")
        except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise ExportError(f"{where}: cannot be read ({exc}); expected {EXPECTED}") from None
        return parse_json(text, where, EXPECTED)

    def days(self, folder: str) -> list[str]:
        found = [n[len(self.prefix):] for n in self.names if n.startswith(f"{self.prefix}{folder}/")]
        return sorted(n for n in found if DAY_FILE.fullmatch(PurePosixPath(n).name))


def read(path: Path) -> Export:
    """The messages of every conversation in the export; ExportError naming the file at the first problem."""
    files = _ExportFiles(path)
    if not files.has("users.json") or not files.has("channels.json"):
        raise ExportError(f"{path}: no users.json and channels.json; expected {EXPECTED}")
    export = Export("slack", "Slack workspace export", [path.name], 0, [],
                    suggested_name=path.name.removesuffix(".zip"))
    bots = set()
    for user in _list(files, "users.json"):
        profile = user.get("profile") or {}
        export.know(str(user.get("id")), user.get("name"), user.get("real_name"), profile.get("real_name"),
                    profile.get("display_name"))
        if user.get("is_bot") or user.get("is_app_user"):
            bots.add(str(user.get("id")))
    for list_name, folder_key in LISTS:
        if not files.has(list_name):
            continue
        for conversation in _list(files, list_name):
            folder = str(conversation.get(folder_key) or "")
            days = files.days(folder) if folder else []
            if days:
                export.channels += 1
            for day in days:
                messages = files.json(day)
                if not isinstance(messages, list):
                    raise ExportError(f"{path}: {day}: expected a list of messages")
                for number, raw in enumerate(messages, 1):
                    export.messages.append(_message(raw, folder, bots, export, f"{path}: {day}: message {number}"))
    if not export.messages:
        raise ExportError(f"{path}: the export holds no messages; expected {EXPECTED}")
    return export


def _list(files: _ExportFiles, name: str) -> list[dict]:
    items = files.json(name)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ExportError(f"{files.path}: {name}: expected a list of objects; expected {EXPECTED}")
    return items


def _message(raw, channel: str, bots: set[str], export: Export, where: str) -> Message:
    if not isinstance(raw, dict) or not raw.get("ts"):
        raise ExportError(f"{where}: expected an object with ts, user and text")
    user = str(raw.get("user") or raw.get("bot_id") or "")
    profile = raw.get("user_profile") or {}
    if user:
        export.know(user, profile.get("name"), profile.get("real_name"), profile.get("display_name"))
    subtype = raw.get("subtype")
    if raw.get("bot_id") or subtype == "bot_message" or user in bots:
        kind = "bot"
    else:
        kind = "person" if subtype in PERSON_SUBTYPES and user else "system"
    ts, thread = str(raw["ts"]), raw.get("thread_ts")
    return Message(id=ts, channel=channel, author_id=user, text=plain_text(str(raw.get("text") or "")),
                   time=epoch_seconds(ts, where), kind=kind, thread=str(thread) if thread else None)


def plain_text(text: str) -> str:
    """Slack's markup as a person reads it; user mentions stay `<@U123>` for the pseudonyms."""
    def link(match: re.Match) -> str:
        target, label = match[1], match[2]
        if target.startswith("@"):
            return f"<{target}>"
        if target.startswith("#"):
            return f"#{label or 'channel'}"
        if target.startswith("!"):
            special = target[1:].split("^")[0]
            return label or (f"@{special}" if special in ("here", "channel", "everyone") else "")
        return target.removeprefix("mailto:")
    return html.unescape(_LINK.sub(link, text))
