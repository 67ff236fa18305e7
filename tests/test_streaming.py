"""The platform-neutral parts of showing a reply (bots/chat/view.py): splitting and replies in flight.

Streaming, edit budgets and the failure policy are tested end to end through the Discord and
Slack adapters (tests/test_discord_bot.py, tests/test_slack_bot.py).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from bots.chat.ordering import ReplyTasks
from bots.chat.split import split_text


@pytest.mark.timeout(10)
def test_split_text_cuts_at_the_best_boundary_within_the_limit():
    assert split_text("short reply", 2000) == ["short reply"]
    sentences = "One two three. Four five six! Seven eight nine? Ten."
    assert split_text(sentences, 35) == ["One two three. Four five six!", "Seven eight nine? Ten."]
    assert split_text("A first paragraph.\n\nA second. It goes on", 32) == ["A first paragraph.",
                                                                            "A second. It goes on"]
    assert split_text("Line one. Still line one\nline two goes on", 30) == ["Line one. Still line one",
                                                                           "line two goes on"]
    assert split_text("alpha beta gamma delta epsilon", 12) == ["alpha beta", "gamma delta", "epsilon"]
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no boundary: cut mid-word
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    pieces = split_text(text, 2000)
    assert all(len(p) <= 2000 and p.endswith(".") for p in pieces) and " ".join(pieces) == text


@pytest.mark.timeout(10)
def test_split_text_keeps_code_fences_balanced_and_escapes_whole():
    code = "\n".join(f"    step({i})  # indented" for i in range(30))
    text = f"Try this:\n\n```python\n{code}\n```\n\nAnd then ~~~ more words after it."
    pieces = split_text(text, 200)
    assert all(len(p) <= 200 for p in pieces) and len(pieces) > 3
    for piece in pieces:
        fences = re.findall(r"^```.*$", piece, re.MULTILINE)
        assert len(fences) % 2 == 0, piece  # every block opened in a piece is closed in it
        assert all(f == "```" for f in fences[1::2])
    inside = [p for p in pieces if p.startswith("```")]
    assert inside and all(p.startswith("```python\n    step(") for p in inside)  # reopened, indentation kept
    kept = [line for p in pieces for line in p.splitlines() if line.startswith("    step(")]
    assert kept == code.splitlines()

    assert split_text("```\n" + "a b c d e f g h " * 4, 20)[0].startswith("```\n")
    assert split_text("```py\nshort\n", 100) == ["```py\nshort\n```"]  # an unclosed block is closed
    escaped = "x" * 17 + "&amp;&lt;&gt;" + "y" * 10
    entity = re.compile(r"&(?:amp|lt|gt);")
    cut = split_text(escaped, 20, unbreakable=entity)
    assert "".join(cut) == escaped and not any(re.search(r"&[a-z]*$", p) for p in cut)  # no "&am" + "p;"


@pytest.mark.timeout(10)
async def test_reply_tasks_keep_arrival_order_per_conversation_and_stop_in_bounded_time():
    tasks = ReplyTasks("test")
    done: list[str] = []
    gates = {name: asyncio.Event() for name in ("a1", "a2", "b1")}
    finished = {name: asyncio.Event() for name in gates}

    async def reply(name: str) -> None:
        await gates[name].wait()
        done.append(name)
        finished[name].set()

    tasks.spawn(reply("a1"), conversation="a")
    tasks.spawn(reply("a2"), conversation="a")
    tasks.spawn(reply("b1"), conversation="b")
    gates["a2"].set()
    gates["b1"].set()
    await asyncio.wait_for(finished["b1"].wait(), 5)  # other conversations run meanwhile
    assert done == ["b1"]
    gates["a1"].set()
    await asyncio.wait_for(finished["a2"].wait(), 5)
    assert done == ["b1", "a1", "a2"]  # a2 waited for a1

    forever = asyncio.Event()
    tasks.spawn(forever.wait(), conversation="c")
    tasks.spawn(reply("a1"), conversation="c")  # behind a reply that never ends
    await tasks.stop(grace_s=0.2)
    assert len(tasks) == 0 and done == ["b1", "a1", "a2"]
