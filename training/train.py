"""Fine-tune a causal LM on Reddit sessions into a personality directory the core serves as a persona.

nanoGPT-style: the whole configuration is `TrainConfig` below, the loop is plain PyTorch driven by
accelerate, and every number is printed while it runs. Sessions are encoded by
`core.prompts.encode_for_training`, the very code that builds the persona's prompts when it is
served, and the loss falls on the persona's turns only:

- dialogpt format: the first turn of a session is context; every later turn is the persona's.
- chat format: roles alternate backwards from the last turn, which is the persona's, and the
  first turn is always context (user, bot, user, bot; user, user, bot); with several human
  authors the user turns carry "author: " prefixes, as in serving.

One process on CPU or one GPU: `ttt train`. Several GPUs (DDP, FSDP or DeepSpeed, as chosen by
`accelerate config`): `accelerate launch $(which ttt) train ...` (or `-m training.train ...`).
A model too big for one GPU: `ttt train --device-map auto` splits its layers across the GPUs of
one process.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.conversation import Turn
from core.prompts import IGNORE_INDEX, encode_for_training, end_of_turn_ids

DEFAULT_LR = 5e-5
DEFAULT_LORA_LR = 2e-4


@dataclass
class TrainConfig:
    data_dir: Path  # train.jsonl (+ validation.jsonl) as `ttt build-data` writes them
    out_dir: Path  # the personality directory
    checkpoint_dir: Path  # resumable training state: step-N/ folders
    name: str = "persona"
    base_model: str = "microsoft/DialoGPT-medium"
    format: str = "auto"  # "dialogpt", "chat", or "auto": chat when the tokenizer has a chat template
    system_prompt: str = ""  # chat format only; serve the persona with the same one
    # LoRA: train an adapter, the base weights stay frozen and shared when served
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    device_map: str | None = None  # "auto": split a model bigger than one GPU across the GPUs
    # batches
    max_length: int = 512  # tokens per session (capped by the model); the oldest turns go first
    batch_size: int = 8  # sessions per micro-batch, per process
    grad_accum: int = 4  # micro-batches per optimizer step
    group_by_length: bool = True  # similar lengths share a batch: less padding
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    learning_rate: float | None = None  # None: 5e-5, or 2e-4 with LoRA
    min_lr_fraction: float = 0.1  # cosine decay ends at this fraction of the peak
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 (else fp16) on GPU, none on CPU; or "no", "fp16", "bf16"
    # validation, checkpoints, early stopping
    eval_interval: int = 200  # optimizer steps between validations; a checkpoint follows each
    eval_batch_size: int = 8
    patience: int | None = 3  # stop after this many validations without a new best
    keep_checkpoints: int = 2
    log_interval: int = 10
    resume: str | None = None  # "latest" or a step-N directory
    seed: int = 1337


class TrainError(Exception):
    """Training cannot start or go on; the message says why, in one line."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    base_perplexity: float | None  # validation perplexity before training
    perplexity: float | None  # best validation perplexity, the one the personality has
    stopped: str  # "completed", "early stopping", "already complete"
    tokens_per_s: float  # non-padding training tokens per second, all processes
    padding_share: float  # padding tokens / all tokens in the training batches
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (logged steps)
    card: dict = field(default_factory=dict)


# ---- sessions -> examples -------------------------------------------------------------------

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
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_all(sessions, fmt, tokenizer, max_length, system_prompt="", desc="encoding", quiet=False):
    """(examples, how many of them were truncated); sessions with nothing to learn are left out."""
    examples, truncated = [], 0
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


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
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


