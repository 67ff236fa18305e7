"""Tiny models built on the fly for tests: nothing is downloaded.

`train_word_model` teaches a 2-layer GPT-2 one game, in either prompt format:
    user: "the word is apple"  -> bot: "apple!"
    user: "again"              -> bot: "apple!"   (needs the conversation's own history)
so a reply shows which context the model saw: a deterministic check for cross-talk.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.conversation import Turn
from core.prompts import CHATML_TEMPLATE, IGNORE_INDEX, encode_for_training

WORDS = [
    "apple", "river", "cloud", "tiger", "piano", "lemon", "rocket", "forest", "castle", "pepper",
    "garden", "silver", "island", "candle", "dragon", "violet", "harbor", "meadow", "falcon", "copper",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(extra_text: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few KB of text, eos/pad set, ChatML template."""
    corpus = [f"the word is {w}. {w}! again" for w in WORDS] * 5
    corpus += ["user assistant system hello how are you I am fine thanks"] * 5 + (extra_text or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def word_sessions() -> list[list[Turn]]:
    sessions = []
    for w in WORDS:
        sessions.append([Turn("user", "alice", f"the word is {w}"), Turn("bot", "bot", f"{w}!")])
        sessions.append([
            Turn("user", "alice", f"the word is {w}"), Turn("bot", "bot", f"{w}!"),
            Turn("user", "alice", "again"), Turn("bot", "bot", f"{w}!"),
        ])
    return sessions


def train_word_model(out_dir: Path, fmt: str = "dialogpt", steps: int = 300, seed: int = 0) -> Path:
    """Train the word game into a tiny GPT-2 in `fmt` and save it like a personality directory."""
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>" if fmt == "chat" else "<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    examples = [encode_for_training(fmt, tokenizer, s) for s in word_sessions()]
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config.eos_token_id = eos
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if fmt == "chat":
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(out_dir)
    return out_dir
