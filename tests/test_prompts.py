"""Prompt formats, training labels and trimming: the very code that training uses."""

from __future__ import annotations

import time

import pytest

from core.conversation import Turn
from core.prompts import (
    IGNORE_INDEX, PromptTooLong, SystemPromptTooLong, encode, encode_for_training, end_of_turn_ids, fit_to_budget,
)
from tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


TURNS = [
    Turn("user", "alice", "hello how are you"),
    Turn("bot", "bot", "I am fine thanks"),
    Turn("user", "alice", "the word is apple"),
]

# Chat templates of other model families, set on the tiny tokenizer with their special tokens.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (  # no system role: the system prompt goes in front of the first user message
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATES = {  # name -> (template, bos, other special tokens, the end-of-turn token)
    "chatml": (None, None, [], "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, "<bos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}


def templated_tokenizer(name: str):
    """The tiny tokenizer with another family's chat template; its eos stays <|endoftext|>, which is
    not that template's end-of-turn token (as in Qwen2.5 or Llama 3 base models)."""
    template, bos, specials, end = TEMPLATES[name]
    tokenizer = build_tokenizer()
    if template:
        tokenizer.add_special_tokens({"bos_token": bos})
        tokenizer.add_tokens(specials, special_tokens=True)  # special, yet not among all_special_ids
        tokenizer.chat_template = template
    return tokenizer, end


def naive_fit(fmt, tokenizer, turns, system_prompt, budget):
    """The reference: drop the oldest turn and render again until the prompt fits."""
    kept = list(turns)
    while kept and len(encode(fmt, tokenizer, kept, system_prompt)) > budget:
        kept.pop(0)
    return kept, encode(fmt, tokenizer, kept, system_prompt)


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for i, (token, label) in enumerate(zip(ids, labels)):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if i and labels[i - 1] != IGNORE_INDEX:
            spans[-1].append(token)
        else:
            spans.append([token])
    return spans


@pytest.mark.timeout(30)
def test_dialogpt_joins_turns_with_eos(tokenizer):
    ids = encode("dialogpt", tokenizer, TURNS)
    eos = tokenizer.eos_token_id
    assert ids.count(eos) == 3 and ids[-1] == eos
    parts = tokenizer.decode(ids).split(tokenizer.eos_token)
    assert parts[:3] == [t.text for t in TURNS]


@pytest.mark.timeout(30)
def test_chat_uses_template_system_prompt_and_names_speakers_when_several(tokenizer):
    one_speaker = tokenizer.decode(encode("chat", tokenizer, TURNS, "Be brief."))
    assert one_speaker.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>user\nhello how are you<|im_end|>" in one_speaker
    assert "<|im_start|>assistant\nI am fine thanks<|im_end|>" in one_speaker
    assert one_speaker.endswith("<|im_start|>assistant\n")
    group = TURNS + [Turn("user", "bob", "again")]
    several = tokenizer.decode(encode("chat", tokenizer, group, ""))
    assert "alice: hello how are you" in several and "bob: again" in several
    assert "system" not in several


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["dialogpt", "chat"])
def test_fit_keeps_exactly_the_newest_whole_turns_that_fit(tokenizer, fmt):
    # Bob joins late: a prompt that reaches back to him names every speaker, a shorter one names none.
    turns = [Turn("user" if i % 2 == 0 else "bot", "bob" if i in (10, 14) else "alice",
                  f"turn number {i} " + "the word is apple " * (i % 3)) for i in range(16)]
    full = len(encode(fmt, tokenizer, turns, "sys"))
    newest = len(encode(fmt, tokenizer, turns[-1:], "sys"))
    for budget in range(newest, full + 2, 3):
        kept, ids = fit_to_budget(fmt, tokenizer, turns, "sys", budget)
        assert (kept, ids) == naive_fit(fmt, tokenizer, turns, "sys", budget), budget
        assert len(ids) <= budget and kept == turns[len(turns) - len(kept):]
    assert fit_to_budget(fmt, tokenizer, turns, "sys", full)[0] == turns


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["dialogpt", "chat"])
def test_a_newest_message_that_does_not_fit_is_refused_not_cut(tokenizer, fmt):
    zalgo = "a" + "\u0301" * 1800  # one letter, 1,800 combining marks: thousands of tokens
    turns = [Turn("user", "alice", "hi"), Turn("bot", "bot", "hello"), Turn("user", "alice", zalgo)]
    with pytest.raises(PromptTooLong, match="newest message does not fit the 512-token context") as exc:
        fit_to_budget(fmt, tokenizer, turns, "sys", 512)
    assert type(exc.value) is PromptTooLong
    kept, _ = fit_to_budget(fmt, tokenizer, turns[:2], "sys", 512)  # the same history without it fits
    assert kept == turns[:2]


