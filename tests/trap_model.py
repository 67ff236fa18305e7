"""A tiny model whose reply is full of harmless words with flagged prefixes ("Shit|ake", "Dick|ens",
"ass|ess", "cock|tail"), its tokenizer built so that each of those words arrives in two pieces:
what a streamed reply looks like half-way through a word."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.conversation import Turn
from core.prompts import encode_for_training
from tiny import build_tokenizer, fit

PROMPT = "tell me something"
TRAPS = "I love Shitake. Charles Dickens wrote books. We should assess it. Try a cocktail!"
# The tokenizer learns the flagged prefixes and the endings as words of their own, never the whole words.
PIECES = ["Shit", "Dick", "ass", "cock", "ake", "ens", "ess", "tail", "love", "Charles", "wrote", "books",
          "should", "We", "Try", "it"]


def train_trap_model(out_dir: Path, steps: int = 120) -> Path:
    torch.manual_seed(0)
    tokenizer = build_tokenizer([" ".join(PIECES)] * 20)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPT2LMHeadModel(config)
    session = [Turn("user", "alice", PROMPT), Turn("bot", "bot", TRAPS)]
    fit(model, [encode_for_training("dialogpt", tokenizer, session)], eos, steps)
    model.generation_config.eos_token_id = eos
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cached_trap_model() -> Path:
    """Trained once per version of this file and tests/tiny.py; later runs reuse it."""
    here = Path(__file__).parent
    source = (here / "trap_model.py").read_bytes() + (here / "tiny.py").read_bytes() + torch.__version__.encode()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talk-to-transformers" / "test-models"
    target = root / f"traps-{hashlib.sha256(source).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        train_trap_model(partial)
        try:
            partial.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return target
