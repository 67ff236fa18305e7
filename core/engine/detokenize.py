"""A reply's text as its tokens arrive: what may be shown so far, and where a stop string ends it.

Tokens are decoded incrementally (a few tokens of context before the new ones, as TGI and vLLM
do), so each token costs the same however long the reply grows; text is shown only once its
characters are complete and no stop string could still be starting at its end.
"""

from __future__ import annotations


class ReplyText:
    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) - 1 for s in stop), default=0)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far, complete characters only
        self.shown = ""  # what has been handed out
        self.stopped = False  # a stop string appeared: `text` ends where it began
        self._prefix = 0  # tokens[_prefix:_read] is decoding context already in `text`
        self._read = 0

    def add(self, token: int) -> str:
        """Take one generated token; returns the newly showable text (maybe empty)."""
        self.tokens.append(token)
        decode = self._tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - self._hold)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
                return self._show(self.text)
        return self._show(self.text[: len(self.text) - self._hold] if self._hold else self.text)

    def finish(self) -> str:
        """The reply ended (end of turn or length): whatever was held back is shown, an incomplete
        character included (as a full decode would show it)."""
        if not self.stopped and self._read < len(self.tokens):
            decode = self._tokenizer.decode
            before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
            self.text += decode(self.tokens[self._prefix:], skip_special_tokens=True)[len(before):]
        return self._show(self.text)

    def _show(self, visible: str) -> str:
        if len(visible) <= len(self.shown):
            return ""
        piece, self.shown = visible[len(self.shown):], visible
        return piece
