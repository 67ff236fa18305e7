"""Complete sentences out of a reply that is still being written, with pysbd (it knows
abbreviations, decimals and ellipses).

The segmenter runs on the text not yet consumed; a segment is complete once words follow it
(the last one may still grow) until the reply is final. Code blocks, inline code, links and mentions
are masked first, so that their dots and question marks never end a sentence.
"""

from __future__ import annotations

import re

import pysbd
from pysbd.lang.english import English

from voice.speak.speakable import MENTION, URL

_WORD = re.compile(r"\w")
# The end of a text that already ends a sentence: "!", "?", an ellipsis, or a full stop after a word
# that is neither a number ("3." may become "3.5") nor an abbreviation ("Dr." goes on).
_FINAL = re.compile(r"(?:[!?…]|\.\.\.|(?<![\d.])\b(?P<word>\w+)\.)[\"'”’)\]*_]*$")
_ABBREVIATIONS = frozenset(English.Abbreviation.ABBREVIATIONS)
_PROTECTED = re.compile(rf"```.*?(?:```|\Z)|`[^`\n]*`|{URL.pattern}|{MENTION.pattern}", re.DOTALL | re.IGNORECASE)


class SentenceSplitter:
    """Feed it the whole reply so far; it returns the sentences completed since the last feed."""

    def __init__(self, language: str = "en"):
        try:
            self._segmenter = pysbd.Segmenter(language=language, clean=False, char_span=True)
        except ValueError:  # a language pysbd does not know: English rules are a fair default
            self._segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
        self.consumed = 0  # characters of the reply already returned as sentences

    def feed(self, text: str, final: bool = False) -> list[str]:
        tail = text[self.consumed:]
        if not tail.strip():
            if final:
                self.consumed = len(text)
            return []
        if final:
            self.consumed = len(text)
            return [tail[start:end] for start, end in self._spans(tail) if tail[start:end].strip()]
        spans = self._spans(tail)
        # A sentence is complete once words follow it ("it." then "." may still become "it...").
        complete = [span for span in spans[:-1] if _WORD.search(tail, span[1])]
        if not complete:
            return []
        self.consumed += complete[-1][1]
        return [tail[start:end] for start, end in complete if tail[start:end].strip()]

    def ended(self, text: str) -> list[str]:
        """The rest of `text` when it plainly ends a sentence ("!", "?", "...", or a full stop after a
        word that is neither a number nor an abbreviation): for a reply whose next words are slow to
        come (replies screened for safety arrive a whole sentence at a time)."""
        tail = text[self.consumed:]
        spans = self._spans(tail) if tail.strip() else []
        if len(spans) != 1 or not _ends(tail.rstrip()):
            return []
        self.consumed = len(text)
        return [tail]

    def _spans(self, tail: str) -> list[tuple[int, int]]:
        masked = _PROTECTED.sub(lambda m: "x" * len(m.group(0)), tail)
        spans = [(s.start, s.end) for s in self._segmenter.segment(masked)]
        # pysbd's spans cover the text end to end; be safe about any gap at the edges
        if spans:
            spans[0] = (0, spans[0][1])
            spans[-1] = (spans[-1][0], len(tail))
        return spans


def _ends(sentence: str) -> bool:
    """Whether `sentence` ends a sentence for sure, whatever may follow it."""
    match = _FINAL.search(sentence)
    if match is None:
        return False
    word = match.group("word")
    return word is None or (len(word) > 1 and word.lower() not in _ABBREVIATIONS and not word.isdigit())
