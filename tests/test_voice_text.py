"""What the bot says aloud: speakable text and sentence streaming."""

from __future__ import annotations

import pytest

from core.safety import neutralize_mentions
from voice.speak.sentences import SentenceSplitter
from voice.speak.speakable import CODE_SAID, speakable


@pytest.mark.parametrize("text, said", [
    ("**Bold** and *italic*, __underlined__ ~~struck~~ ***both***.", "Bold and italic, underlined struck both."),
    ("# Title\n> a quote\n- first\n* second\n1. third", "Title a quote first second third"),
    ("Look:\n```python\nprint('hi. there?')\n```\nNice.", f"Look: {CODE_SAID} Nice."),
    ("Unfinished ```code that never ends", f"Unfinished {CODE_SAID}"),
    ("Run `ttt say` now, not `" + "x" * 60 + "`.", "Run ttt say now, not that code."),
    ("See https://www.example.com/path?q=1. Or [the docs](https://docs.example.org) and www.python.org!",
     "See a link to example dot com. Or the docs and a link to python dot org!"),
    ("Write to help@example.com today", "Write to help at example dot com today"),
    ("Hi <@123>, see <#456> and <@&789> :wave: <:party:111222>", "Hi someone, see a channel and a role"),
    (neutralize_mentions("@everyone look <@123> and @bob"), "everyone look someone and bob"),
    ("Great job 🎉👍🏽 really ❤️", "Great job really"),
    ("Nice :) see you ;-) xD <3 ^_^ \\o/ :P", "Nice see you"),
    ("||the butler did it|| ok", "spoiler ok"),
    ("It costs $3.50, or €1, 25% off, 1,234 items in 2024.", "It costs three dollars and fifty cents, or one euro, "
     "twenty-five percent off, one thousand, two hundred and thirty-four items in twenty twenty-four."),
    ("Meet at 10:30 or 9:05 or 7:00 on the 3rd; it's -4 and 3.14.", "Meet at ten thirty or nine oh five or seven "
     "o'clock on the third; it's minus four and three point one four."),
    ("Dr. Smith vs. Mr. Jones, e.g. today, i.e. now, etc. and so on etc.", "Doctor Smith versus Mister Jones, for "
     "example today, that is now, et cetera and so on et cetera."),
    ("btw idk, tbh imo it's fine & fun w/ friends", "by the way I don't know, to be honest in my opinion it's fine "
     "and fun with friends"),
    ("£3.2m, $40k or $5 million; 100km in 5kg at 10:30pm on a 4K screen in the 1990s, the '80s and the 2000s.",
     "three point two million pounds, forty thousand dollars or five million dollars; one hundred km in five kg at "
     "ten thirty pm on a four K screen in the nineteen nineties, the eighties and the two thousands."),
    ("😀 :) ```x```", CODE_SAID),
    ("🎉 <:party:1> :)", ""),
])
def test_speakable(text, said):
    assert speakable(text) == said


def test_numbers_stay_for_engines_that_read_them_and_follow_the_language():
    assert speakable("It is 3.5 and 2024, 10%.", read_numbers=False) == "It is 3.5 and 2024, 10%."
    assert speakable("Il y a 3 chats.", language="fr") == "Il y a trois chats."


def stream(text: str, step: int = 1) -> list[tuple[int, str]]:
    """Feed `text` as a model writes it, `step` characters at a time; (length seen, sentence) pairs."""
    splitter, out = SentenceSplitter(), []
    for end in range(step, len(text) + step, step):
        out += [(min(end, len(text)), s) for s in splitter.feed(text[:end])]
    return out + [(len(text), s) for s in splitter.feed(text, final=True)]


def test_sentences_complete_while_the_reply_is_written():
    text = ("Dr. Smith paid $3.50 for it... Then he left! See https://x.io/a.b?c=1 now. Code:\n```py\nx = 1. y?\n```\n"
            "Pi is 3.14 here. The U.S. team won. A last one")
    got = stream(text)
    assert [s.strip() for _, s in got] == [
        "Dr. Smith paid $3.50 for it...", "Then he left!", "See https://x.io/a.b?c=1 now.",
        "Code:", "```py\nx = 1. y?\n```", "Pi is 3.14 here.", "The U.S. team won.", "A last one",
    ]
    assert "".join(s for _, s in got) == text  # nothing lost, nothing repeated
    # Each sentence comes out as soon as the next one has begun, long before the reply ends.
    first_seen, first = got[0]
    assert first_seen < len("Dr. Smith paid $3.50 for it... Then")
    assert [seen for seen, _ in got] == sorted(seen for seen, _ in got)
    assert got[-2][0] < len(text)


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_sentences_do_not_depend_on_how_the_text_arrives(step):
    text = "Hello there. It is 2.5 km away, approx. two hours! Really? Yes... ok. Bye"
    assert [s for _, s in stream(text, step)] == [s for _, s in stream(text, 1)]


def test_a_sentence_that_plainly_ends_is_taken_when_the_reply_pauses_after_it():
    splitter = SentenceSplitter()
    assert splitter.feed("The river is wide today.") == []  # the next words may yet change that
    assert splitter.ended("The river is wide today.") == ["The river is wide today."]
    more = "The river is wide today. It is"
    assert splitter.feed(more) == [] and splitter.ended(more) == []
    for unsure in ("I met Dr.", "It costs 3.", "The U.S.", "Plan A."):
        assert SentenceSplitter().ended(unsure) == [], unsure
    for sure in ("Really?", "Wait...", "Stop!", "It works."):
        assert SentenceSplitter().ended(sure) == [sure], sure


def test_empty_and_whitespace_replies_say_nothing():
    splitter = SentenceSplitter()
    assert splitter.feed("   ") == [] and splitter.feed("   ", final=True) == []
    assert SentenceSplitter().feed("Just one", final=True) == ["Just one"]
