"""Pseudonyms for the people of an export: user1, user2, ... in the order they first appear, and
their mentions in message text replaced by the same pseudonyms."""

from __future__ import annotations

import re

# <@123>, <@!123> (Discord), <@U123> and <@U123|name> (Slack): a mention by platform id.
MENTION_BY_ID = re.compile(r"<@!?([A-Za-z0-9]+)(?:\|[^>]*)?>")


class Pseudonyms:
    """Numbers people as they are met; `scrub` replaces their mentions (by id, or @ and any name
    they go by, in any case) in a text. Names written without @ are not recognised."""

    def __init__(self, people: dict[str, set[str]]):
        self._people = people
        self._numbers: dict[str, str] = {}
        self._by_name = {name.lower(): pid for pid, names in people.items() for name in sorted(names)}
        names = sorted(self._by_name, key=len, reverse=True)
        # One alternation over every name, as a trie: Python's re would try each name at every position.
        self._mention = re.compile(r"(?<![\w@])@(" + _trie(names) + r")(?!\w)", re.IGNORECASE) if names else None

    def of(self, person_id: str) -> str:
        """The pseudonym of a person (given on first use)."""
        if person_id not in self._numbers:
            self._numbers[person_id] = f"user{len(self._numbers) + 1}"
        return self._numbers[person_id]

    def scrub(self, text: str) -> str:
        """The text with every recognised mention as @pseudonym (an unknown id as @someone)."""
        text = MENTION_BY_ID.sub(
            lambda m: "@" + self.of(m[1]) if m[1] in self._people else "@someone", text)
        if self._mention is not None:
            text = self._mention.sub(lambda m: "@" + self.of(self._by_name[m[1].lower()]), text)
        return text


def _trie(words: list[str]) -> str:
    """A regular expression matching any of `words` (longest first), built as a trie of characters."""
    root: dict = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict) -> str:
        branches = [re.escape(char) + render(child) for char, child in node.items() if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return render(root)
