"""Phonemes for Piper voices from the `espeak-ng` program, run as a separate process.

Piper voices are trained on espeak-ng's IPA. piper-tts (GPL-3.0-or-later) links espeak-ng through a
bridge of its own; this project (MIT) runs the `espeak-ng` program instead, which prints one line of
IPA per clause but not the punctuation that ended it. Piper's voices hear that punctuation (its
phoneme ids include `. , ? !`), so the clause ends are predicted here with espeak-ng's own rules
(its ReadClause, re-implemented from reading piper-tts 1.8's phonemizer; no code of it is used)
and the two are zipped. Should espeak-ng ever cut a text differently, each clause is phonemized on
its own instead.

    sentences = phonemize("Hello there. How are you?", "en-us")   # [[phoneme, ...], [...]]
    ids = phoneme_ids(sentences[0], config["phoneme_id_map"])
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from dataclasses import dataclass

ESPEAK = "espeak-ng"
PAD, BOS, EOS = "_", "^", "$"
_LANGUAGE_SWITCH = re.compile(r"\([^)]+\)")  # espeak-ng marks a switch of language as "(fr)...(en)"
_CLAUSE_END = ".,?!:;\u2026"
_BRACKETS = "()[]{}"
_ELLIPSIS = "\u2026"


class EspeakFailed(RuntimeError):
    """espeak-ng could not be run, or refused the text."""


@dataclass(frozen=True)
class Clause:
    text: str
    terminator: str  # the punctuation the voice hears at its end ("" for none)
    ends_sentence: bool


def clauses(text: str) -> list[Clause]:
    """The clauses espeak-ng cuts `text` into, in order.

    `. , ? ! : ;` end a clause only before whitespace, a bracket, `?` or the end of the text; a run
    of `?`/`!` counts as its first mark; `..`, `...` and `…` are an ellipsis (no terminator, not a
    sentence end); a `.` followed on the same line by a lower-case letter or by `'s` is an
    abbreviation; punctuation before any letter or digit ends nothing; a blank line ends a sentence.
    """
    found: list[Clause] = []
    n, i, start, has_word = len(text), 0, 0, False
    while i < n:
        c = text[i]
        has_word = has_word or c.isalnum()
        if c == "\n":
            k, newlines = _skip_space(text, i + 1)
            if newlines and k < n:  # a blank line: a new paragraph
                found.append(Clause(text[start:i], "", True))
                start, has_word, i = k, False, k
                continue
        if c not in _CLAUSE_END:
            i += 1
            continue
        j, kind = i + 1, c
        if c == "." and text[j:j + 1] == ".":
            while j < n and text[j] == ".":
                j += 1
            kind = _ELLIPSIS
        elif c in "?!":
            while j < n and text[j] in "?!":
                j += 1
        after = text[j] if j < n else ""
        if after and not (after.isspace() or after in _BRACKETS or after == "?" or kind == _ELLIPSIS):
            i = j
            continue
        k, newlines = _skip_space(text, j)
        following = text[k] if k < n else ""
        abbreviation = newlines == 0 and kind == "." and (
            following.islower() or (following == "'" and text[k + 1:k + 2] == "s"))
        if not has_word or abbreviation:
            i = j
            continue
        if newlines > 1:
            terminator, ends = "", True
        elif kind == _ELLIPSIS:
            terminator, ends = "", False
        else:
            terminator, ends = kind, kind in ".?!"
        found.append(Clause(text[start:j], terminator, ends))
        start, has_word, i = k, False, k
    if text[start:].strip():
        found.append(Clause(text[start:], "", True))
    return [clause for clause in found if clause.text.strip()]


def _skip_space(text: str, i: int) -> tuple[int, int]:
    """The index of the next non-space character from `i`, and the newlines skipped."""
    newlines = 0
    while i < len(text) and text[i].isspace():
        newlines += text[i] == "\n"
        i += 1
    return i, newlines


def espeak_ipa(text: str, voice: str) -> list[str]:
    """espeak-ng's IPA of `text`, one line per clause (the text goes in on stdin, never as an argument)."""
    try:
        done = subprocess.run([ESPEAK, "-q", "--ipa", "-v", voice, "--stdin"], input=text.encode(),
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EspeakFailed(f"{ESPEAK} could not be run: {exc}") from None
    if done.returncode != 0:
        raise EspeakFailed(f"{ESPEAK} -v {voice} failed: {done.stderr.decode(errors='replace').strip()}")
    return [line.strip() for line in done.stdout.decode().splitlines() if line.strip()]


def phonemize(text: str, voice: str) -> list[list[str]]:
    """`text` as Piper hears it: one list of phonemes (Unicode code points, NFD) per sentence, the
    clauses' punctuation included."""
    cut = clauses(text)
    if not cut:
        return []
    lines = espeak_ipa(text, voice)
    if len(lines) != len(cut):
        lines = [" ".join(espeak_ipa(clause.text, voice)) for clause in cut]
    sentences: list[list[str]] = []
    current: list[str] = []
    for ipa, clause in zip(lines, cut):
        said = _LANGUAGE_SWITCH.sub("", ipa) + clause.terminator
        if clause.terminator in (",", ":", ";"):
            said += " "
        current.extend(unicodedata.normalize("NFD", said))
        if clause.ends_sentence:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return [sentence for sentence in sentences if sentence]


def phoneme_ids(phonemes: list[str], id_map: dict[str, list[int]]) -> list[int]:
    """Piper's input: BOS, then each phoneme followed by PAD, then EOS (phonemes the voice lacks are dropped)."""
    ids = [*id_map[BOS], *id_map[PAD]]
    for phoneme in phonemes:
        if phoneme in id_map:
            ids += [*id_map[phoneme], *id_map[PAD]]
    return ids + id_map[EOS]