@pytest.mark.timeout(30)
def test_a_system_prompt_that_fills_the_budget_is_refused(tokenizer):
    # What 450 system messages become in /v1/chat/completions: one system prompt, joined.
    system = "\n\n".join(f"rule {i}: the word is apple" for i in range(450))
    with pytest.raises(SystemPromptTooLong, match=r"system prompt alone takes \d+ tokens of the 512-token context"):
        fit_to_budget("chat", tokenizer, TURNS, system, 512)
    short = "Be brief."
    room = len(encode("chat", tokenizer, [], short))
    with pytest.raises(SystemPromptTooLong):
        fit_to_budget("chat", tokenizer, TURNS, short, room)  # it leaves no room for any turn
    with pytest.raises(PromptTooLong) as exc:
        fit_to_budget("chat", tokenizer, TURNS, short, room + 1)  # room, but not enough for the newest turn
    assert type(exc.value) is PromptTooLong


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["dialogpt", "chat"])
def test_fitting_450_messages_renders_only_what_fits(tokenizer, fmt):
    turns = [Turn("user" if i % 2 == 0 else "bot", "alice", f"turn number {i} the word is apple " * 3)
             for i in range(450)]
    started = time.perf_counter()
    kept, ids = fit_to_budget(fmt, tokenizer, turns, "sys", 512)
    elapsed = time.perf_counter() - started
    assert ids == encode(fmt, tokenizer, kept, "sys") and len(ids) <= 512
    assert len(encode(fmt, tokenizer, turns[len(turns) - len(kept) - 1:], "sys")) > 512
    # Measured ~0.005 s; re-rendering after every dropped turn took ~5 s. bench/prompts.py has the ratio.
    assert elapsed < 2.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["dialogpt", "chat"])
def test_training_labels_only_bot_turns(tokenizer, fmt):
    ids, labels = encode_for_training(fmt, tokenizer, TURNS[:2], "sys" if fmt == "chat" else "")
    assert len(ids) == len(labels)
    labelled = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert "I am fine thanks" in labelled and "hello" not in labelled and "sys" not in labelled
    # Serving the first turn produces exactly the prefix that training saw before the reply.
    prompt = encode(fmt, tokenizer, TURNS[:1], "sys" if fmt == "chat" else "")
    assert ids[: len(prompt)] == prompt


@pytest.mark.timeout(30)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("system_prompt", ["", "Be brief."])
def test_chat_labels_the_reply_and_its_end_of_turn_never_the_header_serving_supplies(template, system_prompt):
    tokenizer, end = templated_tokenizer(template)
    turns = [Turn("user", "alice", "hello how are you"), Turn("bot", "bot", "I am fine thanks"),
             Turn("user", "alice", "the word is apple"), Turn("bot", "bot", "apple!")]
    ids, labels = encode_for_training("chat", tokenizer, turns, system_prompt)
    assert len(ids) == len(labels)
    spans = labelled_spans(ids, labels)
    assert [tokenizer.decode(span) for span in spans] == [f"I am fine thanks{end}", f"apple!{end}"]
    for reply in (1, 3):  # the labels start exactly where serving's prompt for that reply ends
        prompt = encode("chat", tokenizer, turns[:reply], system_prompt)
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]
    assert end_of_turn_ids("chat", tokenizer) == [tokenizer.convert_tokens_to_ids(end)]
