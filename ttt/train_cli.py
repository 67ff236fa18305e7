"""`ttt scrape`, `ttt import`, `ttt build-data`, `ttt train`, `ttt eval`: the persona training recipe.

With no path arguments each step reads what the previous one wrote, under training.data_dir
(default ./data/training) and training.personalities_dir (default ./personalities):

    ttt scrape berkeley               -> data/training/raw/berkeley.jsonl
    ttt import discord general.json   -> data/training/raw/general.jsonl (+ general.import.json: consent, counts)
    ttt build-data                    -> data/training/NAME/ (train.jsonl, validation.jsonl, report.json, README.md)
    ttt train                         -> personalities/NAME/ (checkpoints in data/training/checkpoints/NAME/)
    ttt eval                          -> personalities/NAME/eval.md

`scrape`, `import` and `build-data` record the current name (a subreddit's, or an import's) in
data/training/latest.json, and `train` the personality it wrote; later steps read it, or take
`--name`. Modules are imported when a command runs, so `ttt serve` does not pay for torch, praw or
peft here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from core.config.loading import Settings

STATE_FILE = "latest.json"
NAME = re.compile(r"[A-Za-z0-9_-]+")
RECIPE = "ttt scrape SUB (or ttt import ...), ttt build-data, ttt train, ttt eval"


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
        "import", help="import conversations from a Discord or Slack export, or JSON Lines", formatter_class=fmt,
        description="Write a community's conversations to DATA_DIR/raw/NAME.jsonl as `ttt scrape` writes a\n"
                    "subreddit (then: ttt build-data, ttt train, ttt eval). Replies make the tree; a channel's\n"
                    "plain history is cut at silences; bots' and system messages are dropped; authors (and\n"
                    "their @mentions) become user1, user2, ...: no platform id or name is written.\n"
                    "Discord's and Slack's terms restrict training on people's messages without their consent.",
    )
    sources = p.add_subparsers(dest="source", required=True, metavar="{discord,slack,jsonl}")
    for source, paths, what in (
        ("discord", "FILE.json", "DiscordChatExporter JSON exports of channels (one file per channel)"),
        ("slack", "EXPORT", "a Slack workspace export: its folder or .zip"),
        ("jsonl", "FILE", 'one conversation per line: {"id", "turns": [{"author", "text", "time"}]}'),
    ):
        q = sources.add_parser(source, help=what, description=f"Import {what}.")
        q.add_argument("paths", nargs="+" if source == "discord" else 1, type=Path, metavar=paths)
        q.add_argument("--consent", required=True, metavar="TEXT",
                       help="whose conversations these are and that they agreed (goes into the dataset card)")
        q.add_argument("--name", help="data and persona name (default: from the export)")
        q.add_argument("--exclude-users", nargs="+", action="extend", default=[], metavar="ID_OR_NAME",
                       help="leave these people out (platform ids or any name they go by); after the files")
        if source != "jsonl":
            q.add_argument("--silence-minutes", type=float,  # default: the importer's (not imported by every ttt)
                           help="a longer silence starts a new conversation (default: 30)")
        q.set_defaults(run=run_import)

    p = commands.add_parser(
        "build-data", help="filter scraped or imported threads into train/validation sessions", formatter_class=fmt,
        description="Turn scraped or imported threads into filtered sessions, split by thread into\n"
                    "train.jsonl and validation.jsonl, with report.json and a README.md dataset card.\n"
                    "Default input: DATA_DIR/raw/NAME.jsonl of the current name; output DATA_DIR/NAME/.",
    )
    p.add_argument("--name", help="the subreddit or import to build (default: the current one)")
    p.add_argument("--raw", type=Path, help="JSONL from `ttt scrape` or `ttt import` (its name is the data's)")
    p.add_argument("--out", type=Path, help="output folder (default: DATA_DIR/NAME)")
    p.add_argument("--filters", choices=("reddit", "chat"),
                   help="DialoGPT's Reddit filters, or what chat needs (default: chat for imports, else reddit)")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-title", action="store_true", help="start sessions at the top-level comments")
    p.set_defaults(run=run_build_data)

    p = commands.add_parser(
        "train", help="fine-tune a model on the sessions into a personality directory", formatter_class=fmt,
        description="Fine-tune a causal LM (default: training.base_model) on DATA_DIR/NAME and write\n"
                    "PERSONALITIES_DIR/NAME: weights (or a LoRA adapter), tokenizer, persona.json and\n"
                    "README.md; then print the config.yaml lines that serve it. Several GPUs:\n"
                    "accelerate launch $(which ttt) train ... (DDP, FSDP or DeepSpeed per `accelerate config`).",
    )
    p.add_argument("--name", help="data and persona name (default: the current one; with --data, its folder's)")
    p.add_argument("--data", type=Path, help="folder from `ttt build-data` (default: DATA_DIR/NAME)")
    p.add_argument("--base-model", help="a persona's name (its model: `smol` is the default persona's base), "
                                        "package://PKG/FILE.gguf, a .gguf file, a local directory or a hub id "
                                        "(default: training.base_model)")
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
    p.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="auto: bf16 (else fp16) on GPU, none on CPU; bf16 on a CPU with AVX512-BF16 or AMX is "
                        "about 1.5x faster")
    p.add_argument("--eval-interval", type=int, default=200, help="steps between validations and checkpoints")
    p.add_argument("--patience", type=int, default=3, help="validations without a new best before stopping (0: never)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(run=run_train)

    p = commands.add_parser(
        "eval", help="perplexity, distinct-1/2 and base vs fine-tuned replies, as Markdown", formatter_class=fmt,
        description="Evaluate a personality on its held-out sessions: validation perplexity, distinct-1/2,\n"
                    "average reply length, and base vs fine-tuned replies side by side. Its last line is\n"
                    "machine-readable: ppl_base=X ppl_tuned=Y ppl_drop=Z distinct1=A distinct2=B reply_words=C.\n"
                    "Default: the personality `ttt train` wrote last; report in PERSONALITY/eval.md.",
    )
    p.add_argument("--name", help="the persona to evaluate: PERSONALITIES_DIR/NAME (default: the last trained)")
    p.add_argument("--personality", type=Path, help="personality directory (default: see --name)")
    p.add_argument("--data", type=Path, help="folder with validation.jsonl (default: the one trained on)")
    p.add_argument("--base-model", help="model to compare with, as for `ttt train` (default: the personality's base)")
    p.add_argument("--report", type=Path, help="Markdown file (default: PERSONALITY/eval.md)")
    p.add_argument("--samples", type=int, default=20, help="held-out contexts to reply to (default: 20)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="replies are sampled: reply i with seed + i")
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
    _remember(settings, name=subreddit, raw=str(out))
    print(f"{summary.submissions} threads ({summary.comments} comments) written to {out}; "
          f"{summary.skipped} already there, {summary.not_found} not found, "
          f"{summary.unexpanded} 'more comments' links not expanded")
    print("next: ttt build-data")
    return 0


def run_import(settings: Settings, args: argparse.Namespace) -> int:
    from training.imports import ExportError, dataset_name, read_export, save_import

    raw_dir = settings.config.training.data_dir / "raw"
    try:
        export = read_export(args.source, args.paths)
        name = args.name or dataset_name(export.suggested_name)
        if not NAME.fullmatch(name):
            raise RecipeError(f"name {name!r} must be letters, digits, '-' or '_': pass --name")
        silence = getattr(args, "silence_minutes", None)
        summary = save_import(export, name, raw_dir, args.consent, args.exclude_users,
                              **({} if silence is None else {"silence_minutes": silence}), progress=sys.stderr.isatty())
    except (ExportError, RecipeError) as exc:
        return _fail("import", exc)
    _remember(settings, name=name, raw=str(summary.raw))
    print("\n".join(summary.lines()))
    print(f"consent recorded in {summary.record}")
    print(f"next: ttt build-data --name {name}")
    return 0


def run_build_data(settings: Settings, args: argparse.Namespace) -> int:
    from training.dataset import PRESETS, build_dataset
    from training.imports import read_record

    data_dir = settings.config.training.data_dir
    try:
        if args.raw:
            raw, name = args.raw, args.name or args.raw.stem
        else:
            name = args.name or _current(settings, "name", "run `ttt scrape SUB` or `ttt import ...` first, "
                                                           "or pass --name or --raw FILE")
            raw = data_dir / "raw" / f"{name}.jsonl"
        if not raw.is_file():
            raise RecipeError(f"no scraped or imported threads at {raw}: run `ttt scrape {name}` or `ttt import ...` "
                              "first")
        out = args.out or data_dir / name
        preset = args.filters or ("chat" if read_record(raw) else "reddit")
        cfg = replace(PRESETS[preset], include_title=not args.no_title,
                      validation_fraction=args.validation_fraction, seed=args.seed)
        print(f"{preset} filters on {raw}")
        report = build_dataset(raw, out, cfg, progress=sys.stderr.isatty())
    except (RecipeError, OSError, ValueError) as exc:
        return _fail("build-data", exc)
    print(report.table())
    if not report.train_sessions:
        return _fail("build-data", f"no session passed the filters: nothing to train on in {raw}")
    _remember(settings, name=name, data=str(out))
    print(f"written to {out}")
    print("next: ttt train")
    return 0


def run_train(settings: Settings, args: argparse.Namespace) -> int:
    from training.personality import config_snippet
    from training.train import TrainError, train
    from training.train_config import TrainConfig

    training = settings.config.training
    try:
        data = args.data or training.data_dir / (args.name or _current(
            settings, "name", f"run {RECIPE} in order, or pass --name or --data"))
        name = args.name or data.name
        if not NAME.fullmatch(name):
            raise RecipeError(f"persona name {name!r} must be letters, digits, '-' or '_': pass --name")
        cfg = TrainConfig(
            data_dir=data, out_dir=args.out or training.personalities_dir / name,
            checkpoint_dir=args.checkpoints or training.data_dir / "checkpoints" / name,
            name=name, base_model=args.base_model or training.base_model, personas=settings.config.personas,
            cache_dir=settings.config.generator.cache_dir, format=args.format,
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

    personalities = settings.config.training.personalities_dir
    try:
        personality = args.personality or (personalities / args.name if args.name else None)
        if personality is None:
            latest = _latest(settings)
            if latest.get("personality"):
                personality = Path(latest["personality"])
            elif latest.get("name"):
                personality = personalities / latest["name"]
            else:
                raise RecipeError(f"no personality yet: run {RECIPE} in order, or pass --name or --personality")
        result = evaluate(EvalConfig(
            personality=personality, data_dir=args.data, base_model=args.base_model, report=args.report,
            samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
            personas=settings.config.personas, cache_dir=settings.config.generator.cache_dir,
        ))
    except (RecipeError, EvalError) as exc:
        return _fail("eval", exc)
    print(result.summary())
    print(f"report written to {result.report}")
    print(result.metrics_line())
    return 0


# ---- the current name and personality ----------------------------------------------------

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
    """Record the current name (a new one forgets the previous one's later steps)."""
    state = _latest(settings)
    if values.get("name") not in (None, state.get("name")):
        state = {}
    state.update(values)
    path = settings.config.training.data_dir / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n")


def _fail(command: str, problem: object) -> int:
    print(f"ttt {command}: error: {problem}", file=sys.stderr)
    return 2
