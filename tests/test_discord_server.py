"""A Discord server's owners in charge, end to end through the fake Discord: /server and /usage as
slash commands, budgets enforced on mentions, text files attached to a message read into it."""

from __future__ import annotations

import pytest

from conftest import make_config  # noqa: F401 - the word model fixtures come with it
from core.conversation import ConversationKey
from core.servers import ADMINS_ONLY
from fakes.discord_models import P
from pg import pg_url, postgres  # noqa: F401 (fixtures)
from test_discord_bot import GREEDY, World, bot_config, fake, model, running, say, world  # noqa: F401 (fixtures)

@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> dict:
    return {"url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}


def wordchat(word_chat_model_dir) -> dict:
    return {"wordchat": {"model": str(word_chat_model_dir), "format": "chat", "description": "word game, chat format",
                         "max_context_tokens": 200, "decoding": GREEDY}}


async def slash(fake, channel, user, name: str, options: dict | None = None, subcommand: str | None = None) -> dict:
    """Run a slash command; its response (type 4), which must be ephemeral."""
    interaction = await fake.invoke_command(channel, user, name, options, subcommand=subcommand)
    response = await fake.wait_for_response(interaction)
    assert response["type"] == 4 and response["ephemeral"], response
    return response["data"]["content"]


def owner(fake, world: World):
    return fake.users[world.guild.owner_id]


@pytest.mark.timeout(120)
async def test_an_admins_server_persona_answers_in_a_new_channel(tmp_path, word_model_dir, word_chat_model_dir,
                                                                   fake, world, database):
    config = bot_config(tmp_path, word_model_dir, fake, world, wordchat(word_chat_model_dir), database=database)
    mods = fake.add_role(world.guild, "mods", permissions=P.MANAGE_GUILD)
    fake.add_member(world.guild, world.bob, roles=[mods])
    async with running(config, fake) as adapter:
        [registered] = [c for c in fake.command_syncs[-1][1] if c["name"] == "server"]
        assert int(registered["default_member_permissions"]) == P.MANAGE_GUILD and registered["dm_permission"] is False
        assert sorted(o["name"] for o in registered["options"]) == ["budget", "persona", "prompt", "rate-limit", "show"]

        assert await slash(fake, world.general, world.alice, "server", {"name": "wordchat"}, "persona") == ADMINS_ONLY
        done = await slash(fake, world.general, world.bob, "server", {"name": "wordchat"}, "persona")
        assert done.startswith("Done") and "**wordchat**" in done

        new = fake.add_text_channel(world.guild, "new")
        reply = await say(fake, new, world.alice, f"{fake.bot_user.mention} the word is tiger")
        assert reply["content"] == "tiger!"
        stored = await adapter.service.store.recent_turns(ConversationKey("discord", str(new.id)), 10)
        assert [t.persona for t in stored] == ["wordchat", "wordchat"]
        assert "persona: **wordchat**" in await slash(fake, world.general, owner(fake, world), "server", {}, "show")
        assert "currently **wordchat**" in await slash(fake, world.general, world.alice, "persona")  # chose none

        # A bad value: a private, clear reply, and nothing changes.
        bad = await slash(fake, world.general, world.bob, "server", {"who": "person", "tokens": -5}, "budget")
        assert "whole number of tokens per person per day from 0" in bad
        assert "budget person: the host's (no limit)" in await slash(fake, world.general, world.bob, "server", {},
                                                                      "show")


@pytest.mark.timeout(120)
async def test_over_the_daily_budget_one_private_notice_then_silence_while_others_are_answered(
        tmp_path, word_model_dir, fake, world, database):
    config = bot_config(tmp_path, word_model_dir, fake, world, limits={"tokens_per_person_per_day": 4},
                        database=database)
    mention = fake.bot_user.mention
    async with running(config, fake) as adapter:
        assert (await say(fake, world.general, world.alice, f"{mention} the word is apple"))["content"] == "apple!"
        for _ in range(2):
            await fake.user_says(world.general, world.alice, f"{mention} the word is river")
        # Replies in a channel go in arrival order: Bob's answer comes after Alice's messages were handled.
        bob = await say(fake, world.general, world.bob, f"{mention} again")
        assert bob["content"] == "apple!"
        assert [m["content"] for m in fake.bot_messages(world.general)] == ["apple!", "apple!"]
        dm = fake.dm_channel(world.alice)
        assert [m["content"] for m in fake.bot_messages(dm)] == [
            "You have used today's 4 tokens here; it resets at 00:00 UTC."]

        usage = await slash(fake, world.general, world.alice, "usage")
        assert usage.startswith("Today (UTC) you have used 4 of 4 tokens here; this server has used 8 tokens")
        metrics = adapter.service.metrics.registry
        assert metrics.get_sample_value("ttt_budget_refusals_total", {"adapter": "discord", "budget": "person"}) == 2
        assert metrics.get_sample_value("ttt_tokens_generated_total", {"adapter": "discord", "persona": "words"}) == 8


@pytest.mark.timeout(120)
async def test_a_text_file_is_read_into_the_prompt_and_stored_with_the_message(tmp_path, word_model_dir, fake, world,
                                                                              model):
    config = bot_config(tmp_path, word_model_dir, fake, world, {"remote": model.persona()},
                        service={"default_persona": "remote", "max_attachment_kb": 1})
    files = [{"filename": "notes.txt", "data": "The secret word is heliotrope.\nSecond line: ünïcode ✓\n".encode()},
             {"filename": "cat.png", "data": b"\x89PNG\r\n\x1a\n" + bytes(64), "content_type": "image/png"},
             {"filename": "big.log", "data": b"x" * 2048}]
    async with running(config, fake) as adapter:
        said = await fake.user_says(world.general, world.alice, f"{fake.bot_user.mention} what is the secret word?",
                                    attachments=files)
        request = await model.request(0)
        turn = request["messages"][-1]["content"]
        assert turn == ("what is the secret word?\n\nnotes.txt:\n> The secret word is heliotrope.\n"
                        "> Second line: ünïcode ✓")
        model.say(0, "heliotrope")
        model.end(0)
        assert (await fake.wait_for_message(world.general, after=said))["content"] == "heliotrope"
        [notes] = [m["content"] for m in fake.bot_messages(fake.dm_channel(world.alice))]
        assert "I can't read cat.png: I only read text files" in notes and "I didn't read big.log: it is over 1 KB" \
            in notes
        key = ConversationKey("discord", str(world.general.id))
        stored = await adapter.service.store.recent_turns(key, 10)
        assert "heliotrope" in stored[0].text and stored[0].author_id == str(world.alice.id)

        only_a_file = await fake.user_says(world.general, world.alice, fake.bot_user.mention,
                                           attachments=[{"filename": "list.csv", "data": b"a,b\n1,2\n"}])
        assert (await model.request(1))["messages"][-1]["content"] == "list.csv:\n> a,b\n> 1,2"
        model.end_all()
        await fake.wait_for_message(world.general, after=only_a_file)

        forget = await fake.invoke_command(world.general, world.alice, "forget-me")
        await fake.wait_for_followup(forget)
        assert await adapter.service.store.recent_turns(key, 10) == []  # the files went with the messages


@pytest.mark.timeout(120)
async def test_a_file_too_long_for_the_persona_gets_a_polite_refusal(tmp_path, word_model_dir, fake, world):
    config = bot_config(tmp_path, word_model_dir, fake, world)  # the word model: a 200-token context
    async with running(config, fake) as adapter:
        story = " ".join(["the word is apple"] * 200).encode()
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} read this",
                          attachments=[{"filename": "story.md", "data": story}])
        assert reply["content"].startswith("That is too long for words") and "shorten it" in reply["content"]
        assert await adapter.service.store.recent_turns(ConversationKey("discord", str(world.general.id)), 10) == []


@pytest.mark.timeout(120)
async def test_the_budget_notice_goes_to_the_channel_when_the_persons_dms_are_closed(tmp_path, word_model_dir, fake,
                                                                                    world):
    config = bot_config(tmp_path, word_model_dir, fake, world, limits={"tokens_per_person_per_day": 4})
    world.alice.accepts_dms = False
    mention = fake.bot_user.mention
    async with running(config, fake):
        assert (await say(fake, world.general, world.alice, f"{mention} the word is apple"))["content"] == "apple!"
        refused = await fake.user_says(world.general, world.alice, f"{mention} the word is river")
        notice = await fake.wait_for_message(world.general, after=refused)
        assert notice["content"] == "You have used today's 4 tokens here; it resets at 00:00 UTC."
        assert notice["message_reference"]["message_id"] == refused["id"] and notice["allowed_mentions"] == {
            "parse": []}
        await fake.user_says(world.general, world.alice, f"{mention} again")
        assert (await say(fake, world.general, world.bob, f"{mention} again"))["content"] == "apple!"
        assert len(fake.bot_messages(world.general)) == 3  # apple!, the one notice, Bob's answer
