"""What Whisper says to silence and noise, which nobody said.

Whisper was trained on subtitled video: given silence, breathing or noise it often "hears" a
subtitle credit or a sign-off, or writes a caption such as "[Music]" or "(upbeat music)". Captions
are removed; a transcript that is then only such phrases ("Thanks for watching! Please subscribe."),
only punctuation, or one phrase looping is dropped; a sentence that merely contains one of these
phrases is kept.
"""

from __future__ import annotations

import re

# Whole transcripts (lower case, punctuation removed) that are Whisper's, not the speaker's.
PHRASES = frozenset({
    "thank you for watching", "thanks for watching", "thank you so much for watching",
    "thank you very much for watching", "thanks for watching and see you next time",
    "please subscribe", "please like and subscribe", "like and subscribe", "subscribe to my channel",
    "dont forget to like and subscribe", "see you next time", "see you in the next video",
    "subtitles by the amaraorg community", "transcription by castingwords", "subtitles by",
    "thank you", "thanks", "you", "bye", "bye bye", "oh", "um", "uh", "hmm", "so",
    "music", "applause", "laughter", "silence", "no speech", "blank audio",
})
_WORDS = re.compile(r"[^\w\s]+")
_CAPTION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|♪[^♪]*♪")  # what Whisper writes for sounds, not words
_CLAUSE = re.compile(r"[.!?,;:…]+(?:\s|$)")  # not inside "Amara.org"


def real_words(text: str) -> str | None:
    """The transcript as a turn, or None when it is empty or a known hallucination."""
    text = " ".join(_CAPTION.sub(" ", text).split())
    normal = _normal(text)
    if not normal or _loops(normal.split()):
        return None
    clauses = [_normal(clause).removeprefix("and ") for clause in _CLAUSE.split(text)]
    if all(clause in PHRASES for clause in clauses if clause):
        return None
    return text


def _normal(text: str) -> str:
    return " ".join(_WORDS.sub("", text.lower()).split())


def _loops(words: list[str]) -> bool:
    """One short phrase said over and over ("you you you you", "thank you thank you thank you")."""
    if len(words) < 4:
        return False
    for size in range(1, 4):
        unit = words[:size]
        if len(words) >= 3 * size and all(words[i] == unit[i % size] for i in range(len(words))):
            return True
    return False
