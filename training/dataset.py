"""Raw threads -> multi-turn sessions, filtered the way DialoGPT filtered Reddit, or as chat needs.

A session is one root-to-leaf path through a thread's comment tree (the submission's title and
text optionally as its first turn), keeping its last ``max_turns`` turns. The filters follow
DialoGPT (Zhang et al. 2019, §2, and its reddit extractor) and act on turns: a comment that
fails a rule is pruned with everything below it, so the paths through it end at its parent
(still a session when long enough) and its siblings' paths are untouched.

Imported chat history (training/imports) has the same shape, but a conversation is mostly one long
chain: PRESETS["chat"] cuts each path into windows of ``max_turns`` (a chain has one leaf: keeping
only its last turns would drop the rest), and skips a dropped turn instead of pruning what follows
(the next message goes on with the conversation). Its filter values, and why, are in the README.

`ttt build-data` runs it.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from core.safety import is_offensive
from training.dataset_card import dataset_card
from training.imports import read_record

# The most frequent English words; a turn with none of them is probably not English.
COMMON_ENGLISH_WORDS = frozenset(
    """the be to of and a in that have i it for not on with he as you do at this but his by from
    they we say her she or an will my one all would there their what so up out if about who get
    which go me when make can like time no just him know take people into year your good some could
    them see other than then now look only come its over think also back after use two how our work
    first well way even new want because any these give day most us is are was were am has had did
    been does said yes very""".split()
)
DELETED_MARKERS = ("[deleted]", "[removed]")
RULES = (  # in the order they are checked; a turn is counted under the first rule it fails
    "deleted", "bot", "url", "markup", "turn_too_long", "long_word", "shouting", "repetition",
    "too_short", "non_english", "offensive", "session_too_long",
)
_URL = re.compile(
    r"(?i)\b(?:https?://|www\.)\S+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|edu|gov|co|ly|gg|me|tv)(?:/\S*)?\b"
)
_QUOTE_LINE = re.compile(r"^\s*>", re.MULTILINE)


@dataclass
class FilterConfig:
    """Which rules run, and their parameters; ``None`` switches a numeric rule off."""

    deleted: bool = True  # "[deleted]" / "[removed]" bodies
    bots: bool = True
    bot_authors: tuple[str, ...] = ("AutoModerator",)  # compared case-insensitively
    urls: bool = True
    markup: bool = True  # "[", "]", or a quoted line ("> ..." / "&gt; ...")
    max_turn_words: int | None = 30  # DialoGPT extractor's max_len
    max_word_chars: int | None = 30
    shouting_letters: int | None = 5  # a run of this many capitals: [A-Z]{5,}
    repeat_run: int | None = 3  # the same word this many times in a row
    min_turn_words: int | None = 2  # drops a target of one word or less
    english: bool = True
    common_words: frozenset[str] = COMMON_ENGLISH_WORDS
    offensive: bool = True  # core.safety.is_offensive, one batch per thread
    max_session_words: int | None = 200  # source + target, over the session's turns


@dataclass
class DatasetConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    include_title: bool = True
    min_turns: int = 2
    max_turns: int = 10  # DialoGPT extractor's max_depth: keep the last turns of longer paths
    windows: bool = False  # a longer path gives windows of at most max_turns, all of it used
    skip_dropped_turns: bool = False  # a dropped turn is skipped, not pruned with what answered it
    validation_fraction: float = 0.1
    seed: int = 0


# What chat needs, measured on chitchat-dataset (138,716 turns; README "Persona from conversations"):
# the Reddit filters keep 10.7% of its turns, for a chat turn that fails one ends its conversation.
PRESETS = {
    "reddit": DatasetConfig(),
    "chat": DatasetConfig(
        filters=FilterConfig(
            bots=False,  # bots' messages never reach the export's threads (and names are pseudonyms)
            max_turn_words=60,  # a turn is one person's consecutive messages: 12 words median, 35 at p90
            shouting_letters=None,  # capitals are emphasis in chat ("NICEEE", "who KNOWS")
            repeat_run=4,  # "no no no" and "yes yes yes" are how people talk
            min_turn_words=1,  # "yeah", "lol": one-word answers are chat
            english=False,  # the community's own language; and "lol ok" has no common English word
            max_session_words=None,  # `ttt train --max-length` bounds a session's tokens
        ),
        windows=True, skip_dropped_turns=True,
    ),
}


@dataclass
class Session:
    submission_id: str
    turns: list[dict[str, str]]  # {"author", "text"}, oldest first

    def to_json(self) -> dict:
        return {"turns": self.turns, "submission_id": self.submission_id}


@dataclass
class Report:
    """What each rule dropped and what was kept. Turns and sessions both add up:

    turns == sum(turns_dropped) + turns_under_dropped + turns_kept
    sessions == sessions_too_short + sessions_duplicate + train_sessions + validation_sessions
    """

    threads: int = 0
    subreddits: list[str] = field(default_factory=list)
    first_utc: float | None = None
    last_utc: float | None = None
    turns: int = 0  # candidate turns: comments, plus titles when included
    turns_dropped: Counter = field(default_factory=Counter)  # rule -> turns that failed it
    turns_under_dropped: int = 0  # comments pruned because a comment above them was
    turns_kept: int = 0
    paths_cut: Counter = field(default_factory=Counter)  # rule -> raw root-to-leaf paths it cut short
    sessions: int = 0  # candidate sessions: leaves of the pruned trees
    sessions_too_short: int = 0  # fewer than min_turns turns
    sessions_duplicate: int = 0  # same turn texts as an earlier session
    train_sessions: int = 0
    validation_sessions: int = 0
    train_threads: int = 0
    validation_threads: int = 0
    config: dict = field(default_factory=dict)
    imported: dict | None = None  # an import's record (source, consent, counts); None for a scrape

    def to_dict(self) -> dict:
        data = asdict(self)
        data["turns_dropped"] = {r: self.turns_dropped[r] for r in RULES if self.turns_dropped[r]}
        data["paths_cut"] = {r: self.paths_cut[r] for r in RULES if self.paths_cut[r]}
        return data

    def table(self) -> str:
        rows = [("threads", self.threads), ("candidate turns", self.turns)]
        rows += [(f"  dropped: {r}", self.turns_dropped[r]) for r in RULES if self.turns_dropped[r]]
        rows += [("  pruned under a dropped comment", self.turns_under_dropped), ("  kept", self.turns_kept)]
        rows += [(f"paths cut short by {r}", self.paths_cut[r]) for r in RULES if self.paths_cut[r]]
        rows += [
            ("candidate sessions", self.sessions),
            ("  dropped: fewer turns than min_turns", self.sessions_too_short),
            ("  dropped: exact duplicates", self.sessions_duplicate),
            (f"  train ({self.train_threads} threads)", self.train_sessions),
            (f"  validation ({self.validation_threads} threads)", self.validation_sessions),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {count:>8}" for name, count in rows)


@dataclass
class _Node:
    author: str
    raw: str  # as written (line starts matter for quotes)
    text: str  # unescaped, whitespace collapsed: what a session holds
    children: list[_Node] = field(default_factory=list)
    rule: str | None = None

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def leaves(self) -> int:
        return sum(c.leaves() for c in self.children) or 1


def threads_to_sessions(
    thread: dict,
    filters: FilterConfig | None = None,
    *,
    include_title: bool = True,
    min_turns: int = 2,
    max_turns: int = 10,
    windows: bool = False,
    skip_dropped_turns: bool = False,
    report: Report | None = None,
) -> list[Session]:
    """The filtered sessions of one raw thread (as ``training.scrape`` and ``training.imports`` write it).

    A title that fails a rule is left out and the sessions start at the top-level comments; a thread
    without a title (an imported conversation) starts there too. Counts go to ``report`` when given.
    """
    filters = filters or FilterConfig()
    report = report if report is not None else Report()
    comments = [_node(c) for c in thread.get("comments", [])]
    title = _title_node(thread) if include_title and (thread.get("title") or thread.get("selftext")) else None
    candidates = ([title] if title else []) + [n for c in comments for n in c.walk()]
    report.turns += len(candidates)
    for node in candidates:
        node.rule = _turn_rule(node, filters)
    if filters.offensive:
        # Chat filters keep what answered a dropped turn, so every passing turn is screened there.
        reachable = ([n for n in candidates if n.rule is None] if skip_dropped_turns
                     else ([title] if title and title.rule is None else []) + _unpruned(comments))
        for node, bad in zip(reachable, is_offensive([n.text for n in reachable]) if reachable else []):
            if bad:
                node.rule = "offensive"
    if title and title.rule:
        report.turns_dropped[title.rule] += 1
    path = [title] if title and title.rule is None else []

    sessions: list[list[_Node]] = []

    def visit(node: _Node, path: list[_Node]) -> bool:
        window = (path + [node])[-max_turns:]
        if node.rule is None and filters.max_session_words is not None:
            if sum(len(n.text.split()) for n in window) > filters.max_session_words:
                node.rule = "session_too_long"
        if node.rule:
            report.turns_dropped[node.rule] += 1
            if skip_dropped_turns:  # what answered it starts afresh, with it out of sight
                for child in node.children:
                    visit(child, [])
            else:
                report.turns_under_dropped += sum(1 for _ in node.walk()) - 1
                report.paths_cut[node.rule] += node.leaves()
            return False
        report.turns_kept += 1
        kept = [visit(child, path + [node]) for child in node.children]
        if not any(kept):
            sessions.extend(_windows(path + [node], max_turns) if windows else [window])
        return True

    kept_roots = [visit(c, path) for c in comments]
    if path and not any(kept_roots):
        sessions.append(path)  # a title with no surviving comment: a one-turn candidate
    if path:
        report.turns_kept += 1
    result = []
    for turns in sessions:
        report.sessions += 1
        if len(turns) < min_turns:
            report.sessions_too_short += 1
            continue
        result.append(Session(thread["id"], [{"author": n.author, "text": n.text} for n in turns]))
    return result


def _windows(path: list[_Node], size: int) -> list[list[_Node]]:
    """The path cut into as few windows of at most `size` turns as it takes, of about equal length."""
    count = -(-len(path) // size)
    bounds = [round(i * len(path) / count) for i in range(count + 1)]
    return [path[a:b] for a, b in zip(bounds, bounds[1:])]


def build_dataset(raw_jsonl: Path, out_dir: Path, cfg: DatasetConfig | None = None, progress: bool = False) -> Report:
    """Filter, dedupe and split raw threads into ``out_dir``: train.jsonl, validation.jsonl (each
    only when it has sessions), report.json and a README.md dataset card (with the consent and
    counts of an import).

    The split is by thread, so no thread is in both; it is deterministic in ``seed``.
    """
    cfg = cfg or DatasetConfig()
    out_dir = Path(out_dir)
    imported = read_record(Path(raw_jsonl))
    report = Report(config=_config_dict(cfg), imported=imported)
    subreddits: set[str] = set()
    times: list[float] = []
    by_thread: dict[str, list[Session]] = {}
    seen: set[tuple[str, ...]] = set()
    with Path(raw_jsonl).open(encoding="utf-8") as f, \
            tqdm(f, desc="filtering", unit="thread", disable=not progress, leave=False) as lines:
        for line in lines:
            if not line.strip():
                continue
            thread = json.loads(line)
            report.threads += 1
            subreddits.add(thread.get("subreddit", ""))
            times += _times(thread)
            for session in threads_to_sessions(
                thread, cfg.filters, include_title=cfg.include_title, min_turns=cfg.min_turns,
                max_turns=cfg.max_turns, windows=cfg.windows, skip_dropped_turns=cfg.skip_dropped_turns, report=report,
            ):
                key = tuple(t["text"] for t in session.turns)
                if key in seen:
                    report.sessions_duplicate += 1
                    continue
                seen.add(key)
                by_thread.setdefault(session.submission_id, []).append(session)
    report.subreddits = sorted(s for s in subreddits if s) if imported is None else []
    report.first_utc, report.last_utc = (min(times), max(times)) if times else (None, None)

    validation = _validation_threads(sorted(by_thread), cfg.validation_fraction, cfg.seed)
    splits: dict[str, list[Session]] = {"train": [], "validation": []}
    for thread_id, sessions in by_thread.items():
        splits["validation" if thread_id in validation else "train"] += sessions
    report.train_sessions, report.validation_sessions = len(splits["train"]), len(splits["validation"])
    report.train_threads, report.validation_threads = len(by_thread) - len(validation), len(validation)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, sessions in splits.items():
        path = out_dir / f"{name}.jsonl"
        path.unlink(missing_ok=True)  # an empty split gets no file: datasets refuses empty ones
        if sessions:
            with path.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in sessions)
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(dataset_card(report.to_dict(), report.table()), encoding="utf-8")
    return report


def _node(comment: dict) -> _Node:
    raw = comment.get("body") or ""
    node = _Node(comment.get("author") or "[deleted]", raw, _clean(raw))
    node.children = [_node(reply) for reply in comment.get("replies", [])]
    return node


def _title_node(thread: dict) -> _Node:
    raw = thread.get("title", "")
    selftext = (thread.get("selftext") or "").strip()
    if selftext and selftext not in DELETED_MARKERS:
        raw += "\n\n" + selftext
    return _Node(thread.get("author") or "[deleted]", raw, _clean(raw))


def _clean(raw: str) -> str:
    return " ".join(html.unescape(raw).split())


def _unpruned(comments: list[_Node]) -> list[_Node]:
    """Comments that passed every per-turn rule, as did every comment above them."""
    result = []
    for node in comments:
        if node.rule is None:
            result.append(node)
            result += _unpruned(node.children)
    return result


def _turn_rule(node: _Node, f: FilterConfig) -> str | None:
    """The first per-turn rule that ``node`` fails, or None."""
    text = node.text
    words = text.split()
    if f.deleted and node.raw.strip() in DELETED_MARKERS:
        return "deleted"
    if f.bots and node.author.lower() in {name.lower() for name in f.bot_authors}:
        return "bot"
    if f.urls and _URL.search(text):
        return "url"
    if f.markup and ("[" in text or "]" in text or _QUOTE_LINE.search(html.unescape(node.raw))):
        return "markup"
    if f.max_turn_words is not None and len(words) > f.max_turn_words:
        return "turn_too_long"
    if f.max_word_chars is not None and any(len(w) > f.max_word_chars for w in words):
        return "long_word"
    if f.shouting_letters is not None and re.search(f"[A-Z]{{{f.shouting_letters},}}", text):
        return "shouting"
    if f.repeat_run is not None and _has_run(re.findall(r"\w+", text.lower()), f.repeat_run):
        return "repetition"
    if f.min_turn_words is not None and len(words) < f.min_turn_words:
        return "too_short"
    if f.english and not any(w in f.common_words for w in re.findall(r"[a-z]+", text.lower())):
        return "non_english"
    return None


def _has_run(tokens: list[str], run: int) -> bool:
    return any(len(set(tokens[i:i + run])) == 1 for i in range(len(tokens) - run + 1))


def _times(thread: dict) -> list[float]:
    times = [thread["created_utc"]] if thread.get("created_utc") else []
    stack = list(thread.get("comments", []))
    while stack:
        comment = stack.pop()
        if comment.get("created_utc"):
            times.append(comment["created_utc"])
        stack += comment.get("replies", [])
    return times


def _validation_threads(thread_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded, order-independent choice of about ``fraction`` of the threads (at least one,
    never all, when there are two or more)."""
    n = len(thread_ids)
    if fraction <= 0 or n < 2:
        return set()
    count = min(n - 1, max(1, round(fraction * n)))
    ranked = sorted(thread_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:count])


def _config_dict(cfg: DatasetConfig) -> dict:
    data = asdict(cfg)
    data["filters"]["common_words"] = sorted(cfg.filters.common_words)
    data["filters"]["bot_authors"] = list(cfg.filters.bot_authors)
    return data
