"""Fine-tune a causal LM on Reddit sessions into a personality directory the core serves as a persona.

nanoGPT-style: the whole configuration is `TrainConfig` (training/train_config.py), then the loop
below, plain PyTorch driven by accelerate, printing every number as it runs. Sessions become
examples and batches in training/examples.py (with core.prompts, the very code that builds the
persona's prompts when it is served); the personality directory is written by
training/personality.py.

Every target token of an optimizer step weighs the same: the step's summed loss is divided by its
target tokens over all its micro-batches and processes (see `step_gradients`), so gradient
accumulation and length grouping (whose micro-batches hold very different numbers of targets)
give the gradient of the whole step's batch at once.

One process on CPU or one GPU: `ttt train`. Several GPUs (DDP, FSDP or DeepSpeed, as chosen by
`accelerate config`): `accelerate launch $(which ttt) train ...` (or `-m training.train ...`).
A model too big for one GPU: `ttt train --device-map auto` splits its layers across the GPUs of
one process.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from core.prompts import IGNORE_INDEX, end_of_turn_ids
from training.base_model import BaseModel, BaseModelError, resolve_base_model, weights_location
from training.checkpoints import latest_checkpoint, save_checkpoint
from training.cpu_threads import CpuThreads
from training.examples import encode_all, make_loader, read_sessions
from training.personality import persona_card, record_ending, save_personality
from training.train_config import DEFAULT_LORA_LR, DEFAULT_LR, TrainConfig


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


# ---- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, quiet: bool = False) -> TrainResult:
    """Fine-tune cfg.base_model on cfg.data_dir and write the personality to cfg.out_dir."""
    # No gradient_accumulation_steps here: step_gradients accumulates, to weigh micro-batches right.
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision))
    threads = CpuThreads(accelerator.device)
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

    # model
    try:
        base = resolve_base_model(cfg.base_model, cfg.personas)
    except BaseModelError as exc:
        raise TrainError(str(exc)) from None
    base_model = base.model  # a local directory is recorded absolute: the card outlives the cwd
    if Path(base_model).expanduser().exists():
        base_model = str(Path(base_model).expanduser().resolve())
    say(f"loading {base.label}")
    model, tokenizer = load_base(BaseModel(base_model, base.persona), cfg.device_map, cfg.cache_dir)
    fmt = resolve_format(cfg.format, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(cfg.max_length, positions or cfg.max_length)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
        ))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{fmt} format, max length {max_length}, {trainable / 1e6:.2f}M trainable parameters"
        f"{' (LoRA)' if cfg.lora else ''} of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    # data
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

    # optimizer and batches
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
    run = {"base_model": base_model, "base_persona": base.persona, "format": fmt, "max_length": max_length, "data": data,
           "source": _data_source(cfg.data_dir), "planned_steps": total_steps, "steps_per_epoch": steps_per_epoch,
           "learning_rate": peak_lr, "processes": accelerator.num_processes,
           "mixed_precision": accelerator.mixed_precision}

    # state, fresh or resumed; what decides the data stream and the meaning of a step must not change
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
        state["base_loss"] = validation_loss(model, val_loader, accelerator, None if quiet_bars else "validation", threads)
        loss = state["base_loss"]
        say(f"step 0: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} (base model)")

    stop_ids = end_of_turn_ids(fmt, tokenizer)
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch) at peak lr {peak_lr:g}, "
        f"batch {cfg.batch_size} x {cfg.grad_accum} accumulation x {accelerator.num_processes} process(es), "
        f"mixed precision {accelerator.mixed_precision}")
    losses: dict[int, float] = {}
    stopped = "completed" if state["step"] < total_steps else "already complete"
    # Running sums stay on the device: reading them forces a GPU sync, so that waits for a log line.
    window_loss, window_steps = torch.zeros((), device=accelerator.device), 0
    window_tokens = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # real, with padding
    window_start = time.perf_counter()
    model.train()
    while state["step"] < total_steps and stopped == "completed":
        train_loader.set_epoch(state["epoch"])  # accelerate's loader passes it on to the batch sampler
        skip = state["batches_in_epoch"]
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batches in optimizer_steps(loader, cfg.grad_accum):
            state["batches_in_epoch"] += len(batches)
            lr = learning_rate(state["step"], total_steps, peak_lr, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with threads.timed("train", sum(batch["input_ids"].numel() for batch in batches)):
                window_loss += step_gradients(accelerator, model, batches)
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for mask in (batch["attention_mask"] for batch in batches):
                window_tokens += torch.stack([mask.sum(), torch.tensor(mask.numel(), device=mask.device)])
            state["step"] += 1
            step = state["step"]
            window_steps += 1
            if step % cfg.log_interval == 0 or step == total_steps:
                tokens, padded = accelerator.reduce(window_tokens).tolist()  # all processes
                elapsed = time.perf_counter() - window_start
                state["tokens"] += tokens
                state["padded"] += padded
                state["train_s"] += elapsed
                losses[step] = accelerator.reduce(window_loss).item() / window_steps
                epoch = state["epoch"] + state["batches_in_epoch"] / len(train_loader)
                say(f"step {step:>5}/{total_steps} | epoch {epoch:5.2f} | loss {losses[step]:.4f} | lr {lr:.2e} "
                    f"| {tokens / elapsed:8,.0f} tok/s | pad {1 - tokens / padded:4.0%}")
                window_loss.zero_()
                window_tokens.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if step % cfg.eval_interval == 0 or step == total_steps:
                paused = time.perf_counter()  # validation and checkpoint time is not training time
                if val_loader is not None:
                    val = validation_loss(model, val_loader, accelerator, None if quiet_bars else "validation", threads)
                    better = state["best_loss"] is None or val < state["best_loss"]
                    state["bad_evals"] = 0 if better else state["bad_evals"] + 1
                    note = ""
                    if better:
                        state["best_loss"], state["best_step"] = val, step
                        card = persona_card(cfg, run, state, "in progress")
                        save_personality(accelerator, model, tokenizer, card, cfg.out_dir, stop_ids)
                        note = f" (best: saved to {cfg.out_dir})"
                    elif cfg.patience and state["bad_evals"] >= cfg.patience:
                        stopped = "early stopping"
                        note = f" (no improvement in {cfg.patience} validations: early stopping)"
                    say(f"step {step}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}{note}")
                path = save_checkpoint(accelerator, cfg.checkpoint_dir, step, {"state": state, "meta": meta},
                                       cfg.keep_checkpoints)
                say(f"step {step}: checkpoint {path}")
                window_start += time.perf_counter() - paused
            if state["step"] >= total_steps or stopped != "completed":
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0

    final = persona_card(cfg, run, state, stopped)
    if val_loader is None or state["best_loss"] is None or not (cfg.out_dir / "persona.json").is_file():
        save_personality(accelerator, model, tokenizer, final, cfg.out_dir, stop_ids)
    elif main:  # the weights there are the best ones; record how training ended
        record_ending(cfg.out_dir, final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        out_dir=cfg.out_dir, steps=state["step"],
        base_perplexity=final["validation"]["base_perplexity"], perplexity=final["validation"]["perplexity"],
        stopped=stopped, tokens_per_s=state["tokens"] / state["train_s"] if state["train_s"] else 0.0,
        padding_share=1 - state["tokens"] / state["padded"] if state["padded"] else 0.0,
        losses=losses, card=final,
    )


# ---- the maths of a step --------------------------------------------------------------------

def optimizer_steps(batches: Iterable[dict], grad_accum: int) -> Iterator[list[dict]]:
    """The micro-batches of each optimizer step: `grad_accum` at a time, fewer at the end of an epoch."""
    batches = iter(batches)
    while micro_batches := list(itertools.islice(batches, grad_accum)):
        yield micro_batches


def step_gradients(accelerator: Accelerator, model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Backpropagate one optimizer step's micro-batches; return this process's share of the step's
    loss (mean negative log-likelihood per target token of the step, once summed over processes).

    Each micro-batch's summed loss is divided by the target tokens of the whole step (all its
    micro-batches, all processes), as transformers' Trainer does with `num_items_in_batch`, so a
    target weighs the same whether length grouping put it in a batch of long sessions or of short
    ones. DDP, FSDP and DeepSpeed average gradients over processes; multiplying by their number
    turns that average into the sum.
    """
    targets = accelerator.reduce(sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches))
    scale = accelerator.num_processes / targets.float()
    # DeepSpeed would divide by its own accumulation steps; the normalisation above already did.
    options = {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        accelerator.sync_gradients = last  # processes exchange gradients once, after the last one
        with nullcontext() if last else accelerator.no_sync(model):
            nll, _ = target_nll(model, batch)
            summed = nll.sum()
            accelerator.backward(summed * scale.to(summed.device), **options)
        loss += summed.detach().to(loss.device)
    return loss / targets


def target_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood of each next token, 0 where it is no target; the target mask),
    both [rows, length - 1]: position t predicts token t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, targets != IGNORE_INDEX


