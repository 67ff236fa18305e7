"""Sessions -> training examples -> batches.

A session is encoded by `core.prompts.encode_for_training`, the very code that builds the persona's
prompts when it is served, and the loss falls on the persona's turns only:

- dialogpt format: the first turn of a session is context; every later turn is the persona's.
- chat format: roles alternate backwards from the last turn, which is the persona's, and the
  first turn is always context (user, bot, user, bot; user, user, bot); with several human
  authors the user turns carry "author: " prefixes, as in serving.

Batches group similar lengths (little padding) and are right-padded to their longest example.
"""

from __future__ import annotations

import json
import math
import random
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.conversation import Turn
from core.prompts import IGNORE_INDEX, encode_for_training

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def session_turns(turns: list[dict], fmt: str) -> list[Turn]:
    """A Reddit session's turns as core Turns, with the roles described in the module docstring."""
    n = len(turns)
    if fmt == "dialogpt":
        roles = ["user"] + ["bot"] * (n - 1)
    else:
        roles = ["bot" if i > 0 and (n - 1 - i) % 2 == 0 else "user" for i in range(n)]
    return [Turn(role, t["author"], t["text"]) for role, t in zip(roles, turns)]


def encode_session(
    turns: list[dict], fmt: str, tokenizer, max_length: int, system_prompt: str = ""
) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) within max_length: the oldest whole turns are dropped first
    (the first kept turn becomes context), then the oldest tokens. None when no target is left."""
    truncated = False
    while True:
        ids, labels = encode_for_training(fmt, tokenizer, session_turns(turns, fmt), system_prompt)
        if len(ids) <= max_length or len(turns) <= 2:
            break
        turns, truncated = turns[1:], True
    truncated |= len(ids) > max_length
    ids, labels = ids[-max_length:], labels[-max_length:]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None
    return ids, labels, truncated


def read_sessions(path: Path) -> list[dict]:
    """The sessions of a JSONL file that `ttt build-data` wrote."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_all(
    sessions: list[dict], fmt: str, tokenizer, max_length: int, system_prompt: str = "",
    desc: str = "encoding", quiet: bool = False,
) -> tuple[list[Example], int]:
    """(examples, how many of them were truncated); sessions with nothing to learn are left out."""
    examples: list[Example] = []
    truncated = 0
    for session in tqdm(sessions, desc=desc, unit="session", disable=quiet, leave=False):
        encoded = encode_session(session["turns"], fmt, tokenizer, max_length, system_prompt)
        if encoded is not None:
            examples.append(encoded[:2])
            truncated += encoded[2]
    return examples, truncated


class LengthGroupedBatches:
    """Batches of example indices, reshuffled each epoch from (seed, epoch) alone.

    With grouping, examples are shuffled, sorted by length within windows of 50 batches and cut
    into batches, so a batch holds similar lengths (little padding); the batches are then shuffled,
    the longest first so that running out of memory happens at once, not hours in.
    """

    def __init__(self, lengths: list[int], batch_size: int, group_by_length: bool, seed: int, shuffle: bool = True):
        self.lengths, self.batch_size = lengths, batch_size
        self.group_by_length, self.seed, self.shuffle = group_by_length, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            window = self.batch_size * 50
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=self.lengths.__getitem__, reverse=True)]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(batches)
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return iter(batches)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (dynamic padding); padding is never a target."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_loader(
    examples: list[Example], batch_size: int, pad_id: int, group_by_length: bool = True, seed: int = 0,
    shuffle: bool = True,
) -> DataLoader:
    """Batches of `examples`, length-grouped and reshuffled per epoch (`set_epoch`) as configured."""
    sampler = LengthGroupedBatches([len(ids) for ids, _ in examples], batch_size, group_by_length, seed, shuffle)
    # Its own generator: making an iterator must not draw from the global RNG (exact resumes).
    return DataLoader(examples, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(seed))
