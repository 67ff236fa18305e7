"""Barge-in: when someone talking over the bot really takes the turn, and when it is only a backchannel.

People say "mhm", "yeah" or "right" while someone else talks, to show they are listening; that is
not taking the turn. So a person takes the turn from the bot with at least
`voice.listen.barge_in_min_ms` of speech (TurnTaker's `on_speech`, as it happens), or, once a
shorter turn is transcribed, with two words that are not backchannels. A turn spoken over the bot
that holds only backchannels neither stops it nor becomes a turn. When the bot is silent, "yeah"
is an answer like any other.
"""

from __future__ import annotations

import re

# "mhm", "yeah", "uh-huh", "right", "okay", as Whisper may write them ("Mm-hmm.", "Uh huh", "OK."),
# lower case, hyphens removed.
BACKCHANNELS = frozenset({
    "mhm", "mhmm", "mmhm", "mmhmm", "mm", "mmm", "hmm", "uhhuh", "uhuh", "yeah", "yea", "yep", "right", "okay", "ok",
})
TURN_WORDS = 2  # words that are not backchannels: enough to take the turn once transcribed
_WORD = re.compile(r"[\w'-]+")


def _words(text: str) -> list[str]:
    return [word.replace("-", "").replace("'", "").lower() for word in _WORD.findall(text)]


def _joined(text: str) -> str:
    """Whisper writes some backchannels as two words ("uh huh", "mm hmm"); read them as one."""
    return re.sub(r"\b(uh|mm|m)[\s-]+(huh|hmm|hm)\b", r"\1\2", text, flags=re.IGNORECASE)


def backchannel(text: str) -> bool:
    """Whether `text` holds words, all of them backchannels ("Mm-hmm.", "Yeah, right.")."""
    words = _words(_joined(text))
    return bool(words) and all(word in BACKCHANNELS for word in words)


def takes_the_turn(text: str) -> bool:
    """Whether `text` holds enough words that are not backchannels to take the turn from the bot."""
    return sum(word not in BACKCHANNELS for word in _words(_joined(text))) >= TURN_WORDS
