"""A Slack workspace's admins in charge, end to end through the fake Slack: `/ttt server` and
`/ttt usage`, budgets enforced on mentions and follow-ups, files shared with a message read into it."""

from __future__ import annotations

import pytest

from bots.chat.files import Download, read_files
from core.conversation import ConversationKey
from core.files import AttachedFile
from core.servers import ADMINS_ONLY
from pg import pg_url, postgres  # noqa: F401 (fixtures)
from test_slack_bot import bot_replies, command, fake, model, models, slack_bot  # noqa: F401 (fixtures)

ADMIN = {"id": "U0ADMIN", "name": "admin", "is_admin": True, "profile": {"display_name": "admin"}}
NOTICE = "You have used today's 4 tokens here; it resets at 00:00 UTC."


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> dict:
    return {"url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}


@pytest.mark.timeout(120)
async def test_a_workspace_admins_persona_answers_in_a_new_channel(tmp_path, fake, models, database):
    fake.users["U0ADMIN"] = ADMIN
    async with slack_bot(tmp_path, fake, models, database=database) as bot:
        assert await command(fake, "server persona wordchat", channel="C0GENERAL") == ADMINS_ONLY
        assert await command(fake, "server show", channel="C0GENERAL") == ADMINS_ONLY
        done = await command(fake, "server persona wordchat", channel="C0GENERAL", user="U0ADMIN")
        assert done.startswith("Done") and "*wordchat*" in done

        mention = fake.app_mention("C0NEW", "U0ALICE", "the word is tiger")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0NEW", mention["ts"]) == ["tiger!"]
        stored = await bot.service.store.recent_turns(ConversationKey("slack", f"C0NEW/{mention['ts']}"), 10)
        assert [t.persona for t in stored] == ["wordchat", "wordchat"]
        assert "currently *wordchat*" in await command(fake, "persona", channel="D0ALICE")  # DMs are in it too

        too_fast = await command(fake, "server rate-limit 60", channel="C0GENERAL", user="U0ADMIN")
        assert "The host allows at most 6 messages per person per minute" in too_fast  # and nothing changes
        shown = await command(fake, "server show", channel="D0ADMIN", user="U0ADMIN")
        assert "persona: *wordchat*" in shown and "rate-limit: the host's (6 messages" in shown
        assert "`/ttt server` shows or changes this workspace's settings" in await command(fake, "help")


@pytest.mark.timeout(120)
async def test_over_the_daily_budget_one_ephemeral_notice_then_silence_while_others_are_answered(
        tmp_path, fake, models, database):
    async with slack_bot(tmp_path, fake, models, limits={"tokens_per_person_per_day": 4}, database=database) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is apple")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["apple!"]
        for _ in range(2):
            await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        # One conversation answers in arrival order: Bob's follow-up comes after Alice's were handled.
        await fake.send_event(fake.channel_message("C0GENERAL", "U0BOB", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["apple!", "apple!"]
        assert [(e["user"], e["text"]) for e in fake.ephemerals] == [("U0ALICE", NOTICE)]

        usage = await command(fake, "usage", channel="C0GENERAL")
        assert usage == ("Today (UTC) you have used 4 of 4 tokens here; this server has used 8 tokens "
                         "(no daily limit). Budgets reset at 00:00 UTC.")
        assert bot.service.metrics.registry.get_sample_value(
            "ttt_budget_refusals_total", {"adapter": "slack", "budget": "person"}) == 2


@pytest.mark.timeout(120)
async def test_a_shared_text_file_is_fetched_with_the_bot_token_and_read_into_the_prompt(tmp_path, fake, models,
                                                                                        model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"}) as bot:
        notes = fake.add_file("notes.md", b"# Plan\nShip on Friday.\n", "text/markdown")
        photo = fake.add_file("photo.jpg", b"\xff\xd8\xff\xe0" + bytes(32), "image/jpeg")
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "when do we ship?", files=[notes, photo])
        await fake.send_event(mention)
        request = await model.request(0)
        assert request["messages"][-1]["content"] == "when do we ship?\n\nnotes.md:\n> # Plan\n> Ship on Friday."
        model.say(0, "On Friday.")
        model.end(0)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["On Friday."]
        assert fake.file_downloads == [(notes["id"], True)]  # the photo is never fetched
        assert [e["text"] for e in fake.ephemerals] == [
            "I can't read photo.jpg: I only read text files (.txt, .md, .csv, .json, .log or source code)."]

        shared = fake.dm("D0ALICE", "U0ALICE", "", files=[fake.add_file("data.json", b'{"a": 1}', "application/json")])
        await fake.send_event(shared)
        assert (await model.request(1))["messages"][-1]["content"] == 'data.json:\n> {"a": 1}'
        model.end_all()
        await bot_replies(fake, "D0ALICE")
        stored = await bot.service.store.recent_turns(ConversationKey("slack", "D0ALICE"), 10)
        assert stored[0].text == 'data.json:\n> {"a": 1}'


@pytest.mark.timeout(30)
async def test_reading_files_follows_no_sign_in_redirect_and_stops_at_the_size_limit(fake):
    notes = fake.add_file("notes.txt", b"hello\n")
    big = fake.add_file("big.txt", b"y" * 5000)

    def download(file: dict, token: str, size: int | None = None) -> Download:
        return Download(AttachedFile(file["name"], file["size"] if size is None else size, file["mimetype"]),
                        file["url_private"], {"Authorization": f"Bearer {token}"})

    blocks, notes_said = await read_files([download(notes, "xoxb-wrong"), download(notes, fake.bot_token),
                                           download(big, fake.bot_token, size=10)], max_bytes=1024)
    assert blocks == ["notes.txt:\n> hello"]  # the sign-in page is never read as the file
    assert notes_said == ["I couldn't fetch notes.txt; please try again.", "I didn't read big.txt: it is over 1 KB."]
    assert fake.file_downloads == [(notes["id"], False), (notes["id"], True), (big["id"], True)]