@torch.no_grad()
def validation_loss(model, loader, accelerator: Accelerator, progress: str | None = None,
                    threads: CpuThreads | None = None) -> float:
    """Mean negative log-likelihood per target token (perplexity = exp of it), over all processes;
    a progress bar named `progress`, if given."""
    model.eval()
    threads = threads or CpuThreads(accelerator.device)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    quiet = progress is None or not accelerator.is_main_process
    for batch in tqdm(loader, desc=progress, unit="batch", disable=quiet, leave=False):
        with threads.timed("validation", batch["input_ids"].numel()):
            nll, is_target = target_nll(model, batch)
        per_row = torch.stack([nll.sum(1).double(), is_target.sum(1).double()], 1)
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


# ---- setup ----------------------------------------------------------------------------------

def load_base(base: BaseModel, device_map: str | None = None, cache_dir: Path | None = None):
    """(model, tokenizer) of a hub id, local directory or GGUF; TrainError with a one-line reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = base.model
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not name.endswith(".gguf") and not Path(name).expanduser().exists():
        raise TrainError(f"base model directory {name} does not exist")
    try:
        location = weights_location(base, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, device_map=device_map)
    except BaseModelError as exc:
        raise TrainError(str(exc)) from None
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


def _mixed_precision(choice: str) -> str | None:
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch` decides, from its config
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _data_source(data_dir: Path) -> dict:
    """Where the sessions came from, as build-data's report.json says: subreddits, or an import's record."""
    path = data_dir / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    return {"subreddits": list(report.get("subreddits", [])), "imported": report.get("imported")}
