"""Gradient accumulation fixtures for test_train: a tiny GPT-2 without dropout and micro-batches whose
target counts differ tenfold, as length grouping makes them. Run as a script under torchrun, it is one
DDP process taking one optimizer step with training.train.step_gradients; rank 0 saves the result."""

from __future__ import annotations

import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.conversation import Turn
from core.prompts import encode_for_training
from tiny import WORDS, build_tokenizer
from training.examples import Example, collate

# Micro-batches of each process for one optimizer step: rank 0 holds nearly all the targets.
RANK_BATCHES = [[["long0", "long1"], ["short0"]], [["short1"], ["short2", "short3"]]]


def tiny_model() -> GPT2LMHeadModel:
    """The same random weights in every process; no dropout, so split and whole batches compare exactly."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(build_tokenizer()), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def examples(tokenizer) -> dict[str, Example]:
    """Long sessions (six replies of several words) and short ones (one reply of two tokens)."""
    out = {}
    for i in range(4):
        words = WORDS[i * 4:i * 4 + 7]
        long = [Turn("user" if j == 0 else "bot", "a", f"the word is {w}. {w}! again") for j, w in enumerate(words)]
        out[f"long{i}"] = encode_for_training("dialogpt", tokenizer, long)
        out[f"short{i}"] = encode_for_training("dialogpt", tokenizer, [Turn("user", "a", "again"),
                                                                        Turn("bot", "b", f"{WORDS[i]}!")])
    return out


def batches(tokenizer, names: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    chosen = examples(tokenizer)
    return [collate([chosen[name] for name in batch], tokenizer.pad_token_id) for batch in names]


def gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main(out: str) -> None:
    from accelerate import Accelerator

    from training.train import step_gradients

    accelerator = Accelerator(cpu=True)
    tokenizer = build_tokenizer()
    model = accelerator.prepare(tiny_model())
    loss = step_gradients(accelerator, model, batches(tokenizer, RANK_BATCHES[accelerator.process_index]))
    step_loss = accelerator.reduce(loss).item()
    if accelerator.is_main_process:  # after the step DDP has averaged the gradients: every rank holds the same
        torch.save({"gradient": gradient(model), "loss": step_loss, "processes": accelerator.num_processes}, out)
    print(f"rank {accelerator.process_index}: step done", file=sys.stderr, flush=True)
    # The reduce above was the last collective: leave at once. A closing barrier or process-group
    # teardown can hang gloo on a loaded machine, and the result is already on disk.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
