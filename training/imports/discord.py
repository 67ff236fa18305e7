"""DiscordChatExporter's JSON export of a channel (one file per channel) -> messages.

A file is `{"guild": {...}, "channel": {...}, "messages": [{"id", "type", "timestamp", "content",
"author": {"id", "name", "nickname", "isBot"}, "mentions": [...], "reference": {"messageId"}}],
"messageCount"}`. Its content is plain text already: mentions read "@name".
"""

from __future__ import annotations

from pathlib import Path

from training.imports.messages import Export, ExportError, Message, epoch_seconds, load_json

EXPECTED = 'a DiscordChatExporter JSON export of a channel ({"guild", "channel", "messages": [...]})'
PERSON_TYPES = {"Default", "Reply"}  # every other type is a system message (joins, pins, calls, ...)


def read(paths: list[Path]) -> Export:
    """The messages of every file; ExportError naming the file at the first problem."""
    export = Export("discord", "DiscordChatExporter JSON", [p.name for p in paths], 0, [])
    channels = set()
    for path in paths:
        doc = load_json(path, EXPECTED)
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list) \
                or not isinstance(doc.get("channel"), dict):
            raise ExportError(f"{path}: not a DiscordChatExporter export; expected {EXPECTED}")
        if not doc["messages"]:
            raise ExportError(f"{path}: the channel has no messages; expected {EXPECTED} with messages")
        channel = str(doc["channel"].get("id") or path)
        channels.add(channel)
        if not export.suggested_name:
            export.suggested_name = str(doc["channel"].get("name") or path.stem)
        for number, raw in enumerate(doc["messages"], 1):
            export.messages.append(_message(raw, channel, export, f"{path}: message {number}"))
    export.channels = len(channels)
    return export


def _message(raw, channel: str, export: Export, where: str) -> Message:
    author = raw.get("author") if isinstance(raw, dict) else None
    if not isinstance(author, dict) or not raw.get("id") or not author.get("id") \
            or not isinstance(raw.get("content", ""), str) or "timestamp" not in raw:
        raise ExportError(f"{where}: expected an object with id, timestamp, content and author {{id, name}}")
    author_id = str(author["id"])
    export.know(author_id, author.get("name"), author.get("nickname"))
    for mentioned in raw.get("mentions") or []:
        if isinstance(mentioned, dict) and mentioned.get("id"):
            export.know(str(mentioned["id"]), mentioned.get("name"), mentioned.get("nickname"))
    if author.get("isBot"):
        kind = "bot"
    else:
        kind = "person" if raw.get("type", "Default") in PERSON_TYPES else "system"
    reference = raw.get("reference") or {}
    return Message(
        id=str(raw["id"]), channel=channel, author_id=author_id, text=raw.get("content") or "",
        time=epoch_seconds(raw["timestamp"], where), kind=kind,
        reply_to=str(reference["messageId"]) if reference.get("messageId") else None,
    )
