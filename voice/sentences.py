"""Complete sentences out of a reply that is still being written, with pysbd (it knows
abbreviations, decimals and ellipses).

The segmenter runs on the text not yet consumed; a segment is complete once words follow it
(the last one may still grow) until the reply is final. Code blocks, inline code, links and mentions
are masked first, so that their dots and question marks never end a sentence.
"""

from __future__ import annotations

import re

import pysbd

from voice.speakable import MENTION, URL

_WORD = re.compile(r"\w")
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

    def _spans(self, tail: str) -> list[tuple[int, int]]:
        masked = _PROTECTED.sub(lambda m: "x" * len(m.group(0)), tail)
        spans = [(s.start, s.end) for s in self._segmenter.segment(masked)]
        # pysbd's spans cover the text end to end; be safe about any gap at the edges
        if spans:
            spans[0] = (0, spans[0][1])
            spans[-1] = (spans[-1][0], len(tail))
        return spans
