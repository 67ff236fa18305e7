"""Conversations as JSON Lines, one per line:
`{"id": "...", "turns": [{"author": "...", "text": "...", "time": "ISO 8601 or epoch"}]}`.

Each line is one conversation already (nothing is cut at silences); its turns follow one another.
`time` may be left out.
"""

from __future__ import annotations

from pathlib import Path

from training.imports.messages import Export, ExportError, Message, epoch_seconds, parse_json

EXPECTED = ('JSON Lines, one conversation per line: {"id": "...", "turns": [{"author": "...", "text": "...", '
            '"time": "ISO 8601 or epoch"}]}')


def read(path: Path) -> Export:
    """The turns of every line; ExportError naming the file and line at the first problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot be read ({exc}); expected {EXPECTED}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ExportError(f"{path}: the file is empty; expected {EXPECTED}")
    if len(lines) > 1 and not lines[0][1].rstrip().endswith("}"):
        whole = parse_json(text, str(path), EXPECTED)  # a pretty-printed document rather than lines?
        raise ExportError(f"{path}: one JSON {type(whole).__name__}, not one conversation per line; expected {EXPECTED}")
    export = Export("jsonl", "JSON Lines conversations", [path.name], len(lines), [], cut=True,
                    suggested_name=path.stem)
    for n, line in lines:
        where = f"{path}: line {n}"
        conversation = parse_json(line, where, EXPECTED)
        turns = conversation.get("turns") if isinstance(conversation, dict) else None
        if not isinstance(turns, list) or not turns:
            raise ExportError(f"{where}: expected an object with a non-empty list of turns; expected {EXPECTED}")
        for i, turn in enumerate(turns, 1):
            if not isinstance(turn, dict) or not isinstance(turn.get("author"), str) or not turn["author"].strip() \
                    or not isinstance(turn.get("text"), str):
                raise ExportError(f"{where}: turn {i}: expected an object with author and text (strings)")
            author = turn["author"].strip()
            export.know(author, author)
            time = epoch_seconds(turn["time"], f"{where}: turn {i}") if turn.get("time") is not None else None
            export.messages.append(Message(id=f"{n}.{i}", channel=str(n), author_id=author, text=turn["text"],
                                           time=time))
    return export
