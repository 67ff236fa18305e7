"""Chat text as a person would read it aloud: markup, code, links, emoji, mentions and emoticons
become words (or nothing); numbers and abbreviations are spelled out where the engine does not."""

from __future__ import annotations

import re
from functools import partial

from num2words import num2words

CODE_SAID = "See the code in the chat."
ZERO_WIDTH = re.compile(r"[\u200b\u200c\u2060\ufeff]")

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]*)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()\[\]]+[^\s<>()\[\].,;:!?'\"]", re.IGNORECASE)
_EMAIL = re.compile(r"\b([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)\b")
MENTION = re.compile(r"<(@[!&]?|#)\d+>|<a?:\w+:\d+>")
_NEUTRALIZED = re.compile(r"@\u200b(\w+)")  # core.safety.neutralize_mentions' output
_AT_NAME = re.compile(r"(?<![\w@])@(\w+)")
_SHORTCODE = re.compile(r"(?<!\w):[a-z0-9_+-]+:(?!\w)")
_SPOILER = re.compile(r"\|\|.+?\|\|", re.DOTALL)
_LINE_MARKUP = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|>+[ \t]?|[-*+•][ \t]+|\d{1,3}[.)][ \t]+)", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*{1,3}|_{1,3}|~~)(?=\S)(.+?)(?<=\S)\1")
_EMOTICON = re.compile(
    r"(?<!\S)(?:[:;=8xX][-'^o]?[)(\]\[dDpP/\\|*3oO]+|<3+|\^_*\^|\\o/|o/|T_T|-_-)(?!\S)"
)
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\U0001F1E6-\U0001F1FF"
    "\ufe0e\ufe0f\u200d\u20e3\U000E0020-\U000E007F]"
)
_SYMBOLS = re.compile(r"[`*_~|<>#\\^]+")
_SPACES = re.compile(r"[ \t\r\f\v]+")

# Abbreviations read in full: (pattern, words, flags). "etc." keeps its period only at a sentence end.
ABBREVIATIONS = [
    (r"\be\.g\.", "for example", re.I), (r"\bi\.e\.", "that is", re.I), (r"\betc\.(?=\s+[a-z])", "et cetera", 0),
    (r"\betc\.", "et cetera.", re.I), (r"\bvs\.?(?=\s)", "versus", re.I), (r"\bapprox\.", "approximately", re.I),
    (r"\bDr\.(?=\s+[A-Z])", "Doctor", 0), (r"\bMr\.(?=\s+[A-Z])", "Mister", 0), (r"\bMrs\.(?=\s+[A-Z])", "Missus", 0),
    (r"\bMs\.(?=\s+[A-Z])", "Miz", 0), (r"\bw/o\b", "without", re.I), (r"(?<!\w)w/(?=\s)", "with", re.I),
    (r"\bbtw\b", "by the way", re.I), (r"\bimo\b", "in my opinion", re.I), (r"\bimho\b", "in my humble opinion", re.I),
    (r"\btbh\b", "to be honest", re.I), (r"\bidk\b", "I don't know", re.I), (r"\bafaik\b", "as far as I know", re.I),
    (r"\bbrb\b", "be right back", re.I), (r"\bthx\b", "thanks", re.I), (r"\bpl[sz]\b", "please", re.I),
    (r"(?<=\s)&(?=\s)", "and", 0),
]
_ABBREVIATIONS = [(re.compile(pattern, flags), words) for pattern, words, flags in ABBREVIATIONS]

_CURRENCY = re.compile(
    r"([$€£])\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?:\s?(k|m|bn|thousand|million|billion)\b)?",
    re.IGNORECASE,
)
_MAGNITUDES = {"k": "thousand", "m": "million", "bn": "billion"}
_GLUED = re.compile(r"(?<=\d)(?=[^\W\d_])")  # 100km, 10:30am, 4K: the number, then the letters
_CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
                   "£": ("pound", "pounds", "penny", "pence")}
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?%")
_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
_DECADE = re.compile(r"(?<![\w'])'?((?:1[1-9]|20)?\d0)'?s\b")  # the 1990s, the '80s
_TIME = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)\b")
_NUMBER = re.compile(r"(?<![\w.])(-)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")


