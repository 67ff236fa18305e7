"""Files attached to a message: which ones are read into the conversation, and how they read there.

A text file (known by its name: .txt .md .csv .json .log and source code; or by a text/* type),
in UTF-8 and up to `service.max_attachment_kb`, becomes a quoted block with its name in the turn it
came with, so it is stored, fitted to the persona's context and forgotten like the message itself.
Any other file gets a short note to the person that the persona cannot read it; the message is
answered as it would be without it. The adapters fetch the bytes (bots/chat/files.py); what is
read, and how it reads, is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

from core.admission import Message, readable

TEXT_SUFFIXES = frozenset((
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".log", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".conf", ".xml", ".html", ".css", ".sql", ".diff", ".patch", ".tex",
    ".py", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".scala", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".cs", ".go", ".rs", ".rb", ".php", ".pl", ".lua", ".r", ".swift", ".dart", ".hs", ".sh", ".bash", ".ps1",
    ".vue", ".svelte",
))
TEXT_TYPES = ("text/", "application/json", "application/x-ndjson", "application/xml", "application/x-yaml")
KINDS = ".txt, .md, .csv, .json, .log or source code"


@dataclass(frozen=True)
class AttachedFile:
    """A file attached to a message, as its platform describes it."""

    name: str
    size: int
    content_type: str | None = None


def unread_because(file: AttachedFile, max_bytes: int) -> str | None:
    """Why the persona will not read this file (a note for the person), or None: fetch and read it."""
    if not is_text(file):
        return f"I can't read {file.name}: I only read text files ({KINDS})."
    if file.size > max_bytes:
        return too_large(file, max_bytes)
    return None


def too_large(file: AttachedFile, max_bytes: int) -> str:
    return f"I didn't read {file.name}: it is over {max_bytes // 1024} KB."


def is_text(file: AttachedFile) -> bool:
    if PurePosixPath(file.name.lower()).suffix in TEXT_SUFFIXES:
        return True
    content_type = (file.content_type or "").split(";")[0].strip().lower()
    return content_type.startswith(TEXT_TYPES)


def decode(file: AttachedFile, data: bytes) -> str | None:
    """The file's text, or None when it is not UTF-8 text after all."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text if "\x00" not in text and readable(text) else None


def not_text(file: AttachedFile) -> str:
    return f"I can't read {file.name}: it is not UTF-8 text."


def quoted(file: AttachedFile, text: str) -> str:
    """A file's text as it is read into the turn: its name, then each line quoted."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    return f"{file.name}:\n" + "\n".join(f"> {line}" if line else ">" for line in lines)


def with_files(message: Message, blocks: Sequence[str]) -> Message:
    """The message with the quoted files after its words."""
    return Message("\n\n".join(part for part in (message.text, *blocks) if part))
