"""Tiny models built on the fly for tests: nothing is downloaded.

`train_word_model` teaches a 2-layer GPT-2 one game, in either prompt format:
    user: "the word is apple"  -> bot: "apple!"
    user: "again"              -> bot: "apple!"   (needs the conversation's own history)
so a reply shows which context the model saw: a deterministic check for cross-talk.
"""

from __future__ import annotations

import os
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


def build_untrained_model(out_dir: Path, n_positions: int = 512, seed: int = 0, n_embd: int = 64,
                          n_layer: int = 2) -> Path:
    """A randomly initialised tiny GPT-2 with the word-game tokenizer whose greedy decoding never
    picks EOS: it runs to max_new_tokens (a long generation, e.g. to keep the generator busy)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight[eos] = 0  # EOS logit 0, below the largest of ~400 random logits
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


ARCHITECTURES = ("gpt2", "llama", "mistral", "gemma3", "qwen2", "phi3", "lfm2")
# Where build_random_causal_lm puts its models: `make check-gpu` runs the exactness tests with "cuda".
TEST_DEVICE = os.environ.get("TTT_TEST_DEVICE", "cpu")


def build_random_causal_lm(arch: str, vocab_size: int, window: int = 8, seed: int = 0):
    """A tiny randomly initialised causal LM of one architecture, in its own cache layout:
    gpt2 and llama full attention; mistral and phi3 every layer sliding (`window`); gemma3 sliding
    then full (hybrid); qwen2 full then sliding; lfm2 convolution + attention (no joinable cache).
    No eos, so generation runs to its length limit; weights large enough that logits are well apart."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    configs = {
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                     initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0),
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(sliding_window=window, **common),
        "gemma3": lambda: T.Gemma3TextConfig(sliding_window=window, head_dim=16,
                                             layer_types=["sliding_attention", "full_attention"], **common),
        "qwen2": lambda: T.Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **common),
        "phi3": lambda: T.Phi3Config(sliding_window=window, **common),
        "lfm2": lambda: T.Lfm2Config(layer_types=["conv", "full_attention"],
                                     **{k: v for k, v in common.items() if k != "intermediate_size"},
                                     intermediate_size=128),
    }
    config = configs[arch]()
    model = T.AutoModelForCausalLM.from_config(config).eval().to(TEST_DEVICE)
    model.generation_config.eos_token_id = None
    return model


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 1-layer Llama with the word-game tokenizer as a GGUF file (float32, ~3 MB), as a llama.cpp
    export writes it. `seed` changes only the last tensor, past the first MiB: two exports of one
    base differ like that, in their weights, not in their header or size."""
    import json

    import gguf
    import numpy as np

    tokenizer = build_tokenizer()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    hidden, heads, ffn = 256, 4, 512
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    shared = np.random.default_rng(0)

    def weight(name: str, *shape: int, rng=shared) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weight("output.weight", len(tokens), hidden)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        weight(f"blk.0.{name}.weight", hidden, hidden)
    weight("blk.0.ffn_gate.weight", ffn, hidden)
    weight("blk.0.ffn_up.weight", ffn, hidden)
    weight("blk.0.ffn_down.weight", hidden, ffn, rng=np.random.default_rng(seed + 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