def speakable(text: str, *, read_numbers: bool = True, language: str = "en") -> str:
    """What to say for `text` (possibly nothing). `read_numbers`: spell numbers out in `language`."""
    text = ZERO_WIDTH.sub("", _NEUTRALIZED.sub(_neutralized, text))
    text = _FENCE.sub(f" {CODE_SAID} ", text)
    text = _INLINE_CODE.sub(lambda m: m.group(1) if len(m.group(1)) <= 40 else "that code", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = URL.sub(lambda m: _link(m.group(0)), text)
    text = _EMAIL.sub(lambda m: f"{m.group(1)} at {_dotted(m.group(2))}", text)
    text = MENTION.sub(_mention, text)
    text = _AT_NAME.sub(r"\1", text)
    text = _SPOILER.sub("spoiler", text)
    text = _LINE_MARKUP.sub("", text)
    for _ in range(2):  # nested emphasis, e.g. ***bold italic*** inside __underline__
        text = _EMPHASIS.sub(r"\2", text)
    text = _EMOTICON.sub("", text)
    text = _SHORTCODE.sub("", text)
    text = _EMOJI.sub("", text)
    for pattern, words in _ABBREVIATIONS:
        text = pattern.sub(words, text)
    if read_numbers:
        text = spell_numbers(text, language)
    text = _SYMBOLS.sub(" ", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return " ".join(line for line in lines if line)


def spell_numbers(text: str, language: str = "en") -> str:
    """Currency, percentages, ordinals, times, years and plain numbers in words."""
    words = partial(_words, language=language)
    text = _CURRENCY.sub(lambda m: _money(m.group(1), m.group(2), m.group(3), words), text)
    text = _PERCENT.sub(lambda m: f"{words(m.group(1))} percent", text)
    text = _ORDINAL.sub(lambda m: words(m.group(1), to="ordinal"), text)
    if language == "en":
        text = _DECADE.sub(lambda m: _plural(words(m.group(1), to="year")), text)
    text = _GLUED.sub(" ", text)
    text = _TIME.sub(lambda m: _clock(int(m.group(1)), int(m.group(2)), words), text)
    return _NUMBER.sub(lambda m: _number(m, words), text)


def _words(number: str, to: str = "cardinal", language: str = "en") -> str:
    value = float(number.replace(",", "")) if "." in number else int(number.replace(",", ""))
    try:
        return num2words(value, lang=language, to=to)
    except (NotImplementedError, OverflowError):
        return number


def _number(match: re.Match, words) -> str:
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    digits = whole.replace(",", "")
    if len(digits) > 12:  # a code or a phone number: digit by digit
        return " ".join(words(d) for d in digits)
    if not fraction and not sign and "," not in whole and len(digits) == 4 and 1100 <= int(digits) <= 2099:
        return words(digits, to="year")
    said = words(whole + fraction)
    return f"minus {said}" if sign else said


def _plural(said: str) -> str:
    """English: "nineteen ninety" -> "nineteen nineties"."""
    return said[:-1] + "ies" if said.endswith("y") else said + "s"


def _money(symbol: str, amount: str, magnitude: str | None, words) -> str:
    one, many, cent, cents = _CURRENCY_NAMES[symbol]
    if magnitude:  # $3.2m: three point two million dollars
        magnitude = magnitude.lower()
        return f"{words(amount)} {_MAGNITUDES.get(magnitude, magnitude)} {many}"
    whole, _, fraction = amount.replace(",", "").partition(".")
    said = f"{words(whole)} {one if whole == '1' else many}"
    if fraction.strip("0"):
        part = int((fraction + "0")[:2])
        said += f" and {words(str(part))} {cent if part == 1 else cents}"
    return said


def _clock(hour: int, minute: int, words) -> str:
    if minute == 0:
        return f"{words(str(hour))} o'clock"
    return f"{words(str(hour))} {'oh ' if minute < 10 else ''}{words(str(minute))}"


def _link(url: str) -> str:
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", url, flags=re.IGNORECASE).split("/")[0].split(":")[0]
    return f"a link to {_dotted(host)}"


def _dotted(host: str) -> str:
    return " dot ".join(part for part in host.split(".") if part)


def _mention(match: re.Match) -> str:
    tag = match.group(0)
    if tag.startswith("<#"):
        return "a channel"
    if tag.startswith("<@&"):
        return "a role"
    return "someone" if tag.startswith("<@") else ""


def _neutralized(match: re.Match) -> str:
    name = match.group(1)
    return "someone" if name.isdigit() else name
