"""Evaluate a personality on held-out sessions and write a Markdown report.

Numbers for the base model, the fine-tune and the human replies: validation perplexity (on the
persona's target tokens, as in training), distinct-1/2 (unique word n-grams / all word n-grams
over the replies, Li et al. 2016) and the average reply length in words. Replies are sampled as
the persona samples them when served (training/personality.py `reply_decoding`), seeded, to
held-out contexts from as many conversations as there are samples, base and fine-tuned side by
side with the same seed. Models load the way the service loads them (core.engine.models.load_model);
a LoRA personality is its base with the adapter, and the base's own replies come from the same
model with the adapter switched off.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from core.config.schema import PersonaConfig
from core.conversation import Turn
from core.engine.models import ModelUnavailable, choose_placement, load_model, resolve_source
from core.prompts import PromptTooLong, SystemPromptTooLong, end_of_turn_ids, fit_to_budget
from training.base_model import BaseModelError, resolve_base_model
from training.examples import encode_all, make_loader, read_sessions, session_turns
from training.personality import reply_decoding
from training.train import validation_loss


@dataclass
class EvalConfig:
    personality: Path  # written by `ttt train`
    data_dir: Path | None = None  # validation.jsonl; default: the folder it was trained on
    base_model: str | None = None  # default: the personality's base model; a persona's name names its model
    report: Path | None = None  # default: PERSONALITY/eval.md
    samples: int = 20  # held-out contexts replied to
    max_new_tokens: int = 40
    batch_size: int = 8  # perplexity batches
    seed: int = 0  # replies' sampling: reply i of both models is drawn with seed + i
    personas: dict[str, PersonaConfig] = field(default_factory=dict)  # the config's, for a persona's name
    cache_dir: Path | None = None  # where a GGUF base is dequantized


class EvalError(Exception):
    """The evaluation cannot run; the message says why, in one line."""


@dataclass
class Scores:
    perplexity: float | None
    distinct_1: float
    distinct_2: float
    reply_words: float


@dataclass
class Sample:
    context: list[Turn]
    human: str
    base: str
    tuned: str


@dataclass
class EvalResult:
    report: Path
    base: Scores
    tuned: Scores
    human: Scores
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> str:
        rows = [("", "base", "fine-tuned", "human")] + [
            (label, *(_number(getattr(s, key)) for s in (self.base, self.tuned, self.human)))
            for label, key in _METRICS
        ]
        return "\n".join(f"{a:<30}{b:>12}{c:>12}{d:>12}" for a, b, c, d in rows)

    def metrics_line(self) -> str:
        """One machine-readable line: both perplexities, the relative drop, the fine-tune's replies."""
        drop = (self.base.perplexity - self.tuned.perplexity) / self.base.perplexity
        return (f"ppl_base={self.base.perplexity:.2f} ppl_tuned={self.tuned.perplexity:.2f} ppl_drop={drop:.3f} "
                f"distinct1={self.tuned.distinct_1:.3f} distinct2={self.tuned.distinct_2:.3f} "
                f"reply_words={self.tuned.reply_words:.1f}")


_METRICS = [("validation perplexity", "perplexity"), ("distinct-1", "distinct_1"), ("distinct-2", "distinct_2"),
            ("average reply length (words)", "reply_words")]


