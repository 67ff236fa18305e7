"""Long text cut into messages of a platform's size, at the best boundary, code blocks kept whole."""

from __future__ import annotations

import re

# Where a long text may be cut, best first; group 1 is the whitespace the cut removes.
_BOUNDARIES = (
    re.compile(r"(\n[ \t]*\n(?:[ \t]*\n)*)"),  # paragraph
    re.compile(r"(\n)"),  # line
    re.compile(r"[.!?…]+[\"')\]*_~]*([ \t]+)"),  # sentence
    re.compile(r"([ \t]+)"),  # word
)
_FENCE = re.compile(r"^ {0,3}(`{3,})([^`\n]*)$", re.MULTILINE)  # a code fence line: ``` or ```python
_CLOSE_AT_START = re.compile(r"[ \t]*`{3,}[ \t]*(?:\n|$)")


def split_text(text: str, limit: int, *, unbreakable: re.Pattern | None = None) -> list[str]:
    """Pieces of at most `limit` characters, cut at a paragraph, line, sentence or word boundary
    (in that order of preference, never in the first half of a piece), else mid-word.

    Code fences stay balanced: a piece that ends inside a code block closes it, and the next one
    reopens it with the same language. `unbreakable` matches what must never be cut (a platform's
    escapes, such as Slack's `&amp;`); fence lines are never cut either.
    """
    pieces: list[str] = []
    fence: str | None = None  # the fence line ("```python") open where the previous piece ended
    rest = text.strip()
    while rest:
        # Reopen with the language, unless that leaves too little room (tiny limits).
        head = (fence if len(fence) <= limit // 4 else _ticks(fence)) + "\n" if fence else ""
        open_at_end = _fence_after(rest, fence)
        if len(head) + len(rest) + (len(_closing(open_at_end)) if open_at_end else 0) <= limit:
            pieces.append(head + rest + (_closing(open_at_end) if open_at_end else ""))
            break
        # Room for closing whatever block the cut may leave open.
        closings = [_closing(m.group(1)) for m in _FENCE.finditer(rest)] + ([_closing(fence)] if fence else [])
        reserve = max(map(len, closings), default=0)
        end, resume = _cut(rest, max(1, limit - len(head) - reserve), unbreakable)
        fence = _fence_after(rest, fence, end)  # fence lines are whole lines of the text, never cut
        body, at_line_start, rest = rest[:end].rstrip(), rest[resume - 1 : resume] == "\n", rest[resume:]
        if fence is not None:
            body += _closing(fence)
            closing = _CLOSE_AT_START.match(rest) if at_line_start else None
            if closing:  # the block ends right here: the added fence stands for its own
                rest, fence = rest[closing.end():], None
        pieces.append(head + body)
        rest = rest.lstrip("\n") if fence else rest.lstrip()
    return pieces


def _cut(text: str, room: int, unbreakable: re.Pattern | None) -> tuple[int, int]:
    """Where a piece of at most `room` characters of `text` ends, and where the next one starts."""
    protected = [m.span() for m in _FENCE.finditer(text, 0, room + 1)]
    if unbreakable is not None:
        protected += [m.span() for m in unbreakable.finditer(text, max(0, room - 64), room + 64)]

    def inside(position: int) -> bool:
        return any(start < position < end for start, end in protected)

    for boundary in _BOUNDARIES:
        cuts = [
            m.span(1) for m in boundary.finditer(text, 0, room + 16)
            if room // 2 < m.start(1) <= room and not inside(m.start(1))
        ]
        if cuts:
            return cuts[-1]
    end = room
    for start, stop in protected:
        if 0 < start < end < stop:
            end = start
    return end, end


def _fence_after(text: str, fence: str | None, end: int | None = None) -> str | None:
    """The fence line still open at `end` of `text` (default: its end), given the one open at its start."""
    for match in _FENCE.finditer(text, 0, len(text) if end is None else end + 1):
        if end is not None and match.end() > end:
            break
        if fence is None:
            fence = match.group(1) + "".join(match.group(2).split()[:1])  # ``` and the language
        elif not match.group(2).strip() and len(match.group(1)) >= len(_ticks(fence)):
            fence = None
    return fence


def _ticks(fence: str) -> str:
    return fence[: len(fence) - len(fence.lstrip("`"))]


def _closing(fence: str) -> str:
    return "\n" + _ticks(fence)
