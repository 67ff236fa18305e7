"""training.dataset: DialoGPT-style filters on crafted threads, sessions, dedupe, split, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from training.dataset import PRESETS, DatasetConfig, FilterConfig, Report, build_dataset, threads_to_sessions

TITLE = "What do you think about the new park"
GOOD = "I think it is a good place for the kids"


def comment(body: str, author: str = "someone", replies: list[dict] = ()) -> dict:
    return {"id": body[:8], "author": author, "body": body, "score": 1, "created_utc": 1_700_000_000.0,
            "replies": list(replies)}


def thread(comments: list[dict], id: str = "t1", title: str = TITLE, selftext: str = "") -> dict:
    return {"id": id, "title": title, "selftext": selftext, "author": "op", "created_utc": 1_690_000_000.0,
            "score": 5, "permalink": f"/r/parks/comments/{id}/", "subreddit": "parks", "comments": comments}


def texts(sessions) -> list[list[str]]:
    return [[turn["text"] for turn in s.turns] for s in sessions]


# (rule, body, author, the FilterConfig change that switches the rule off)
FAILING = [
    ("deleted", "[removed]", "someone", {"deleted": False}),
    ("deleted", "[deleted]", "someone", {"deleted": False}),
    ("bot", "I am a bot and this is my post", "AutoModerator", {"bots": False}),
    ("url", "see https://example.com/park for the map", "someone", {"urls": False}),
    ("url", "the map is on www.example.org if you want it", "someone", {"urls": False}),
    ("url", "the map is on parks.example.com for you", "someone", {"urls": False}),
    ("markup", "the [map] is on the wall", "someone", {"markup": False}),
    ("markup", "> the park is new\nand I like it", "someone", {"markup": False}),
    ("markup", "&gt; the park is new\nand I like it", "someone", {"markup": False}),
    ("turn_too_long", "I think " + " ".join(f"w{i}" for i in range(29)), "someone", {"max_turn_words": None}),
    ("long_word", "I think " + "a" * 31, "someone", {"max_word_chars": None}),
    ("shouting", "I think WHATEVER they say", "someone", {"shouting_letters": None}),
    ("repetition", "I say no no no to that", "someone", {"repeat_run": None}),
    ("too_short", "Agreed.", "someone", {"min_turn_words": None}),
    ("non_english", "Das ist sehr gut heute", "someone", {"english": False}),
    ("offensive", "you are a stupid idiot and I hate you", "someone", {"offensive": False}),
]

PASSING = [
    "it was deleted by the mods",  # mentions deletion
    "the map is on the park website",  # no URL
    "I think 3 > 2 in this case",  # ">" not at a line start
    "I think " + " ".join(f"w{i}" for i in range(28)),  # exactly 30 words
    "I think " + "a" * 30,  # a 30-character word
    "I think NASA built it",  # four capitals
    "I say no no to that",  # a word twice
    "yes indeed",  # two words
    "Das ist the answer",  # one common English word
    "you are a kind person and I like you",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("rule", "body", "author", "switch_off"), FAILING)
def test_each_rule_prunes_the_failing_comment_and_can_be_switched_off(rule, body, author, switch_off):
    raw = thread([comment(GOOD, replies=[comment(body, author=author)])])
    report = Report()
    assert texts(threads_to_sessions(raw, report=report)) == [[TITLE, GOOD]]
    assert report.turns_dropped == {rule: 1}

    report = Report()
    threads_to_sessions(raw, FilterConfig(**switch_off), report=report)
    assert report.turns_dropped[rule] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", PASSING)
def test_near_misses_pass_every_rule(body):
    report = Report()
    sessions = threads_to_sessions(thread([comment(GOOD, replies=[comment(body)])]), report=report)
    assert texts(sessions) == [[TITLE, GOOD, body]]
    assert sum(report.turns_dropped.values()) == 0


@pytest.mark.timeout(30)
def test_configured_bot_names_match_case_insensitively():
    raw = thread([comment(GOOD, replies=[comment("I will remind you of this", author="remindmebot")])])
    assert texts(threads_to_sessions(raw)) == [[TITLE, GOOD, "I will remind you of this"]]
    filters = FilterConfig(bot_authors=("AutoModerator", "RemindMeBot"))
    assert texts(threads_to_sessions(raw, filters)) == [[TITLE, GOOD]]


@pytest.mark.timeout(30)
def test_session_word_budget_cuts_the_turn_that_exceeds_it():
    reply = "and I think the same thing about it"  # 8 words
    raw = thread([comment(GOOD, replies=[comment(reply)])])  # 8 + 10 + 8 words
    report = Report()
    assert texts(threads_to_sessions(raw, FilterConfig(max_session_words=25), report=report)) == [[TITLE, GOOD]]
    assert report.turns_dropped == {"session_too_long": 1}
    assert texts(threads_to_sessions(raw, FilterConfig(max_session_words=26))) == [[TITLE, GOOD, reply]]


@pytest.mark.timeout(30)
def test_chat_filters_screen_what_answered_a_dropped_turn_too():
    """The chat preset keeps the replies to a dropped turn (they start afresh): an offensive one among
    them is dropped as offensive like any other turn."""
    chat = PRESETS["chat"]
    raw = thread([comment("see https://example.com for the park map", replies=[
        comment("you are a stupid idiot and I hate you", replies=[comment("the swings are new this year")]),
    ])], title="")
    report = Report()
    sessions = threads_to_sessions(raw, chat.filters, include_title=False, windows=True,
                                   skip_dropped_turns=True, report=report)
    assert report.turns_dropped == {"url": 1, "offensive": 1}
    assert all("idiot" not in text for s in texts(sessions) for text in s)


@pytest.mark.timeout(30)
def test_a_pruned_comment_keeps_its_siblings_paths_and_its_parents_path():
    raw = thread([
        comment("the first answer is here", replies=[
            comment("see https://example.com now", replies=[comment("that link is not good")]),
            comment("the second reply is fine", replies=[comment("and so is this one")]),
        ]),
        comment("a lonely answer is here", replies=[comment("I am a bot reply", author="AutoModerator")]),
        comment("[deleted]", replies=[comment("a reply to a deleted one")]),
        comment("the last answer is here"),
    ])
    report = Report()
    sessions = threads_to_sessions(raw, report=report)
    assert texts(sessions) == [
        [TITLE, "the first answer is here", "the second reply is fine", "and so is this one"],
        [TITLE, "a lonely answer is here"],  # its only reply was pruned: the path ends at the parent
        [TITLE, "the last answer is here"],
    ]
    assert all(s.submission_id == "t1" for s in sessions)
    assert sessions[1].turns[1] == {"author": "someone", "text": "a lonely answer is here"}
    assert report.turns_dropped == {"url": 1, "bot": 1, "deleted": 1}
    assert report.turns_under_dropped == 2 and report.paths_cut == {"url": 1, "bot": 1, "deleted": 1}
    assert report.turns == 1 + 10 == sum(report.turns_dropped.values()) + report.turns_under_dropped + report.turns_kept


@pytest.mark.timeout(30)
def test_title_turn_optional_and_left_out_when_it_fails_a_rule():
    raw = thread([comment(GOOD, replies=[comment("and I agree with you")])],
                 selftext="We got a new park in town and")
    assert texts(threads_to_sessions(raw)) == [[TITLE + " We got a new park in town and", GOOD, "and I agree with you"]]
    assert texts(threads_to_sessions(raw, include_title=False)) == [[GOOD, "and I agree with you"]]

    linked = thread([comment(GOOD, replies=[comment("and I agree with you")])], title="PICTURE of the park")
    report = Report()
    assert texts(threads_to_sessions(linked, report=report)) == [[GOOD, "and I agree with you"]]
    assert report.turns_dropped == {"shouting": 1}


@pytest.mark.timeout(30)
def test_min_and_max_turns():
    chain = comment("reply number 11 is the last")
    for i in range(10, 0, -1):
        chain = comment(f"reply number {i} is here", replies=[chain])
    sessions = threads_to_sessions(thread([chain]), max_turns=4)
    assert texts(sessions) == [[f"reply number {i} is here" for i in (8, 9, 10)] + ["reply number 11 is the last"]]

    report = Report()
    assert threads_to_sessions(thread([comment(GOOD)]), include_title=False, report=report) == []
    assert report.sessions == report.sessions_too_short == 1
    assert texts(threads_to_sessions(thread([comment(GOOD)]), include_title=False, min_turns=1)) == [[GOOD]]


def write_raw(path: Path, threads: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in threads), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def many_threads(n: int) -> list[dict]:
    threads = []
    for i in range(n):
        threads.append(thread([
            comment(f"answer {i} is the one", replies=[comment(f"and I agree with answer {i}"),
                                                      comment("see http://x.com", replies=[comment("gone with it")])]),
            comment(f"another answer {i} for you"),
            comment("Yes."),
        ], id=f"s{i}", title=f"Question {i} for the people"))
    return threads


@pytest.mark.timeout(60)
def test_build_dataset_dedupes_splits_by_thread_and_reports_consistent_counts(tmp_path):
    threads = many_threads(20)
    same = [comment("I think it is the same", replies=[comment("and I say it is the same")])]
    threads += [thread(same, id="d1", title="A question"), thread(same, id="d2", title="A question")]
    raw = write_raw(tmp_path / "raw.jsonl", threads)
    cfg = DatasetConfig(validation_fraction=0.25, seed=7)
    report = build_dataset(raw, tmp_path / "out", cfg)

    train, validation = read(tmp_path / "out" / "train.jsonl"), read(tmp_path / "out" / "validation.jsonl")
    train_ids = {s["submission_id"] for s in train}
    validation_ids = {s["submission_id"] for s in validation}
    assert not train_ids & validation_ids
    assert len(train_ids | validation_ids) == 21  # d2 only repeated d1
    assert report.validation_threads == len(validation_ids) == round(0.25 * 21)
    assert report.sessions_duplicate == 1
    keys = [tuple(t["text"] for t in s["turns"]) for s in train + validation]
    assert len(keys) == len(set(keys))
    assert all(set(s) == {"turns", "submission_id"} and all(set(t) == {"author", "text"} for t in s["turns"])
               for s in train + validation)

    assert report.turns == sum(report.turns_dropped.values()) + report.turns_under_dropped + report.turns_kept
    assert report.sessions == (report.sessions_too_short + report.sessions_duplicate
                               + report.train_sessions + report.validation_sessions)
    assert (report.train_sessions, report.validation_sessions) == (len(train), len(validation))
    assert report.turns_dropped == {"url": 20, "too_short": 20} and report.turns_under_dropped == 20
    assert report.threads == 22 and report.subreddits == ["parks"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["turns_dropped"] == {"url": 20, "too_short": 20} and saved["train_sessions"] == len(train)
    assert saved["config"]["filters"]["max_turn_words"] == 30

    card = (tmp_path / "out" / "README.md").read_text()
    assert "r/parks" in card and "2023-07-22" in card and "2023-11-14" in card
    assert "max_turn_words" in card and f"{len(train)}" in card
    assert "pruned with its replies" in card
    build_dataset(raw, tmp_path / "chat", replace(cfg, skip_dropped_turns=True))
    assert "the turn after it starts a new session" in (tmp_path / "chat" / "README.md").read_text()

    again = build_dataset(raw, tmp_path / "again", cfg)
    assert read(tmp_path / "again" / "validation.jsonl") == validation and again.to_dict() == report.to_dict()
    build_dataset(raw, tmp_path / "other", replace(cfg, seed=8))
    assert {s["submission_id"] for s in read(tmp_path / "other" / "validation.jsonl")} != validation_ids


@pytest.mark.timeout(120)
def test_output_loads_with_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    raw = write_raw(tmp_path / "raw.jsonl", many_threads(10))
    out = tmp_path / "out"
    report = build_dataset(raw, out)
    files = {"train": str(out / "train.jsonl"), "validation": str(out / "validation.jsonl")}
    loaded = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].num_rows == report.train_sessions
    assert loaded["validation"].num_rows == report.validation_sessions == 2
    assert loaded["train"][0]["turns"][0]["author"] == "op"
    by_card = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))  # README's data_files
    assert by_card["validation"].num_rows == 2


@pytest.mark.timeout(60)
def test_no_validation_file_when_the_split_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    raw = write_raw(tmp_path / "raw.jsonl", many_threads(3))
    report = build_dataset(raw, tmp_path / "out", DatasetConfig(validation_fraction=0))
    assert report.validation_sessions == 0 and not (tmp_path / "out" / "validation.jsonl").exists()
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["train"] and loaded["train"].num_rows == report.train_sessions
