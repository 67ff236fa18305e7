"""The dataset card (README.md) of what `ttt build-data` writes, and how a dataset's source is
described there and in a persona's README: a scraped subreddit, or an import with its consent."""

from __future__ import annotations

from datetime import datetime, timezone

SOURCE_NAMES = {"discord": "Discord", "slack": "Slack", "jsonl": "JSON Lines"}
REDDIT_TERMS = "Reddit content belongs to its authors and is subject to Reddit's terms; use accordingly."
CHAT_TERMS = ("Discord's and Slack's terms restrict training on people's messages without their consent: "
              "import only conversations whose authors agreed to it.")


def _date(utc: float | None) -> str:
    return datetime.fromtimestamp(utc, timezone.utc).date().isoformat() if utc else "n/a"


def source_label(report: dict) -> str:
    """Where the sessions come from, in a few words ("r/berkeley", "a Discord export (general)"),
    from report.json (or Report.to_dict())."""
    imported = report.get("imported")
    if imported:
        return f"a {SOURCE_NAMES.get(imported['source'], imported['source'])} export ({imported['name']})"
    return ", ".join(f"r/{s}" for s in report.get("subreddits", [])) or "n/a"


def terms_note(report: dict) -> str:
    """What the dataset card and the persona's README say about whose words these are."""
    imported = report.get("imported")
    if imported:
        return f"Imported with this consent: \"{imported['consent']}\". {CHAT_TERMS}"
    return REDDIT_TERMS


def dataset_card(report: dict, table: str) -> str:
    """The README.md of a built dataset (with a config for `datasets.load_dataset`), from its report."""
    filters = dict(report["config"]["filters"])
    filters["common_words"] = f"{len(filters['common_words'])} most common English words"
    source = source_label(report)
    params = "\n".join(f"- `{k}`: {v}" for k, v in filters.items())
    shape = {k: v for k, v in report["config"].items() if k != "filters"}
    splits = [name for name in ("train", "validation") if report[f"{name}_sessions"]]
    data_files = "".join(f"  - split: {name}\n    path: {name}.jsonl\n" for name in splits)
    imported = report["imported"]
    rule = ("A turn failing a rule is skipped: the turn after it starts a new session. A path longer than "
            "`max_turns` is cut into windows." if report["config"].get("skip_dropped_turns")
            else "A turn failing a rule is pruned with its replies; paths through it end at its parent.")
    first, last = _date(report["first_utc"]), _date(report["last_utc"])
    if imported:
        counts = imported["counts"]
        cut = (f"cut at silences over {imported['silence_minutes']:g} minutes" if imported["silence_minutes"]
               else "one conversation per line")
        title = f"Conversations from {source}"
        origin = (f"Conversations imported with `ttt import {imported['source']}` ({imported['format']}) on "
                  f"{imported['imported'][:10]}: {counts['messages']} messages, {cut}, into "
                  f"{counts['conversations']} conversations of {counts['turns']} turns by {counts['people']} "
                  f"people, written between {first} and {last} (UTC). "
                  f"Dropped at import: {counts['bot_messages']} bots' messages, {counts['system_messages']} "
                  f"system messages, {counts['empty_messages']} empty ones and {counts['excluded_messages']} by the "
                  f"{counts['excluded_people']} people left out. Authors are pseudonymised (user1, user2, ...; "
                  f"mentions too): no platform id or name is in these files.\n\n"
                  f"**Consent**: {imported['consent']}")
    else:
        title = f"Reddit sessions from {source}"
        origin = (f"Multi-turn sessions (root-to-leaf paths through comment trees) scraped from {source}, posted\n"
                  f"between {first} and {last} (UTC).")
    return f"""---
configs:
- config_name: default
  data_files:
{data_files}---
# {title}

{origin}

Each line of `train.jsonl` / `validation.jsonl` is `{{"turns": [{{"author", "text"}}, ...], "submission_id"}}`.
Threads are split between train and validation, never shared: {report["train_sessions"]} train
sessions from {report["train_threads"]} threads, {report["validation_sessions"]} validation sessions
from {report["validation_threads"]} threads.

## Filters (after DialoGPT, Zhang et al. 2019)

{rule}

{params}

Session shape: {", ".join(f"`{k}`={v}" for k, v in shape.items())}

## Counts

```
{table}
```

{terms_note(report)}
"""
