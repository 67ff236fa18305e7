"""`ttt import discord|slack|jsonl`: crafted exports become threads as `ttt scrape` writes them
(replies make the tree, silences cut a channel's history, one person's consecutive messages are one
turn), bots and system messages dropped, people pseudonymised or left out; bad input is one line
and writes nothing."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from exports import DiscordExport, SlackExport, discord_user, write_jsonl
from test_training_cli import ttt
from ttt.cli import main

CONSENT = "Everyone in #general agreed in March 2024 that the bot may learn from the channel"
ALICE = discord_user("111111111111111111", "alice_w", "Alice")
BOB = discord_user("222222222222222222", "bobby", "Bob")
CAROL = discord_user("333333333333333333", "carol.k", "Carol")
HELPER = discord_user("999999999999999999", "HelperBot", bot=True)
DISCORD_SECRETS = [u[k] for u in (ALICE, BOB, CAROL, HELPER) for k in ("id", "name", "nickname")]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("{}\n")
    return tmp_path


def study_group() -> DiscordExport:
    export = DiscordExport()
    first = export.say(ALICE, "hi everyone, who is around tonight", 0)
    export.say(ALICE, "I need help with the chemistry homework", 0.5)
    export.say(HELPER, "Welcome to the server!", 1)
    export.say(CAROL, "", 1.2, kind="GuildMemberJoin")
    answer = export.say(BOB, "@alice_w I can help, which problem?", 2, reply_to=first, mentions=[ALICE])
    export.say(ALICE, "number four, the one about gases", 3)
    export.say(CAROL, "ask @Bob, he aced it", 4, mentions=[BOB])
    export.say(CAROL, "good morning study group", 124)  # two hours later: another conversation
    export.say(BOB, "morning <@333333333333333333>", 125)
    export.say(CAROL, "did you two solve number four?", 126, reply_to=answer)  # a late reply to the first
    return export


def trees(raw: Path) -> list[tuple]:
    """Each thread as nested (author, text, [replies]), checking that it has the shape `ttt scrape` writes."""
    def node(comment: dict) -> tuple:
        assert set(comment) == {"id", "author", "body", "score", "created_utc", "replies"}
        return comment["author"], comment["body"], [node(r) for r in comment["replies"]]

    threads = [json.loads(line) for line in raw.read_text().splitlines()]
    for thread in threads:
        assert set(thread) == {"id", "title", "selftext", "author", "created_utc", "score", "permalink",
                               "subreddit", "comments"} and thread["title"] == ""
    return [node(c) for t in threads for c in t["comments"]]


def all_text(*folders: Path) -> str:
    return "\n".join(p.read_text() for folder in folders for p in folder.rglob("*") if p.is_file())


@pytest.mark.timeout(60)
def test_a_discord_channel_becomes_trees_of_pseudonymous_turns(workdir):
    export = study_group().write(workdir / "Study Group - general [880000000000000001].json")
    code, out, err = ttt(workdir / "config.yaml", "import", "discord", str(export), "--consent", CONSENT)
    assert code == 0, err
    raw = workdir / "data/training/raw/general.jsonl"
    assert trees(raw) == [
        ("user1", "hi everyone, who is around tonight\nI need help with the chemistry homework", [
            ("user2", "@user1 I can help, which problem?", [
                ("user1", "number four, the one about gases", [("user3", "ask @user2, he aced it", [])]),
                ("user3", "did you two solve number four?", []),
            ]),
        ]),
        ("user3", "good morning study group", [("user2", "morning @user3", [])]),
    ]
    record = json.loads((workdir / "data/training/raw/general.import.json").read_text())
    assert record["consent"] == CONSENT and record["source"] == "discord"
    assert record["counts"] == {"files": 1, "channels": 1, "messages": 10, "bot_messages": 1, "system_messages": 1,
                                "empty_messages": 0, "excluded_messages": 0, "excluded_people": 0,
                                "conversations": 2, "turns": 7, "people": 3}
    assert "7 turns by 3 people in 2 conversations" in out and "next: ttt build-data --name general" in out

    code, out, err = ttt(workdir / "config.yaml", "build-data")
    assert code == 0, err
    assert out.startswith("chat filters on ") and "train (" in out
    card = (workdir / "data/training/general/README.md").read_text()
    assert CONSENT in card and "terms restrict training on people's messages without their consent" in card
    report = json.loads((workdir / "data/training/general/report.json").read_text())
    assert report["imported"]["counts"]["turns"] == 7 and report["subreddits"] == []
    written = all_text(workdir / "data")
    leaked = [s for s in DISCORD_SECRETS + ["880000000000000001"] if s.lower() in written.lower()]
    assert not leaked


@pytest.mark.timeout(60)
def test_people_left_out_are_spliced_out_and_an_unknown_name_is_refused(workdir):
    export = study_group().write(workdir / "general.json")
    code, _, err = ttt(workdir / "config.yaml", "import", "discord", str(export), "--consent", CONSENT,
                       "--exclude-users", "BOB")
    assert code == 0, err
    raw = workdir / "data/training/raw/general.jsonl"
    # Bob's answer is gone: Alice's next message joins her turn, and the late reply to Bob answers what he answered.
    assert trees(raw) == [
        ("user1", "hi everyone, who is around tonight\nI need help with the chemistry homework\n"
                  "number four, the one about gases", [
            ("user2", "ask @user3, he aced it", []),
            ("user2", "did you two solve number four?", []),
        ]),
        ("user2", "good morning study group", []),
    ]
    counts = json.loads((workdir / "data/training/raw/general.import.json").read_text())["counts"]
    assert (counts["excluded_messages"], counts["excluded_people"], counts["people"]) == (2, 1, 2)

    before = raw.read_bytes()
    code, _, err = ttt(workdir / "config.yaml", "import", "discord", str(export), "--consent", CONSENT,
                       "--exclude-users", "bobby", "robert")
    assert code == 2 and "--exclude-users: nobody in general.json has the id or name 'robert'" in err
    assert raw.read_bytes() == before


def workspace() -> SlackExport:
    slack = SlackExport()
    ann, ben, cat = slack.user("U01ANN", "ann", "Ann Smith"), slack.user("U02BEN", "ben", "Ben Jones"), \
        slack.user("U03CAT", "cat", "Cat Brown")
    root = slack.say("general", ann, "has anyone started the reading?", 0)
    slack.say("general", ben, "yes <@U01ANN>, chapter two is long &amp; dense", 1, thread_of=root)
    slack.say("general", cat, "I am halfway, see <https://example.com/notes|my notes>", 2, thread_of=root)
    slack.say("general", ben, "same here", 3, thread_of=root)
    slack.say("general", cat, "<@U03CAT> has joined the channel", 4, subtype="channel_join")
    slack.say("general", "", "Reminder: reading due Friday", 5, subtype="bot_message", bot=True)
    slack.say("general", ann, "also, lunch at noon?", 6)
    slack.say("general", cat, "new day, new questions", 200)
    slack.say("random", ben, "anyone seen my umbrella", 10)
    slack.say("random", ann, "it is by the door, <@U02BEN|ben>", 11)
    return slack


@pytest.mark.timeout(60)
def test_a_slack_export_folder_or_zip_gives_threads_by_thread_ts(workdir):
    slack = workspace()
    expected = [
        ("user1", "has anyone started the reading?", [
            ("user2", "yes @user1, chapter two is long & dense", [
                ("user3", "I am halfway, see https://example.com/notes", [("user2", "same here", [])])]),
            ("user1", "also, lunch at noon?", []),
        ]),
        ("user3", "new day, new questions", []),
        ("user2", "anyone seen my umbrella", [("user1", "it is by the door, @user2", [])]),
    ]
    folder = slack.write_folder(workdir / "Study Slack export Mar 1 2024")
    code, out, err = ttt(workdir / "config.yaml", "import", "slack", str(folder), "--consent", CONSENT)
    assert code == 0, err
    raw = workdir / "data/training/raw/study-slack-export-mar-1-2024.jsonl"
    assert trees(raw) == expected
    counts = json.loads(raw.with_name(raw.name.replace(".jsonl", ".import.json")).read_text())["counts"]
    assert (counts["channels"], counts["bot_messages"], counts["system_messages"]) == (2, 1, 1)

    archive = slack.write_zip(workdir / "export.zip")
    code, _, err = ttt(workdir / "config.yaml", "import", "slack", str(archive), "--consent", CONSENT,
                       "--name", "study")
    assert code == 0, err
    assert trees(workdir / "data/training/raw/study.jsonl") == expected
    leaked = [s for s in ("U01ANN", "U02BEN", "U03CAT", "Ann Smith", "Ben Jones", "Cat Brown")
              if s in all_text(workdir / "data")]
    assert not leaked


@pytest.mark.timeout(60)
def test_jsonl_lines_are_conversations_with_iso_or_epoch_times(workdir):
    path = write_jsonl(workdir / "chats.jsonl", [
        [("ann", "hi"), ("ann", "how are you?"), ("ben", "good, you? @ann"), ("ann", "fine thanks")],
        [("ben", "what did you eat"), ("cat", "pasta")],
    ])
    with path.open("a") as f:
        f.write(json.dumps({"id": "epoch", "turns": [{"author": "cat", "text": "ok", "time": 1709316000},
                                                     {"author": "ann", "text": "bye", "time": "1709316060.5"},
                                                     {"author": "ben", "text": "see you"}]}) + "\n")
    code, out, err = ttt(workdir / "config.yaml", "import", "jsonl", str(path), "--consent", CONSENT)
    assert code == 0, err
    assert trees(workdir / "data/training/raw/chats.jsonl") == [
        ("user1", "hi\nhow are you?", [("user2", "good, you? @user1", [("user1", "fine thanks", [])])]),
        ("user2", "what did you eat", [("user3", "pasta", [])]),
        ("user3", "ok", [("user1", "bye", [("user2", "see you", [])])]),
    ]
    assert "in 3 conversation(s)" in out


def only_bots(tmp: Path) -> list[Path]:
    export = DiscordExport()
    export.say(HELPER, "Welcome!", 0)
    export.say(CAROL, "", 1, kind="GuildMemberJoin")
    return [export.write(tmp / "bots.json")]


def cut_short(tmp: Path) -> list[Path]:
    text = json.dumps(study_group().document(), indent=2)
    (tmp / "partial.json").write_text(text[: len(text) * 2 // 3])
    return [tmp / "partial.json"]


def broken_zip(tmp: Path) -> list[Path]:
    data = workspace().write_zip(tmp / "full.zip").read_bytes()
    (tmp / "slack.zip").write_bytes(data[: len(data) // 2])
    return [tmp / "slack.zip"]


def jsonl_cut_short(tmp: Path) -> list[Path]:
    path = write_jsonl(tmp / "chats.jsonl", [[("ann", "hi"), ("ben", "hello")]] * 2)
    path.write_text(path.read_text()[:-20])
    return [path]


def write(name: str, text: str):
    def make(tmp: Path) -> list[Path]:
        (tmp / name).write_text(text)
        return [tmp / name]
    return make


def empty_channel(tmp: Path) -> list[Path]:
    return [DiscordExport().write(tmp / "empty.json")]


def discord_export(tmp: Path) -> list[Path]:
    return [study_group().write(tmp / "general.json")]


def slack_day_file(tmp: Path) -> list[Path]:
    return [write("2024-03-01.json", workspace().files()["general/2024-03-01.json"])(tmp)[0]]


def folder_without_users(tmp: Path) -> list[Path]:
    folder = workspace().write_folder(tmp / "export")
    (folder / "users.json").unlink()
    return [folder]


BAD_INPUTS = [
    ("discord", write("notes.txt", "hello there"), r"notes.txt: not JSON .*expected a DiscordChatExporter JSON"),
    ("discord", cut_short, r"partial.json: the JSON stops before its end \(a half-written or cut file\?\)"),
    ("discord", empty_channel, r"empty.json: the channel has no messages"),
    ("discord", slack_day_file, r"2024-03-01.json: not a DiscordChatExporter export"),
    ("discord", lambda tmp: [write_jsonl(tmp / "c.jsonl", [[("a", "b")], [("c", "d")]])],
     r"c.jsonl: more than one JSON document \(JSON Lines\?\)"),
    ("discord", only_bots, r"bots.json: no message written by a person \(1 by bots, 1 system"),
    ("slack", folder_without_users, r"export: no users.json and channels.json; expected a Slack workspace export"),
    ("slack", broken_zip, r"slack.zip: neither a folder nor a readable .zip \(a half-written download\?\)"),
    ("slack", lambda tmp: [tmp / "nowhere.zip"], r"nowhere.zip does not exist"),
    ("jsonl", jsonl_cut_short, r"chats.jsonl: line 2: the JSON stops before its end"),
    ("jsonl", discord_export, r"general.json: one JSON dict, not one conversation per line"),
    ("jsonl", write("t.jsonl", '{"id": "1", "turns": [{"text": "hi"}]}\n'),
     r"t.jsonl: line 1: turn 1: expected an object with author and text"),
    ("jsonl", write("t.jsonl", '{"id": "1", "turns": [{"author": "a", "text": "hi", "time": "yesterday"}]}\n'),
     r"t.jsonl: line 1: turn 1: time 'yesterday' is neither ISO 8601 nor seconds since the epoch"),
    ("jsonl", write("t.jsonl", "\n\n"), r"t.jsonl: the file is empty"),
]


@pytest.mark.parametrize("source,make,message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
@pytest.mark.timeout(60)
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(workdir, source, make, message):
    inputs = workdir / "inputs"
    inputs.mkdir()
    paths = make(inputs)
    code, out, err = ttt(workdir / "config.yaml", "import", source, *map(str, paths), "--consent", CONSENT,
                         "--name", "bad")
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ttt import: error: "), err
    assert re.search(message, errors[0]), errors[0]
    assert not (workdir / "data").exists()


@pytest.mark.timeout(60)
def test_consent_is_required_and_scraped_threads_are_not_overwritten(workdir):
    export = study_group().write(workdir / "general.json")
    code, _, err = ttt(workdir / "config.yaml", "import", "discord", str(export), "--consent", "  ")
    assert code == 2 and "--consent is empty: say whose conversations these are and that they agreed" in err
    with pytest.raises(SystemExit):  # argparse: the option is required
        ttt(workdir / "config.yaml", "import", "discord", str(export))
    scraped = workdir / "data/training/raw/general.jsonl"
    scraped.parent.mkdir(parents=True)
    scraped.write_text('{"id": "abc", "title": "a thread", "comments": []}\n')
    code, _, err = ttt(workdir / "config.yaml", "import", "discord", str(export), "--consent", CONSENT)
    assert code == 2 and "holds scraped threads, not an import: choose another --name" in err
    assert scraped.read_text().startswith('{"id": "abc"') and len(list(scraped.parent.iterdir())) == 1


@pytest.mark.timeout(60)
def test_a_long_conversation_goes_on_as_a_new_thread_beyond_a_hundred_turns(workdir):
    path = write_jsonl(workdir / "long.jsonl", [[(("ann", "ben")[i % 2], f"message {i}") for i in range(250)]])
    code, out, err = ttt(workdir / "config.yaml", "import", "jsonl", str(path), "--consent", CONSENT)
    assert code == 0, err

    def depth(tree: tuple) -> int:
        return 1 + max((depth(r) for r in tree[2]), default=0)

    assert [depth(t) for t in trees(workdir / "data/training/raw/long.jsonl")] == [100, 100, 50]
    code, out, err = ttt(workdir / "config.yaml", "build-data", "--validation-fraction", "0")
    assert code == 0, err
    sessions = [json.loads(line) for line in (workdir / "data/training/long/train.jsonl").read_text().splitlines()]
    assert [len(s["turns"]) for s in sessions] == [10] * 25  # windows: every turn is in a session


@pytest.mark.timeout(60)
def test_a_name_is_asked_for_when_the_export_offers_none(workdir):
    path = write_jsonl(workdir / "---.jsonl", [[("ann", "hi"), ("ben", "hello")]])
    code, _, err = ttt(workdir / "config.yaml", "import", "jsonl", str(path), "--consent", CONSENT)
    assert code == 2 and "ttt import: error: name '' must be letters, digits, '-' or '_': pass --name" in err
    assert not (workdir / "data").exists()


def test_readme_documents_the_import_commands_the_terms_and_the_bench_line():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    training = readme[readme.index("## Training a persona"):readme.index("## How it works")]
    for words in ("ttt import discord FILE.json ...", "ttt import slack EXPORT", "ttt import jsonl FILE",
                  "--consent TEXT", "--exclude-users ID_OR_NAME ...", "--name NAME", "--silence-minutes",
                  "--filters reddit|chat", "--base-model smol --lora", "training.base_model", "package://PKG/FILE.gguf",
                  "ppl_base=X ppl_tuned=Y ppl_drop=Z distinct2=W train_minutes=M"):
        assert words in training, words
    assert "Discord's and Slack's terms restrict training on people's messages without" in training
    assert "`training/imports/`" in readme and "`bench/persona.py`" in readme


def test_the_help_gives_the_importers_own_silence_default(workdir):
    """`ttt` does not load the importers to build its parser: the help's default is checked here."""
    from training.imports import DEFAULT_SILENCE_MINUTES

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["--config", str(workdir / "config.yaml"), "import", "discord", "--help"])
    assert exited.value.code == 0
    assert f"(default: {DEFAULT_SILENCE_MINUTES:g})" in " ".join(out.getvalue().split())
