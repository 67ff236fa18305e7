"""Prompt formats: how a conversation becomes token ids, for serving and for training alike.

Training imports these very functions, so a fine-tune is served exactly as it was trained.
"""

from __future__ import annotations

from typing import Literal, Sequence

from core.conversation import Turn

FormatName = Literal["dialogpt", "chat"]

# Used when a chat-format model ships no template of its own (ChatML, as SmolLM2 uses).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IGNORE_INDEX = -100


class PromptTooLong(ValueError):
    """The newest turn (with the system prompt) alone does not fit the persona's token budget."""


class SystemPromptTooLong(PromptTooLong):
    """The system prompt alone fills the persona's token budget."""


def encode(fmt: FormatName, tokenizer, turns: Sequence[Turn], system_prompt: str = "") -> list[int]:
    """Token ids of a prompt that asks the model for the next (bot) turn."""
    if fmt == "dialogpt":
        return _dialogpt_ids(tokenizer, turns)
    return _chat_ids(tokenizer, chat_messages(turns, system_prompt), add_generation_prompt=True)


def encode_for_training(
    fmt: FormatName, tokenizer, turns: Sequence[Turn], system_prompt: str = ""
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one session; labels are IGNORE_INDEX except on bot turns."""
    ids: list[int] = []
    labels: list[int] = []
    if fmt == "dialogpt":
        for turn in turns:
            piece = tokenizer.encode(turn.text, add_special_tokens=False) + [tokenizer.eos_token_id]
            ids += piece
            labels += piece if turn.role == "bot" else [IGNORE_INDEX] * len(piece)
        return ids, labels
    messages = chat_messages(turns, system_prompt)
    offset = 1 if system_prompt else 0
    for i in range(len(turns)):
        prefix = _chat_ids(tokenizer, messages[: offset + i + 1], add_generation_prompt=False)
        piece = prefix[len(ids):]
        ids = prefix
        labels += piece if turns[i].role == "bot" else [IGNORE_INDEX] * len(piece)
    return ids, labels


def end_of_turn_ids(fmt: FormatName, tokenizer) -> list[int]:
    """Tokens that end a persona turn, which serving must stop on: eos in the dialogpt format; in the
    chat format the last special token of an assistant message (<|im_end|> for ChatML), which is not
    always the tokenizer's eos (Qwen2.5 bases, for instance)."""
    if fmt == "dialogpt":
        return [tokenizer.eos_token_id]
    ids, labels = encode_for_training(fmt, tokenizer, [Turn("user", "u", "hi"), Turn("bot", "b", "hello")])
    special = set(tokenizer.all_special_ids)
    ends = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX and t in special]
    return [ends[-1]] if ends else [tokenizer.eos_token_id]


def fit_to_budget(
    fmt: FormatName, tokenizer, turns: Sequence[Turn], system_prompt: str, budget: int
) -> tuple[list[Turn], list[int]]:
    """Drop the oldest whole turns until the prompt fits `budget` tokens; never split a turn.

    The newest turn always stays; if it alone is too long, its oldest tokens are cut.
    """
    kept = list(turns)
    ids = encode(fmt, tokenizer, kept, system_prompt)
    while len(ids) > budget and len(kept) > 1:
        kept.pop(0)
        ids = encode(fmt, tokenizer, kept, system_prompt)
    if len(ids) > budget:
        ids = ids[-budget:]
    return kept, ids


def _dialogpt_ids(tokenizer, turns: Sequence[Turn]) -> list[int]:
    ids: list[int] = []
    for turn in turns:
        ids += tokenizer.encode(turn.text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids


def chat_messages(turns: Sequence[Turn], system_prompt: str) -> list[dict[str, str]]:
    humans = {turn.author for turn in turns if turn.role == "user"}
    named = len(humans) > 1
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in turns:
        if turn.role == "bot":
            messages.append({"role": "assistant", "content": turn.text})
        else:
            content = f"{turn.author}: {turn.text}" if named else turn.text
            messages.append({"role": "user", "content": content})
    return messages


def _chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    template = None if tokenizer.chat_template else CHATML_TEMPLATE
    encoded = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])
