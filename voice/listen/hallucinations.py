"""What Whisper says to silence and noise, which nobody said.

Whisper was trained on subtitled video: given silence, breathing or noise it often "hears" a
subtitle credit or a sign-off. A transcript that is only such a phrase, only punctuation, or one
phrase looping is dropped; a sentence that merely contains one of these phrases is kept.
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


def heard(text: str) -> str | None:
    """The transcript as a turn, or None when it is empty or a known hallucination."""
    text = " ".join(text.split())
    normal = " ".join(_WORDS.sub("", text.lower()).split())
    if not normal or normal in PHRASES:
        return None
    if _loops(normal.split()):
        return None
    return text


def _loops(words: list[str]) -> bool:
    """One short phrase said over and over ("you you you you", "thank you thank you thank you")."""
    if len(words) < 4:
        return False
    for size in range(1, 4):
        unit = words[:size]
        if len(words) >= 3 * size and all(words[i] == unit[i % size] for i in range(len(words))):
            return True
    return False
