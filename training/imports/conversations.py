"""Messages -> conversation trees, as a subreddit's threads are trees of comments.

- A reply (a Discord reply, a message in a Slack thread) hangs under the message it answers; in a
  Slack thread each message follows the one before it in that thread.
- Any other message follows the channel's previous one, unless a silence longer than `silence_s`
  came between them: then it starts a new conversation.
- One person's consecutive messages are one turn ("hi" / "you there?").
- A message that is not kept (a bot's, a system message, someone left out) is spliced out: what
  answered it hangs under what it answered.
- A conversation deeper than MAX_DEPTH turns goes on as a new one: a thread nests one level per
  turn (in JSON and in the session builder), and a busy channel may never fall silent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from training.imports.messages import Message

MAX_DEPTH = 100  # sessions are cut into windows of ten turns or fewer: nothing is lost but a context turn


@dataclass
class ChatTurn:
    """One person's consecutive messages, and the turns that answered them."""

    author_id: str
    text: str
    time: float | None  # of its first message
    last_time: float | None  # of its last message
    depth: int = 1
    replies: list[ChatTurn] = field(default_factory=list)

    def walk(self) -> Iterable[ChatTurn]:
        stack = [self]
        while stack:
            turn = stack.pop()
            yield turn
            stack += reversed(turn.replies)


def conversation_trees(
    messages: Iterable[Message], keep: Callable[[Message], bool], silence_s: float | None
) -> list[ChatTurn]:
    """The roots of the conversations, channel by channel, each channel's oldest first."""
    by_channel: dict[str, list[Message]] = {}
    for message in messages:
        by_channel.setdefault(message.channel, []).append(message)
    roots: list[ChatTurn] = []
    for channel in by_channel.values():
        if all(m.time is not None for m in channel):
            channel.sort(key=lambda m: m.time)  # stable: messages of the same second keep their order
        roots += _channel_trees(channel, keep, silence_s)
    return roots


def _channel_trees(messages: list[Message], keep: Callable[[Message], bool], silence_s: float | None) -> list[ChatTurn]:
    turns: dict[str, ChatTurn | None] = {}  # message id -> its turn (a spliced-out one: the turn it answered)
    thread_end: dict[str, ChatTurn] = {}  # thread -> its newest turn
    newest: ChatTurn | None = None  # the channel's own timeline, threads aside
    roots: list[ChatTurn] = []
    for message in messages:
        in_thread = message.thread is not None and message.thread != message.id
        parent = None
        if in_thread:
            parent = thread_end.get(message.thread) or turns.get(message.thread)
        elif message.reply_to is not None:
            parent = turns.get(message.reply_to)
        if parent is None and not in_thread and newest is not None and not _silent(newest, message, silence_s):
            parent = newest
        if parent is not None and parent.depth >= MAX_DEPTH and parent.author_id != message.author_id:
            parent = None
        if not keep(message):
            turns[message.id] = parent
            continue
        if (parent is not None and parent.author_id == message.author_id and not parent.replies
                and not _silent(parent, message, silence_s)):
            parent.text += "\n" + message.text
            parent.last_time = message.time
            turn = parent
        else:
            turn = ChatTurn(message.author_id, message.text, message.time, message.time,
                            parent.depth + 1 if parent is not None else 1)
            (parent.replies if parent is not None else roots).append(turn)
        turns[message.id] = turn
        if in_thread:
            thread_end[message.thread] = turn
        else:
            newest = turn
    return roots


def _silent(turn: ChatTurn, message: Message, silence_s: float | None) -> bool:
    """Whether a silence longer than `silence_s` lies between the turn and the message."""
    if silence_s is None or turn.last_time is None or message.time is None:
        return False
    return message.time - turn.last_time > silence_s
