"""The whole configuration of a `ttt train` run (training/train.py), one field per option."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.config.schema import PersonaConfig

DEFAULT_LR = 5e-5
DEFAULT_LORA_LR = 2e-4


@dataclass
class TrainConfig:
    data_dir: Path  # train.jsonl (+ validation.jsonl) as `ttt build-data` writes them
    out_dir: Path  # the personality directory
    checkpoint_dir: Path  # resumable training state: step-N/ folders
    name: str = "persona"
    # a hub id, a local directory, a GGUF (package://PKG/FILE.gguf or a path), or a persona's name
    base_model: str = "microsoft/DialoGPT-medium"
    personas: dict[str, PersonaConfig] = field(default_factory=dict)  # the config's, for a persona's name
    cache_dir: Path | None = None  # where a GGUF base is dequantized (generator.cache_dir: serving's too)
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
