"""Output safety: no pings, no offensive replies, no degenerate replies.

Adapters also switch mentions off at the platform level; this is the second lock.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

ZWSP = "\u200b"

# Discord: <@123>, <@!123>, <@&123> (role), <#123> is harmless.  Slack: <@U123>, <!channel>, <!here>,
# <!everyone>, <!subteam^S123>.  Both: a bare @everyone / @here.
_DISCORD_PING = re.compile(r"<@[!&]?(\d+)>")
_SLACK_PING = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_SLACK_SPECIAL = re.compile(r"<!(channel|here|everyone|subteam\^[A-Z0-9]+)(?:\|[^>]*)?>", re.IGNORECASE)
_MASS_MENTION = re.compile(r"@(everyone|here|channel)\b", re.IGNORECASE)


def neutralize_mentions(text: str) -> str:
    """Rewrite every ping syntax so that no platform can notify anyone from it."""
    text = _SLACK_SPECIAL.sub(lambda m: "@" + ZWSP + m.group(1).split("^")[0], text)
    text = _SLACK_PING.sub(lambda m: "@" + ZWSP + (m.group(2) or m.group(1)), text)
    text = _DISCORD_PING.sub(lambda m: "@" + ZWSP + m.group(1), text)
    return _MASS_MENTION.sub(lambda m: "@" + ZWSP + m.group(1), text)


@lru_cache(maxsize=1)
def _classifier():
    from profanity_check import predict_prob

    return predict_prob


def offensive_scores(texts: list[str]) -> list[float]:
    """Probability that each text is offensive (alt-profanity-check's model)."""
    if not texts:
        return []
    return [float(p) for p in _classifier()(list(texts))]


def is_offensive(texts: list[str], threshold: float = 0.8) -> list[bool]:
    """Whether each text is offensive at `threshold`."""
    return [score >= threshold for score in offensive_scores(texts)]


_WORD = re.compile(r"\w+", re.UNICODE)
_STUTTER = re.compile(r"(.{3,}?)\1{5,}", re.DOTALL)


def _normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _says_something(text: str) -> bool:
    """Letters, digits or emoji: a reply of emoji alone ("👍", "😂😂") says something too."""
    return any(ch.isalnum() or unicodedata.category(ch) in ("So", "Sk") for ch in text)


def degeneracy(reply: str, user_text: str) -> str | None:
    """Why a reply is degenerate (empty, echo, looping), or None if it is fine."""
    if not _says_something(reply):
        return "empty"
    words = _normalize(reply).split()
    if len(words) >= 2 and _normalize(reply) == _normalize(user_text):
        return "echo"
    if _STUTTER.search(reply):
        return "loop"
    if len(words) >= 8:
        for n in (1, 2, 3, 4):
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            most = max(grams.count(g) for g in set(grams))
            if most * n >= 0.6 * len(words) and most >= 4:
                return "loop"
    return None


_SENTENCE_END = re.compile(r"[.!?…]['\")\]*]*(?:\s|$)|\n")
_PARTIAL_WORD = re.compile(r"[\w'’-]+$")
_TRAILING_AT = re.compile(r"@\w*$")
WORDS_PER_SCREEN = 16


class StreamScreen:
    """What of a reply being generated may be shown, and when it has to be screened first.

    Anything that could still turn into a ping ("<@12", "@every") is held back. With `screening`
    on, so is a trailing partial word ("Dick" may yet become "Dickens", "ass" become "assess"), and
    shown text is screened first, at most once per sentence (or per WORDS_PER_SCREEN words of a
    sentence that runs on); the whole reply is screened once more at the end.
    """

    def __init__(self, screening: bool = True) -> None:
        self.screening = screening
        self.raw = ""
        self.shown = ""
        self.checkpoint = False  # whether the text feed returned ends a sentence (or a long run of words)
        self._checked = ""

    def feed(self, piece: str) -> str | None:
        """Add raw text; returns the text that may be shown next (after screening it, when
        screening is on), or None while nothing new is due."""
        self.raw += piece
        ready = self._showable()
        if len(ready) <= len(self.shown):
            return None
        fresh = ready[len(self._checked):] if ready.startswith(self._checked) else ready
        self.checkpoint = bool(_SENTENCE_END.search(fresh)) or len(fresh.split()) >= WORDS_PER_SCREEN
        if self.checkpoint:
            self._checked = ready
        return ready if self.checkpoint or not self.screening else None

    def show(self, text: str) -> None:
        """Record that `text` (from feed) passed the screen and is shown."""
        self.shown = text

    @property
    def text(self) -> str:
        """The whole reply as it would be shown, once generation has ended."""
        return neutralize_mentions(self.raw).strip()

    def _showable(self) -> str:
        end = len(self.raw)
        last_open = self.raw.rfind("<")
        if last_open >= 0 and ">" not in self.raw[last_open:]:
            end = last_open
        for pattern in (_TRAILING_AT, _PARTIAL_WORD) if self.screening else (_TRAILING_AT,):
            held = pattern.search(self.raw, 0, end)
            if held:
                end = held.start()
        return neutralize_mentions(self.raw[:end]).strip()