def make_loader(examples, batch_size, pad_id, group_by_length=True, seed=0, shuffle=True):
    sampler = LengthGroupedBatches([len(ids) for ids, _ in examples], batch_size, group_by_length, seed, shuffle)
    # Its own generator: making an iterator must not draw from the global RNG (exact resumes).
    return DataLoader(examples, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validation_loss(model, loader, accelerator: Accelerator) -> float:
    """Mean negative log-likelihood per target token (perplexity = exp of it), over all processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        per_row = torch.stack([nll.sum(1).double(), (targets != IGNORE_INDEX).sum(1).double()], 1)
        total += accelerator.gather_for_metrics(per_row.to(accelerator.device)).sum(0)
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def learning_rate(step: int, total_steps: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_fraction of the peak (nanoGPT's schedule)."""
    warmup = max(1, round(cfg.warmup_fraction * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- models ---------------------------------------------------------------------------------

def load_base(name: str, device_map: str | None = None):
    """(model, tokenizer) of a hub id or local directory; TrainError with a one-line reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise TrainError(f"base model directory {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, device_map=device_map)
    except (OSError, ValueError) as exc:
        offline = " (offline: HF_HUB_OFFLINE is set, and it is not in the local cache)" \
            if os.environ.get("HF_HUB_OFFLINE") and not looks_local else ""
        raise TrainError(f"cannot load base model {name}{offline}: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_format(fmt: str, tokenizer) -> str:
    if fmt == "auto":
        return "chat" if tokenizer.chat_template else "dialogpt"
    if fmt not in ("dialogpt", "chat"):
        raise TrainError(f"unknown prompt format {fmt!r}: choose dialogpt, chat or auto")
    return fmt


# ---- the personality directory --------------------------------------------------------------

def shown_path(path: str | Path) -> str:
    """A path as config.yaml should hold it: ./relative under the working directory, else absolute."""
    path = Path(path).expanduser().resolve()
    try:
        return "./" + str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def config_snippet(card: dict, out_dir: Path) -> str:
    """The config.yaml lines that add the personality as a persona."""
    base = card["base_model"]
    base_shown = shown_path(base) if Path(base).expanduser().exists() else base
    where = f"r/{card['subreddit']}" if card.get("subreddit") else card["name"]
    ppl = card["validation"].get("perplexity")
    lines = [
        "personas:",
        f"  {card['name']}:",
        f"    description: {base.rstrip('/').split('/')[-1]} fine-tuned on {where}"
        + (f" (validation perplexity {ppl:.1f})" if ppl else ""),
    ]
    if card["lora"]:
        lines += [f"    model: {base_shown}", f"    adapter: {shown_path(out_dir)}"]
    else:
        lines += [f"    model: {shown_path(out_dir)}"]
    lines += [f"    format: {card['format']}", f"    max_context_tokens: {card['training']['max_length']}"]
    if card["system_prompt"]:
        lines += [f"    system_prompt: {json.dumps(card['system_prompt'])}"]
    reply_tokens = min(64 if card["format"] == "dialogpt" else 128, card["training"]["max_length"] // 2)
    lines += ["    decoding:", f"      max_new_tokens: {reply_tokens}"]
    if card["format"] == "dialogpt":  # DialoGPT loops under greedy decoding: sample, no repeated 3-grams
        lines += ["      do_sample: true", "      top_k: 100", "      top_p: 0.7", "      temperature: 0.8",
                  "      no_repeat_ngram_size: 3"]
    else:
        lines += ["      temperature: 0.7", "      top_p: 0.9"]
    return "\n".join(lines)


def _readme(card: dict, snippet: str) -> str:
    v, d, t = card["validation"], card["data"], card["training"]
    ppl = lambda x: f"{x:.2f}" if x else "n/a"  # noqa: E731
    kind = f"A LoRA adapter (r={card['lora']['r']}) on" if card["lora"] else "A full fine-tune of"
    source = f"r/{card['subreddit']}" if card.get("subreddit") else str(d["dir"])
    return f"""# Persona `{card['name']}`

{kind} `{card['base_model']}` on Reddit sessions from {source}, in the `{card['format']}`
prompt format (core/prompts.py), written by `ttt train` on {card['created']}.

| | |
|---|---|
| train sessions / examples | {d['train_sessions']} / {d['train_examples']} \
({d['train_tokens']} tokens, {d['truncated']} truncated) |
| validation sessions | {d['validation_sessions']} |
| validation perplexity, base -> fine-tuned | {ppl(v.get('base_perplexity'))} -> {ppl(v.get('perplexity'))} \
(step {v.get('step')}) |
| optimizer steps | {t['steps']} of {t['planned_steps']} ({t['stopped']}) |
| learning rate, batch | {t['learning_rate']}, {t['batch_size']} x {t['grad_accum']} accumulation \
x {t['processes']} process(es) |

Settings: `persona.json`. To serve it, add to config.yaml:

```yaml
{snippet}
```

Reddit content belongs to its authors and is subject to Reddit's terms; use accordingly.
"""


def save_personality(
    accelerator: Accelerator, model, tokenizer, card: dict, out_dir: Path, stop_ids: list[int]
) -> None:
    """Write weights (or the LoRA adapter), tokenizer, persona.json and README.md, replacing out_dir."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards: every process
    if not accelerator.is_main_process:
        return
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if not card["lora"]:
        generation = unwrapped.generation_config
        eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        generation.eos_token_id = sorted({t for t in eos + stop_ids if t is not None})
        generation.pad_token_id = tokenizer.pad_token_id
    unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    snippet = config_snippet(card, out_dir)
    (tmp / "persona.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_readme(card, snippet), encoding="utf-8")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---- checkpoints ----------------------------------------------------------------------------

def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int, trainer_state: dict) -> Path:
    """accelerate's state (weights, optimizer, RNGs) plus ours, in step-N/; the oldest are removed."""
    path = cfg.checkpoint_dir / f"step-{step}"
    tmp = path.with_name(path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        kept = sorted((p for p in cfg.checkpoint_dir.glob("step-*") if p.suffix != ".partial"),
                      key=lambda p: int(p.name.split("-")[1]))
        for stale in kept[: max(0, len(kept) - cfg.keep_checkpoints)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _mixed_precision(choice: str) -> str | None:
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch` decides, from its config
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# ---- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, quiet: bool = False) -> TrainResult:
    """Fine-tune cfg.base_model on cfg.data_dir and write the personality to cfg.out_dir."""
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=_mixed_precision(cfg.mixed_precision)
    )
    main = accelerator.is_main_process
    say = (lambda *a: None) if quiet else accelerator.print
    train_path, val_path = cfg.data_dir / "train.jsonl", cfg.data_dir / "validation.jsonl"
    if not train_path.is_file():
        raise TrainError(f"no training data: {train_path} does not exist (run `ttt build-data` first)")
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(cfg.checkpoint_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_from is None or not (resume_from / "trainer_state.json").is_file():
            where = cfg.checkpoint_dir if cfg.resume == "latest" else cfg.resume
            raise TrainError(f"no checkpoint to resume from in {where}")
    set_seed(cfg.seed)

    base_model = cfg.base_model  # a local directory is recorded absolute: the card outlives the cwd
    if Path(base_model).expanduser().exists():
        base_model = str(Path(base_model).expanduser().resolve())
    say(f"loading {base_model}")
    model, tokenizer = load_base(base_model, cfg.device_map)
    fmt = resolve_format(cfg.format, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(cfg.max_length, positions or cfg.max_length)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        if targets != "all-linear":
            targets = targets.split(",")
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets,
        ))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{fmt} format, max length {max_length}, {trainable / 1e6:.2f}M trainable parameters"
        f"{' (LoRA)' if cfg.lora else ''} of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    train_sessions = read_sessions(train_path)
    val_sessions = read_sessions(val_path) if val_path.is_file() else []
    quiet_bars = quiet or not main
    train_examples, truncated = encode_all(
        train_sessions, fmt, tokenizer, max_length, cfg.system_prompt, "encoding train", quiet_bars)
    val_examples, _ = encode_all(
        val_sessions, fmt, tokenizer, max_length, cfg.system_prompt, "encoding validation", quiet_bars)
    if not train_examples:
        raise TrainError(f"{train_path} holds no session with a reply to learn from")
    data = {
        "dir": str(cfg.data_dir.resolve()),
        "train_sessions": len(train_sessions), "validation_sessions": len(val_sessions),
        "train_examples": len(train_examples), "validation_examples": len(val_examples),
        "train_tokens": sum(len(ids) for ids, _ in train_examples),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in train_examples),
        "truncated": truncated,
    }
    say(f"data: {data['train_examples']} train / {data['validation_examples']} validation sessions, "
        f"{data['train_tokens']:,} train tokens ({data['target_tokens']:,} targets), {data['truncated']} truncated")

    pad_id = tokenizer.pad_token_id
    train_loader = make_loader(train_examples, cfg.batch_size, pad_id, cfg.group_by_length, cfg.seed)
    val_loader = make_loader(val_examples, cfg.eval_batch_size, pad_id, True, cfg.seed, shuffle=False) \
        if val_examples else None
    peak_lr = cfg.learning_rate or (DEFAULT_LORA_LR if cfg.lora else DEFAULT_LR)
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=peak_lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.95 if cfg.lora else 0.999))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # What decides the data stream and the meaning of a step: a resumed run must use the same.
    meta = {"base_model": base_model, "lora": cfg.lora, "format": fmt, "system_prompt": cfg.system_prompt,
            "max_length": max_length, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "group_by_length": cfg.group_by_length, "seed": cfg.seed, "processes": accelerator.num_processes}
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_loss": None, "best_step": None,
             "base_loss": None, "bad_evals": 0, "tokens": 0, "padded": 0, "train_s": 0.0}
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        changed = [f"{key} {saved['meta'].get(key)!r} (now {value!r})" for key, value in meta.items()
                   if saved["meta"].get(key) != value]
        if changed:
            raise TrainError(f"{resume_from} was trained with {', '.join(changed)}: resume with the same settings")
        state.update(saved["state"])
        accelerator.load_state(str(resume_from))
        say(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, "
            f"batch {state['batches_in_epoch']})")
    elif val_loader is not None:
        state["base_loss"] = validation_loss(model, val_loader, accelerator)
        loss = state["base_loss"]
        say(f"step 0: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} (base model)")

    stop_ids = end_of_turn_ids(fmt, tokenizer)
    subreddits = _subreddits(cfg.data_dir)
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch) at peak lr {peak_lr:g}, "
        f"batch {cfg.batch_size} x {cfg.grad_accum} accumulation x {accelerator.num_processes} process(es), "
        f"mixed precision {accelerator.mixed_precision}")

    def card(stopped: str) -> dict:
        best = state["best_loss"]
        return {
            "name": cfg.name, "subreddit": subreddits[0] if len(subreddits) == 1 else None,
            "subreddits": subreddits, "base_model": base_model, "format": fmt, "system_prompt": cfg.system_prompt,
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "target_modules": cfg.lora_target_modules} if cfg.lora else None,
            "data": data,
            "validation": {
                "perplexity": math.exp(best) if best is not None else None,
                "loss": best, "step": state["best_step"],
                "base_perplexity": math.exp(state["base_loss"]) if state["base_loss"] is not None else None,
            },
            "training": {
                "steps": state["step"], "planned_steps": total_steps, "stopped": stopped,
                "epochs": round(state["step"] / steps_per_epoch, 2), "learning_rate": peak_lr,
                "schedule": f"linear warm-up {cfg.warmup_fraction:.0%}, cosine to {cfg.min_lr_fraction:g} x peak",
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": accelerator.num_processes,
                "max_length": max_length, "mixed_precision": accelerator.mixed_precision,
                "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "seed": cfg.seed,
                "group_by_length": cfg.group_by_length,
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    losses: dict[int, float] = {}
    stopped = "completed" if state["step"] < total_steps else "already complete"
    # Running sums stay on the device: reading them forces a GPU sync, so that waits for a log line.
    step_loss, step_micro = torch.zeros((), device=accelerator.device), 0
    window_loss, window_steps = torch.zeros((), device=accelerator.device), 0
    window_tokens = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # real, with padding
    window_start = time.perf_counter()
    model.train()
    while state["step"] < total_steps and stopped == "completed":
        train_loader.set_epoch(state["epoch"])  # accelerate's loader passes it on to the batch sampler
        skip = state["batches_in_epoch"]
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            state["batches_in_epoch"] += 1
            lr = learning_rate(state["step"], total_steps, peak_lr, cfg)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach()
            step_micro += 1
            mask = batch["attention_mask"]
            window_tokens += torch.stack([mask.sum(), torch.tensor(mask.numel(), device=mask.device)])
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            window_loss += step_loss / step_micro
            window_steps += 1
            step_loss.zero_()
            step_micro = 0
            if step % cfg.log_interval == 0 or step == total_steps:
                tokens, padded = accelerator.reduce(window_tokens).tolist()  # all processes
                elapsed = time.perf_counter() - window_start
                state["tokens"] += tokens
                state["padded"] += padded
                state["train_s"] += elapsed
                losses[step] = window_loss.item() / window_steps
                epoch = state["epoch"] + state["batches_in_epoch"] / len(train_loader)
                say(f"step {step:>5}/{total_steps} | epoch {epoch:5.2f} | loss {losses[step]:.4f} | lr {lr:.2e} "
                    f"| {tokens / elapsed:8,.0f} tok/s | pad {1 - tokens / padded:4.0%}")
                window_loss.zero_()
                window_tokens.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if step % cfg.eval_interval == 0 or step == total_steps:
                paused = time.perf_counter()  # validation and checkpoint time is not training time
                if val_loader is not None:
                    val = validation_loss(model, val_loader, accelerator)
                    better = state["best_loss"] is None or val < state["best_loss"]
                    state["bad_evals"] = 0 if better else state["bad_evals"] + 1
                    note = ""
                    if better:
                        state["best_loss"], state["best_step"] = val, step
                        save_personality(accelerator, model, tokenizer, card("in progress"), cfg.out_dir, stop_ids)
                        note = f" (best: saved to {cfg.out_dir})"
                    elif cfg.patience and state["bad_evals"] >= cfg.patience:
                        stopped = "early stopping"
                        note = f" (no improvement in {cfg.patience} validations: early stopping)"
                    say(f"step {step}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}{note}")
                path = save_checkpoint(accelerator, cfg, step, {"state": state, "meta": meta})
                say(f"step {step}: checkpoint {path}")
                window_start += time.perf_counter() - paused
            if state["step"] >= total_steps or stopped != "completed":
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0

    if val_loader is None or state["best_loss"] is None or not (cfg.out_dir / "persona.json").is_file():
        save_personality(accelerator, model, tokenizer, card(stopped), cfg.out_dir, stop_ids)
    elif main:  # the weights there are the best ones; record how training ended
        final = card(stopped)
        saved = json.loads((cfg.out_dir / "persona.json").read_text())
        final["created"] = saved["created"]
        (cfg.out_dir / "persona.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
        (cfg.out_dir / "README.md").write_text(_readme(final, config_snippet(final, cfg.out_dir)), encoding="utf-8")
    accelerator.wait_for_everyone()
    final = card(stopped)
    result = TrainResult(
        out_dir=cfg.out_dir, steps=state["step"],
        base_perplexity=final["validation"]["base_perplexity"], perplexity=final["validation"]["perplexity"],
        stopped=stopped, tokens_per_s=state["tokens"] / state["train_s"] if state["train_s"] else 0.0,
        padding_share=1 - state["tokens"] / state["padded"] if state["padded"] else 0.0,
        losses=losses, card=final,
    )
    accelerator.end_training()
    return result


def _subreddits(data_dir: Path) -> list[str]:
    report = data_dir / "report.json"
    if not report.is_file():
        return []
    return list(json.loads(report.read_text()).get("subreddits", []))


if __name__ == "__main__":  # accelerate launch -m training.train [ttt train options]
    from ttt.cli import main as ttt_main

    sys.exit(ttt_main(["train", *sys.argv[1:]]))
