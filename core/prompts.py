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
    """(input_ids, labels) for one session; labels are IGNORE_INDEX except on bot turns.

    A bot turn is labelled from where serving's prompt for it ends (so never the header that the
    chat template's generation prompt supplies, such as `<|im_start|>assistant\\n`) up to and with
    its end-of-turn token; what the template adds after that token is not labelled either.
    """
    ids: list[int] = []
    labels: list[int] = []
    if fmt == "dialogpt":
        for turn in turns:
            piece = _dialogpt_piece(tokenizer, turn)
            ids += piece
            labels += piece if turn.role == "bot" else [IGNORE_INDEX] * len(piece)
        return ids, labels
    messages = chat_messages(turns, system_prompt)
    offset = 1 if system_prompt else 0
    special = _special_ids(tokenizer)
    for i, turn in enumerate(turns):
        rendered = _chat_ids(tokenizer, messages[: offset + i + 1], add_generation_prompt=False)
        if turn.role == "bot":
            prompt = _chat_ids(tokenizer, messages[: offset + i], add_generation_prompt=True)
            start = max(len(ids), _common_prefix(prompt, rendered))
            reply = rendered[start:]
            end = max((j + 1 for j, t in enumerate(reply) if t in special), default=len(reply))
            labels += [IGNORE_INDEX] * (start - len(ids)) + reply[:end] + [IGNORE_INDEX] * (len(reply) - end)
        else:
            labels += [IGNORE_INDEX] * (len(rendered) - len(ids))
        ids = rendered
    return ids, labels


def end_of_turn_ids(fmt: FormatName, tokenizer) -> list[int]:
    """Tokens that end a persona turn, which serving must stop on: eos in the dialogpt format; in the
    chat format the last special token of an assistant message (<|im_end|> for ChatML), which is not
    always the tokenizer's eos (Qwen2.5 bases, for instance)."""
    if fmt == "dialogpt":
        return [tokenizer.eos_token_id]
    ids, labels = encode_for_training(fmt, tokenizer, [Turn("user", "u", "hi"), Turn("bot", "b", "hello")])
    special = _special_ids(tokenizer)
    ends = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX and t in special]
    return [ends[-1]] if ends else [tokenizer.eos_token_id]


def fit_to_budget(
    fmt: FormatName, tokenizer, turns: Sequence[Turn], system_prompt: str, budget: int
) -> tuple[list[Turn], list[int]]:
    """The newest whole turns whose prompt fits `budget` tokens, and that prompt's ids.

    The oldest turns are dropped whole; the ids are exactly `encode` of the kept turns. Raises
    SystemPromptTooLong when the system prompt alone fills the budget, and PromptTooLong when the
    newest turn does not fit with it. Time grows with the turns that fit, not with all of them.
    """
    if fmt == "chat" and system_prompt:
        alone = len(encode(fmt, tokenizer, [], system_prompt))
        if alone >= budget:
            raise SystemPromptTooLong(
                f"the system prompt alone takes {alone} tokens of the {budget}-token context: shorten it"
            )
    if not turns:
        return [], encode(fmt, tokenizer, turns, system_prompt)
    if fmt == "dialogpt":
        kept, ids = _fit_dialogpt(tokenizer, turns, budget)
    else:
        kept, ids = _fit_chat(tokenizer, turns, system_prompt, budget)
    if not kept:
        raise PromptTooLong(f"the newest message does not fit the {budget}-token context: shorten it")
    return kept, ids


def _fit_dialogpt(tokenizer, turns: Sequence[Turn], budget: int) -> tuple[list[Turn], list[int]]:
    # Turns are encoded one by one (see encode): each newest turn is tokenized once, the rest never.
    pieces: list[list[int]] = []
    used = 0
    for turn in reversed(turns):
        piece = _dialogpt_piece(tokenizer, turn)
        if used + len(piece) > budget:
            break
        pieces.append(piece)
        used += len(piece)
    return list(turns[len(turns) - len(pieces):]), [t for piece in reversed(pieces) for t in piece]


def _fit_chat(tokenizer, turns: Sequence[Turn], system_prompt: str, budget: int) -> tuple[list[Turn], list[int]]:
    # A template may change earlier turns as later ones come (speaker names appear once a second
    # person speaks), so only whole renders are exact. A prompt only grows with more turns: double
    # the newest turns kept until one does not fit, then halve the gap, in O(log kept) renders.
    def render(k: int) -> list[int]:
        return encode("chat", tokenizer, turns[len(turns) - k:], system_prompt)

    fits, fit_ids, too_many = 0, [], len(turns) + 1
    k = 1
    while fits < len(turns) and too_many > len(turns):
        ids = render(k)
        if len(ids) > budget:
            too_many = k
        else:
            fits, fit_ids, k = k, ids, min(2 * k, len(turns))
    while too_many - fits > 1:
        k = (fits + too_many) // 2
        ids = render(k)
        if len(ids) > budget:
            too_many = k
        else:
            fits, fit_ids = k, ids
    return list(turns[len(turns) - fits:]), fit_ids


def _dialogpt_piece(tokenizer, turn: Turn) -> list[int]:
    return tokenizer.encode(turn.text, add_special_tokens=False) + [tokenizer.eos_token_id]


def _dialogpt_ids(tokenizer, turns: Sequence[Turn]) -> list[int]:
    return [t for turn in turns for t in _dialogpt_piece(tokenizer, turn)]


def _special_ids(tokenizer) -> set[int]:
    """Ids of every special token, also those a model adds without naming them (Llama 3's <|eot_id|>)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
