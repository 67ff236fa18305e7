"""Tiny models built on the fly for tests: nothing is downloaded.

`train_word_model` teaches a 2-layer GPT-2 one game, in either prompt format:
    user: "the word is apple"  -> bot: "apple!"
    user: "again"              -> bot: "apple!"   (needs the conversation's own history)
so a reply shows which context the model saw: a deterministic check for cross-talk.
"""

from __future__ import annotations

import random
import re
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


def fit(model, examples: list[tuple[list[int], list[int]]], pad_id: int, steps: int) -> None:
    """Full-batch AdamW on (ids, labels) examples, right-padded; leaves the model in eval mode."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
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
    fit(model, [encode_for_training(fmt, tokenizer, s) for s in word_sessions()], tokenizer.pad_token_id, steps)
    model.generation_config.eos_token_id = eos
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if fmt == "chat":
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(out_dir)
    return out_dir



def train_reply_model(out_dir: Path, sessions: list[list[tuple[str, str]]], steps: int = 150, seed: int = 0) -> Path:
    """Teach a tiny GPT-2 (dialogpt format) fixed replies and save it like a personality directory.

    `sessions` are lists of (user text, bot reply) exchanges; greedy decoding then replays the
    replies exactly, whatever they say (a ping-laden line, a reply longer than a platform's message
    limit). Its tokenizer learns each sentence as one token, so long replies stay cheap to train
    and to generate.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    try:
        return _train_replies(out_dir, sessions, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_replies(out_dir: Path, sessions: list[list[tuple[str, str]]], steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    random.seed(seed)
    texts = [text for session in sessions for exchange in session for text in exchange]
    units = [piece for text in texts for piece in re.findall(r" ?[^.!?]+[.!?]*", text)]
    tok = Tokenizer(models.BPE())
    # No split on spaces: merges grow into whole sentences (a sentence boundary, "." then " ", is never merged).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    merges = sum(len(u) for u in units)
    trainer = trainers.BpeTrainer(
        vocab_size=300 + merges, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(units * 2, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    turns = [[Turn(role, "alice" if role == "user" else "bot", text)
              for user, reply in session for role, text in (("user", user), ("bot", reply))] for session in sessions]
    fit(model, [encode_for_training("dialogpt", tokenizer, t) for t in turns], eos, steps)
    model.generation_config.eos_token_id = eos
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_untrained_model(out_dir: Path, n_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised tiny GPT-2 with the word-game tokenizer whose greedy decoding never
    picks EOS: it runs to max_new_tokens (a long generation, e.g. to keep the generator busy)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight[eos] = 0  # EOS logit 0, below the largest of ~400 random logits
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
