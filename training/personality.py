"""The personality directory `ttt train` writes: weights (or a LoRA adapter), tokenizer,
persona.json (the card: base model, data, validation perplexity, settings), a README and the
config.yaml lines that serve it as a persona."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from training.dataset_card import source_label, terms_note

if TYPE_CHECKING:
    from accelerate import Accelerator

    from training.train_config import TrainConfig


def persona_card(cfg: TrainConfig, run: dict, state: dict, stopped: str) -> dict:
    """persona.json for the run so far. `run` holds what setup decided (base_model, base_persona,
    format, max_length, data, source, planned_steps, steps_per_epoch, learning_rate, processes,
    mixed_precision); `state` is the loop's (step, best_loss, best_step, base_loss)."""
    best, base = state["best_loss"], state["base_loss"]
    subreddits = run["source"]["subreddits"]
    return {
        "name": cfg.name, "subreddit": subreddits[0] if len(subreddits) == 1 else None,
        "subreddits": subreddits, "imported": run["source"]["imported"],
        "base_model": run["base_model"], "base_persona": run["base_persona"], "format": run["format"],
        "system_prompt": cfg.system_prompt,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                 "target_modules": cfg.lora_target_modules} if cfg.lora else None,
        "data": run["data"],
        "validation": {
            "perplexity": math.exp(best) if best is not None else None, "loss": best, "step": state["best_step"],
            "base_perplexity": math.exp(base) if base is not None else None,
        },
        "training": {
            "steps": state["step"], "planned_steps": run["planned_steps"], "stopped": stopped,
            "epochs": round(state["step"] / run["steps_per_epoch"], 2), "learning_rate": run["learning_rate"],
            "schedule": f"linear warm-up {cfg.warmup_fraction:.0%}, cosine to {cfg.min_lr_fraction:g} x peak",
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": run["processes"],
            "max_length": run["max_length"], "mixed_precision": run["mixed_precision"],
            "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "seed": cfg.seed,
            "group_by_length": cfg.group_by_length,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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
    write_card(tmp, card, out_dir)
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def record_ending(out_dir: Path, card: dict) -> None:
    """Rewrite the card of a personality whose (best) weights are already written, with how
    training ended; it keeps the date those weights were written."""
    saved = json.loads((out_dir / "persona.json").read_text())
    write_card(out_dir, {**card, "created": saved["created"]}, out_dir)


def write_card(folder: Path, card: dict, out_dir: Path) -> None:
    """persona.json and README.md in `folder`, for a personality that will live in `out_dir`."""
    (folder / "persona.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(_readme(card, config_snippet(card, out_dir)), encoding="utf-8")


def shown_path(path: str | Path) -> str:
    """A path as config.yaml should hold it: ./relative under the working directory, else absolute."""
    path = Path(path).expanduser().resolve()
    try:
        return "./" + str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def reply_decoding(card: dict) -> dict:
    """How the persona samples its replies, as the printed config lines say (and `ttt eval` samples)."""
    reply_tokens = min(64 if card["format"] == "dialogpt" else 128, card["training"]["max_length"] // 2)
    if card["format"] == "dialogpt":  # DialoGPT loops under greedy decoding: sample, no repeated 3-grams
        return {"max_new_tokens": reply_tokens, "do_sample": True, "top_k": 100, "top_p": 0.7, "temperature": 0.8,
                "no_repeat_ngram_size": 3}
    return {"max_new_tokens": reply_tokens, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def config_snippet(card: dict, out_dir: Path) -> str:
    """The config.yaml lines that add the personality as a persona."""
    base = card["base_model"]
    base_shown = shown_path(base) if Path(base).expanduser().exists() else base
    base_label = card.get("base_persona") or base.rstrip("/").split("/")[-1]
    ppl = card["validation"].get("perplexity")
    lines = [
        "personas:",
        f"  {card['name']}:",
        f"    description: {base_label} fine-tuned on {source_label(card)}"
        + (f" (validation perplexity {ppl:.1f})" if ppl else ""),
    ]
    if card["lora"]:
        lines += [f"    model: {base_shown}", f"    adapter: {shown_path(out_dir)}"]
    else:
        lines += [f"    model: {shown_path(out_dir)}"]
    lines += [f"    format: {card['format']}", f"    max_context_tokens: {card['training']['max_length']}"]
    if card["system_prompt"]:
        lines += [f"    system_prompt: {json.dumps(card['system_prompt'])}"]
    lines += ["    decoding:"] + [f"      {key}: {json.dumps(value)}" for key, value in reply_decoding(card).items()]
    return "\n".join(lines)


def _readme(card: dict, snippet: str) -> str:
    v, d, t = card["validation"], card["data"], card["training"]
    ppl = lambda x: f"{x:.2f}" if x else "n/a"  # noqa: E731
    kind = f"A LoRA adapter (r={card['lora']['r']}) on" if card["lora"] else "A full fine-tune of"
    return f"""# Persona `{card['name']}`

{kind} `{card['base_model']}` on sessions from {source_label(card)}, in the `{card['format']}`
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

{terms_note(card)}
"""
