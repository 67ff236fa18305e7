"""An export -> DATA_DIR/raw/NAME.jsonl, shaped as `ttt scrape` writes a subreddit, so that
`ttt build-data`, `ttt train` and `ttt eval` take it unchanged.

Bots' and system messages, empty ones and the people left out are dropped; the rest is cut into
conversations (training/imports/conversations.py) and pseudonymised (pseudonyms.py): no platform
id or name is written. Each conversation is a thread without a title whose comment tree is the
conversation's. Beside it, NAME.import.json records the consent, the source and the counts for the
dataset card. Each file is written whole or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from training.imports.conversations import ChatTurn, conversation_trees
from training.imports.messages import Export, ExportError, Message
from training.imports.pseudonyms import Pseudonyms

RECORD_SUFFIX = ".import.json"
DEFAULT_SILENCE_MINUTES = 30.0


@dataclass
class ImportSummary:
    name: str
    raw: Path  # the threads, as `ttt scrape` writes them
    record: Path  # consent, source and counts
    counts: dict[str, int]
    cut: bool  # the export held conversations already (JSON Lines), not channels

    def lines(self) -> list[str]:
        c = self.counts
        return [
            f"{c['messages']} messages in {c['channels']} {'conversation' if self.cut else 'channel'}(s) of "
            f"{c['files']} file(s): "
            f"{c['bot_messages']} by bots, {c['system_messages']} system, {c['empty_messages']} empty, "
            f"{c['excluded_messages']} by the {c['excluded_people']} people left out",
            f"{c['turns']} turns by {c['people']} people in {c['conversations']} conversations "
            f"written to {self.raw}",
        ]


def record_path(raw: Path) -> Path:
    """Where the import record of raw threads lives (absent for a scraped subreddit)."""
    return raw.with_name(raw.name.removesuffix(".jsonl") + RECORD_SUFFIX)


def read_record(raw: Path) -> dict | None:
    """The import record beside raw threads, or None when they were scraped."""
    path = record_path(raw)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def dataset_name(text: str) -> str:
    """A name for data and persona made of what `text` offers: lower case letters, digits, '-' and '_'."""
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-_")[:64]


def save_import(
    export: Export, name: str, raw_dir: Path, consent: str, exclude_users: list[str] | None = None,
    silence_minutes: float = DEFAULT_SILENCE_MINUTES, progress: bool = False,
) -> ImportSummary:
    """Write the export's conversations to raw_dir/NAME.jsonl and its record; ExportError if nothing
    would be written or the input is wrong (then nothing is written). A progress bar if `progress`."""
    if not consent.strip():
        raise ExportError("--consent is empty: say whose conversations these are and that they agreed")
    if silence_minutes <= 0:
        raise ExportError(f"--silence-minutes must be above 0, got {silence_minutes:g}")
    raw = raw_dir / f"{name}.jsonl"
    if raw.exists() and not record_path(raw).exists():
        raise ExportError(f"{raw} holds scraped threads, not an import: choose another --name")
    excluded = _excluded_people(export, exclude_users or [])
    counts = {"files": len(export.files), "channels": export.channels, "messages": len(export.messages),
              "bot_messages": 0, "system_messages": 0, "empty_messages": 0, "excluded_messages": 0,
              "excluded_people": len(excluded)}

    def keep(message: Message) -> bool:
        if message.kind != "person":
            counts[f"{message.kind}_messages"] += 1
        elif message.author_id in excluded:
            counts["excluded_messages"] += 1
        elif not message.text.strip():
            counts["empty_messages"] += 1
        else:
            return True
        return False

    silence_s = None if export.cut else silence_minutes * 60
    roots = conversation_trees(export.messages, keep, silence_s)
    if not roots:
        raise ExportError(
            f"{', '.join(export.files)}: no message written by a person ({counts['bot_messages']} by bots, "
            f"{counts['system_messages']} system, {counts['empty_messages']} empty, "
            f"{counts['excluded_messages']} by people left out)")
    pseudonyms = Pseudonyms(export.people)
    threads = [_thread(root, f"{name}-{i}", name, pseudonyms) for i, root in
               enumerate(tqdm(roots, desc="pseudonymising", unit="conversation", disable=not progress, leave=False), 1)]
    times = [t.time for root in roots for t in root.walk() if t.time is not None]
    counts.update(conversations=len(roots), turns=sum(1 for root in roots for _ in root.walk()),
                  people=len({turn.author_id for root in roots for turn in root.walk()}))
    record = {
        "name": name, "source": export.source, "format": export.format, "consent": consent.strip(),
        "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "silence_minutes": None if export.cut else silence_minutes,
        "first_utc": min(times, default=None), "last_utc": max(times, default=None), "counts": counts,
    }
    raw_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(raw, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in threads))
    _write_atomically(record_path(raw), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return ImportSummary(name, raw, record_path(raw), counts, export.cut)


def _excluded_people(export: Export, exclude_users: list[str]) -> set[str]:
    """The author ids named (by id or any of their names, in any case); ExportError for a name
    nobody has: a typo there would let in someone who did not agree."""
    excluded = set()
    for wanted in (w.strip() for w in exclude_users if w.strip()):
        found = {pid for pid, names in export.people.items()
                 if pid == wanted or wanted.lower() in {n.lower() for n in names}}
        if not found:
            raise ExportError(f"--exclude-users: nobody in {', '.join(export.files)} has the id or name {wanted!r}")
        excluded |= found
    return excluded


def _thread(root: ChatTurn, thread_id: str, name: str, pseudonyms: Pseudonyms) -> dict:
    counter = itertools.count(1)

    def comment(turn: ChatTurn) -> dict:
        return {"id": f"{thread_id}.{next(counter)}", "author": pseudonyms.of(turn.author_id),
                "body": pseudonyms.scrub(turn.text), "score": 0, "created_utc": turn.time,
                "replies": [comment(reply) for reply in turn.replies]}

    return {"id": thread_id, "title": "", "selftext": "", "author": pseudonyms.of(root.author_id),
            "created_utc": root.time, "score": 0, "permalink": "", "subreddit": name,
            "comments": [comment(root)]}


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
