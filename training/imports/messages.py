"""What every export reader produces: messages with their platform ids and names, before anything
is cut into conversations, left out or pseudonymised (training/imports/importer.py does that)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

Kind = Literal["person", "bot", "system"]


class ExportError(Exception):
    """An export cannot be imported; the message names the file and what was expected, in one line."""


@dataclass
class Message:
    """One message as an export holds it. Its ids and names never leave training/imports."""

    id: str
    channel: str  # history is cut into conversations per channel
    author_id: str
    text: str
    time: float | None  # seconds since the epoch
    kind: Kind = "person"
    reply_to: str | None = None  # the message it answers (a Discord reply)
    thread: str | None = None  # the first message of the thread it was posted in (Slack), if not itself


@dataclass
class Export:
    """Everything read from one or more export files."""

    source: str  # "discord", "slack" or "jsonl"
    format: str  # what was read, for the dataset card, e.g. "DiscordChatExporter JSON"
    files: list[str]  # file names (never their folders)
    channels: int
    messages: list[Message]
    suggested_name: str = ""  # the data and persona name when none is given (a channel's name, a file's)
    # author id -> the names they go by (user name, nickname, display name): what a mention may say
    people: dict[str, set[str]] = field(default_factory=dict)
    # conversations are already cut (JSONL): no silences to cut at, and no tree beyond each one
    cut: bool = False

    def know(self, person_id: str, *names: str | None) -> None:
        self.people.setdefault(person_id, set()).update(n.strip() for n in names if n and n.strip())


def load_json(path: Path, expected: str):
    """The JSON document in `path`; ExportError naming the file, and what was expected, if it is not one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not a text file; expected {expected}") from None
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror}); expected {expected}") from None
    return parse_json(text, str(path), expected)


def parse_json(text: str, where: str, expected: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise ExportError(f"{where}: the file is empty; expected {expected}") from None
        if exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated string"):
            raise ExportError(f"{where}: the JSON stops before its end (a half-written or cut file?); "
                              f"expected {expected}") from None
        if exc.msg == "Extra data":
            raise ExportError(f"{where}: more than one JSON document (JSON Lines?); expected {expected}") from None
        raise ExportError(f"{where}: not JSON (line {exc.lineno}: {exc.msg}); expected {expected}") from None


def epoch_seconds(value, where: str) -> float:
    """An ISO 8601 time or seconds since the epoch (a number or a numeric string) as epoch seconds."""
    if isinstance(value, bool):
        raise ExportError(f"{where}: time {value!r} is neither ISO 8601 nor seconds since the epoch")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    raise ExportError(f"{where}: time {value!r} is neither ISO 8601 nor seconds since the epoch")
