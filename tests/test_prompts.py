"""Prompt formats and trimming: the very code that training uses."""

from __future__ import annotations

import pytest

from core.conversation import Turn
from core.prompts import IGNORE_INDEX, encode, encode_for_training, fit_to_budget
from tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


TURNS = [
    Turn("user", "alice", "hello how are you"),
    Turn("bot", "bot", "I am fine thanks"),
    Turn("user", "alice", "the word is apple"),
]


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
def test_trimming_drops_oldest_whole_turns(tokenizer, fmt):
    turns = [Turn("user" if i % 2 == 0 else "bot", "a", f"turn number {i} the word is apple") for i in range(12)]
    full = len(encode(fmt, tokenizer, turns, "sys"))
    for budget in range(full // 4, full + 1, max(1, full // 12)):
        kept, ids = fit_to_budget(fmt, tokenizer, turns, "sys", budget)
        assert len(ids) <= budget
        assert kept == turns[len(turns) - len(kept):]  # a suffix of whole turns
        assert ids == encode(fmt, tokenizer, kept, "sys") or len(kept) == 1
        if len(kept) < len(turns):  # one more turn would not have fitted
            assert len(encode(fmt, tokenizer, turns[len(turns) - len(kept) - 1:], "sys")) > budget
    kept, ids = fit_to_budget(fmt, tokenizer, turns, "sys", 5)
    assert kept == turns[-1:] and len(ids) == 5  # the newest turn always stays, cut from the left


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
