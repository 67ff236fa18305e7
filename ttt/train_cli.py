"""`ttt scrape`, `ttt build-data`, `ttt train`, `ttt eval`: the persona training recipe.

With no path arguments each step reads what the previous one wrote, under training.data_dir
(default ./data/training) and training.personalities_dir (default ./personalities):

    ttt scrape berkeley   -> data/training/raw/berkeley.jsonl
    ttt build-data        -> data/training/berkeley/ (train.jsonl, validation.jsonl, report.json, README.md)
    ttt train             -> personalities/berkeley/ (checkpoints in data/training/checkpoints/berkeley/)
    ttt eval              -> personalities/berkeley/eval.md

`scrape` and `build-data` record the current subreddit in data/training/latest.json, and `train`
the personality it wrote; later steps read it. Modules are imported when a command runs, so
`ttt serve` does not pay for torch, praw or peft here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from core.config.loading import Settings

STATE_FILE = "latest.json"
RECIPE = "ttt scrape SUB, ttt build-data, ttt train, ttt eval"


class RecipeError(Exception):
    """A step cannot run; the message says what to do instead."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the four training subcommands to the `ttt` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = commands.add_parser(
        "scrape", help="scrape a subreddit's threads (REDDIT_CLIENT_ID / REDDIT_CLIENT_SECRET)", formatter_class=fmt,
        description="Append a subreddit's threads, with their comment trees, to DATA_DIR/raw/SUB.jsonl.\n"
                    "A re-run resumes: threads already there are skipped. Credentials come from the\n"
                    "environment or .env (REDDIT_CLIENT_ID, REDDIT_CLIENT_SECRET; REDDIT_USERNAME and\n"
                    "REDDIT_PASSWORD for a script-app login); endpoints from config.yaml's reddit section.",
    )
    p.add_argument("subreddit", help="name without r/, e.g. berkeley; becomes the current subreddit")
    p.add_argument("--listing", choices=("hot", "new", "top"), default="top")
    p.add_argument("--time-filter", choices=("all", "day", "hour", "month", "week", "year"), default="all",
                   help="for --listing top (default: all)")
    p.add_argument("--limit", type=int, default=1000, help="threads to read from the listing (default: 1000)")
    p.add_argument("--ids", nargs="+", metavar="ID", help="scrape these submission ids instead of a listing")
    p.add_argument("--replace-more-limit", type=int, default=32,
                   help="'load more comments' expansions per thread (default: 32)")
    p.add_argument("--out", type=Path, help="JSONL file (default: DATA_DIR/raw/SUB.jsonl)")
    p.set_defaults(run=run_scrape)

    p = commands.add_parser(
        "build-data", help="filter scraped threads into train/validation sessions", formatter_class=fmt,
        description="Turn scraped threads into DialoGPT-filtered sessions, split by thread into\n"
                    "train.jsonl and validation.jsonl, with report.json and a README.md dataset card.\n"
                    "Default input: the current subreddit's DATA_DIR/raw/SUB.jsonl; output DATA_DIR/SUB/.",
    )
    p.add_argument("--raw", type=Path, help="JSONL from `ttt scrape` (its name is the subreddit)")
    p.add_argument("--out", type=Path, help="output folder (default: DATA_DIR/SUB)")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-title", action="store_true", help="start sessions at the top-level comments")
    p.set_defaults(run=run_build_data)

    p = commands.add_parser(
        "train", help="fine-tune a model on the sessions into a personality directory", formatter_class=fmt,
        description="Fine-tune a causal LM (default: training.base_model) on DATA_DIR/SUB and write\n"
                    "PERSONALITIES_DIR/NAME: weights (or a LoRA adapter), tokenizer, persona.json and\n"
                    "README.md; then print the config.yaml lines that serve it. Several GPUs:\n"
                    "accelerate launch $(which ttt) train ... (DDP, FSDP or DeepSpeed per `accelerate config`).",
    )
    p.add_argument("--data", type=Path, help="folder from `ttt build-data` (default: DATA_DIR/SUB)")
    p.add_argument("--base-model", help="hub id or local directory (default: training.base_model)")
    p.add_argument("--name", help="persona name (default: the data folder's name)")
    p.add_argument("--out", type=Path, help="personality directory (default: PERSONALITIES_DIR/NAME)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: DATA_DIR/checkpoints/NAME)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint, or from the step-N folder given")
    p.add_argument("--format", choices=("auto", "dialogpt", "chat"), default="auto",
                   help="prompt format (auto: chat when the tokenizer has a chat template)")
    p.add_argument("--system-prompt", default="", help="chat format: the system prompt to train and serve with")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter; the base stays shared when served")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-target-modules", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--device-map", choices=("auto",), help="split a model bigger than one GPU across the GPUs")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="sessions per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5, LoRA 2e-4)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per session; the oldest turns go first")
    p.add_argument("--no-group-by-length", action="store_true", help="batch sessions in plain random order")
    p.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto")
    p.add_argument("--eval-interval", type=int, default=200, help="steps between validations and checkpoints")
    p.add_argument("--patience", type=int, default=3, help="validations without a new best before stopping (0: never)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(run=run_train)

    p = commands.add_parser(
        "eval", help="perplexity, distinct-1/2 and base vs fine-tuned replies, as Markdown", formatter_class=fmt,
        description="Evaluate a personality on its held-out sessions: validation perplexity, distinct-1/2,\n"
                    "average reply length, and base vs fine-tuned replies side by side.\n"
                    "Default: the personality `ttt train` wrote last; report in PERSONALITY/eval.md.",
    )
    p.add_argument("--personality", type=Path, help="personality directory (default: the last trained)")
    p.add_argument("--data", type=Path, help="folder with validation.jsonl (default: the one trained on)")
    p.add_argument("--base-model", help="model to compare with (default: the personality's base model)")
    p.add_argument("--report", type=Path, help="Markdown file (default: PERSONALITY/eval.md)")
    p.add_argument("--samples", type=int, default=20, help="held-out contexts to reply to (default: 20)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(run=run_eval)


# ---- the commands ---------------------------------------------------------------------------

def run_scrape(settings: Settings, args: argparse.Namespace) -> int:
    from training.scrape import ENV_CLIENT_ID, ENV_CLIENT_SECRET, ScrapeError, scrape

    cfg = settings.config
    subreddit = args.subreddit.removeprefix("r/").strip("/")
    out = args.out or cfg.training.data_dir / "raw" / f"{subreddit}.jsonl"
    secrets = settings.secrets
    try:
        if not secrets.get(ENV_CLIENT_ID) or not secrets.get(ENV_CLIENT_SECRET):
            raise ScrapeError(
                f"set {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} in the environment or .env "
                "(create a 'script' app at https://www.reddit.com/prefs/apps)"
            )
        summary = scrape(
            subreddit, out,
            client_id=secrets.get(ENV_CLIENT_ID), client_secret=secrets.get(ENV_CLIENT_SECRET),
            username=secrets.get("REDDIT_USERNAME"), password=secrets.get("REDDIT_PASSWORD"),
            user_agent=cfg.reddit.user_agent, oauth_url=cfg.reddit.oauth_url, reddit_url=cfg.reddit.reddit_url,
            listing=args.listing, time_filter=args.time_filter, limit=args.limit, submission_ids=args.ids,
            replace_more_limit=args.replace_more_limit, progress=sys.stderr.isatty(),
        )
    except ScrapeError as exc:
        return _fail("scrape", exc)
    _remember(settings, subreddit=subreddit, raw=str(out))
    print(f"{summary.submissions} threads ({summary.comments} comments) written to {out}; "
          f"{summary.skipped} already there, {summary.not_found} not found, "
          f"{summary.unexpanded} 'more comments' links not expanded")
    print("next: ttt build-data")
    return 0


def run_build_data(settings: Settings, args: argparse.Namespace) -> int:
    from training.dataset import DatasetConfig, build_dataset

    data_dir = settings.config.training.data_dir
    try:
        if args.raw:
            raw, subreddit = args.raw, args.raw.stem
        else:
            subreddit = _current(settings, "subreddit", "run `ttt scrape SUB` first, or pass --raw FILE")
            raw = data_dir / "raw" / f"{subreddit}.jsonl"
        if not raw.is_file():
            raise RecipeError(f"no scraped threads at {raw}: run `ttt scrape {subreddit}` first")
        out = args.out or data_dir / subreddit
        cfg = DatasetConfig(
            include_title=not args.no_title, validation_fraction=args.validation_fraction, seed=args.seed
        )
        report = build_dataset(raw, out, cfg)
    except (RecipeError, OSError, ValueError) as exc:
        return _fail("build-data", exc)
    print(report.table())
    if not report.train_sessions:
        return _fail("build-data", f"no session passed the filters: nothing to train on in {raw}")
    _remember(settings, subreddit=subreddit, data=str(out))
    print(f"written to {out}")
    print("next: ttt train")
    return 0


def run_train(settings: Settings, args: argparse.Namespace) -> int:
    from training.personality import config_snippet
    from training.train import TrainError, train
    from training.train_config import TrainConfig

    training = settings.config.training
    try:
        data = args.data or training.data_dir / _current(
            settings, "subreddit", f"run {RECIPE} in order, or pass --data")
        name = args.name or data.name
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise RecipeError(f"persona name {name!r} must be letters, digits, '-' or '_': pass --name")
        cfg = TrainConfig(
            data_dir=data, out_dir=args.out or training.personalities_dir / name,
            checkpoint_dir=args.checkpoints or training.data_dir / "checkpoints" / name,
            name=name, base_model=args.base_model or training.base_model, format=args.format,
            system_prompt=args.system_prompt, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_target_modules=args.lora_target_modules, device_map=args.device_map,
            max_length=args.max_length, batch_size=args.batch_size, grad_accum=args.grad_accum,
            group_by_length=not args.no_group_by_length, epochs=args.epochs, max_steps=args.max_steps,
            learning_rate=args.lr, mixed_precision=args.mixed_precision, eval_interval=args.eval_interval,
            patience=args.patience or None, log_interval=args.log_interval, resume=args.resume, seed=args.seed,
        )
        result = train(cfg)
    except (RecipeError, TrainError) as exc:
        return _fail("train", exc)
    except KeyboardInterrupt:
        print("\nttt train: interrupted; the same command with --resume continues from the last checkpoint",
              file=sys.stderr)
        return 130
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    _remember(settings, personality=str(cfg.out_dir))
    ppl = lambda x: f"{x:.2f}" if x else "n/a"  # noqa: E731
    print(f"\nvalidation perplexity {ppl(result.base_perplexity)} -> {ppl(result.perplexity)} after "
          f"{result.steps} steps ({result.stopped}); personality written to {cfg.out_dir}")
    print(f"\nTo serve it, add to config.yaml:\n\n{config_snippet(result.card, cfg.out_dir)}\n")
    print("next: ttt eval")
    return 0


def run_eval(settings: Settings, args: argparse.Namespace) -> int:
    from training.evaluate import EvalConfig, EvalError, evaluate

    try:
        personality = args.personality
        if personality is None:
            latest = _latest(settings)
            if latest.get("personality"):
                personality = Path(latest["personality"])
            elif latest.get("subreddit"):
                personality = settings.config.training.personalities_dir / latest["subreddit"]
            else:
                raise RecipeError(f"no personality yet: run {RECIPE} in order, or pass --personality")
        result = evaluate(EvalConfig(
            personality=personality, data_dir=args.data, base_model=args.base_model, report=args.report,
            samples=args.samples, max_new_tokens=args.max_new_tokens,
        ))
    except (RecipeError, EvalError) as exc:
        return _fail("eval", exc)
    print(result.summary())
    print(f"report written to {result.report}")
    return 0


# ---- the current subreddit and personality ----------------------------------------------------

def _latest(settings: Settings) -> dict:
    path = settings.config.training.data_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _current(settings: Settings, key: str, hint: str) -> str:
    value = _latest(settings).get(key)
    if not value:
        raise RecipeError(f"no current {key}: {hint}")
    return value


def _remember(settings: Settings, **values: str) -> None:
    """Record the current subreddit (a new one forgets the previous one's later steps)."""
    state = _latest(settings)
    if values.get("subreddit") not in (None, state.get("subreddit")):
        state = {}
    state.update(values)
    path = settings.config.training.data_dir / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n")


def _fail(command: str, problem: object) -> int:
    print(f"ttt {command}: error: {problem}", file=sys.stderr)
    return 2