def distinct_n(replies: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over the replies (0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (r.lower().split() for r in replies)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def scores(replies: list[str], perplexity: float | None) -> Scores:
    words = [len(r.split()) for r in replies]
    return Scores(perplexity, distinct_n(replies, 1), distinct_n(replies, 2), sum(words) / max(1, len(words)))


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Score the personality and its base on held-out sessions; write the report."""
    from accelerate import Accelerator

    card_path = cfg.personality / "persona.json"
    if not card_path.is_file():
        raise EvalError(f"{cfg.personality} is not a personality directory written by `ttt train` (no persona.json)")
    card = json.loads(card_path.read_text())
    fmt, system_prompt, max_length = card["format"], card.get("system_prompt", ""), card["training"]["max_length"]
    data_dir = cfg.data_dir or Path(card["data"]["dir"])
    validation = data_dir / "validation.jsonl"
    if not validation.is_file():
        raise EvalError(f"no held-out sessions: {validation} does not exist (pass --data)")
    sessions = read_sessions(validation)
    try:
        base_name = resolve_base_model(cfg.base_model or card["base_model"], cfg.personas).model
    except BaseModelError as exc:
        raise EvalError(str(exc)) from None

    placement = choose_placement()
    print(f"loading {cfg.personality} and {base_name} on {placement.device}")
    if card["lora"] and base_name != card["base_model"]:
        raise EvalError("a LoRA personality is compared with its own base model: drop --base-model")
    try:
        if card["lora"]:
            from peft import PeftModel

            base, tokenizer = load_model(resolve_source(base_name), placement, cfg.cache_dir)
            tuned = PeftModel.from_pretrained(base, str(cfg.personality)).eval()
            base_context = tuned.disable_adapter
        else:
            tuned, tokenizer = load_model(resolve_source(str(cfg.personality)), placement, cfg.cache_dir)
            base, _ = load_model(resolve_source(base_name), placement, cfg.cache_dir)
            base_context = nullcontext
    except ModelUnavailable as exc:
        raise EvalError(str(exc)) from None
    base_model = tuned if card["lora"] else base

    accelerator = Accelerator(cpu=placement.device == "cpu")
    examples, _ = encode_all(sessions, fmt, tokenizer, max_length, system_prompt, "encoding validation")
    if not examples:
        raise EvalError(f"{validation} holds no session with a reply to score")
    loader = accelerator.prepare(make_loader(examples, cfg.batch_size, tokenizer.pad_token_id, shuffle=False))
    tuned_ppl = math.exp(validation_loss(tuned, loader, accelerator, "perplexity, fine-tuned"))
    with base_context():
        base_ppl = math.exp(validation_loss(base_model, loader, accelerator, "perplexity, base"))
    print(f"validation perplexity: base {base_ppl:.2f}, fine-tuned {tuned_ppl:.2f} ({len(examples)} sessions)")

    stops = sorted(set(end_of_turn_ids(fmt, tokenizer) + [tokenizer.eos_token_id]))
    budget = max(16, max_length - cfg.max_new_tokens)
    decoding = {**reply_decoding(card), "max_new_tokens": cfg.max_new_tokens}
    samples = []
    with tqdm(total=min(cfg.samples, len(sessions)), desc="replying", unit="context") as bar:
        for session in _one_per_conversation(sessions):
            if len(samples) == cfg.samples:
                break
            turns = session_turns(session["turns"], fmt)
            context, human = turns[:-1], turns[-1].text
            try:
                _, prompt = fit_to_budget(fmt, tokenizer, context, system_prompt, budget)
            except SystemPromptTooLong as exc:
                raise EvalError(f"cannot reply with {cfg.max_new_tokens} new tokens: {exc}") from None
            except PromptTooLong:  # its newest turn alone fills the context: not a context to reply to
                continue
            seed = cfg.seed + len(samples)
            with base_context():
                base_reply = _reply(base_model, tokenizer, prompt, stops, decoding, seed)
            tuned_reply = _reply(tuned, tokenizer, prompt, stops, decoding, seed)
            samples.append(Sample(context, human, base_reply, tuned_reply))
            bar.update()

    result = EvalResult(
        report=cfg.report or cfg.personality / "eval.md",
        base=scores([s.base for s in samples], base_ppl), tuned=scores([s.tuned for s in samples], tuned_ppl),
        human=scores([s.human for s in samples], None), samples=samples,
    )
    result.report.parent.mkdir(parents=True, exist_ok=True)
    result.report.write_text(_markdown(result, card, cfg, base_name, validation, len(examples), decoding),
                             encoding="utf-8")
    return result


def _one_per_conversation(sessions: list[dict]) -> list[dict]:
    """The sessions reordered so that the first ones come from as many conversations (threads) as possible."""
    firsts, rest, seen = [], [], set()
    for session in sessions:
        thread = session.get("submission_id")
        (rest if thread in seen else firsts).append(session)
        seen.add(thread)
    return firsts + rest


@torch.no_grad()
def _reply(model, tokenizer, prompt: list[int], stops: list[int], decoding: dict, seed: int) -> str:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id, **decoding)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.3f}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "*(empty)*"


def _settings(decoding: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in decoding.items() if key != "do_sample")


def _markdown(result: EvalResult, card: dict, cfg: EvalConfig, base_name: str, validation: Path, n: int,
              decoding: dict) -> str:
    table = ["| | base | fine-tuned | human reference |", "|---|---:|---:|---:|"]
    for label, key in _METRICS:
        table.append(f"| {label} | " + " | ".join(_number(getattr(s, key)) for s in
                                                   (result.base, result.tuned, result.human)) + " |")
    blocks = []
    for i, s in enumerate(result.samples, 1):
        context = "\n".join(f"> **{_cell(t.author)}:** {_cell(t.text)}  " for t in s.context)
        blocks.append(f"### {i}\n\n{context}\n\n| | reply |\n|---|---|\n| human | {_cell(s.human)} |\n"
                      f"| base | {_cell(s.base)} |\n| fine-tuned | {_cell(s.tuned)} |\n")
    kind = "LoRA adapter" if card["lora"] else "fine-tune"
    return f"""# Evaluation of persona `{card['name']}`

{kind} `{cfg.personality}` against base `{base_name}`, on {n} held-out sessions of
`{validation}` ({card['format']} format), {datetime.now(timezone.utc).isoformat(timespec='seconds')}.
Replies: sampled as the persona samples when served ({_settings(decoding)}), both models with the same
seed for the same context, to {len(result.samples)} held-out contexts (one per conversation while there
are enough); distinct-n counts unique word n-grams over all replies.

{chr(10).join(table)}

`{result.metrics_line()}`

## Replies on held-out contexts

{chr(10).join(blocks)}"""
