"""The Discord adapter end to end: unmodified discord.py, pointed at the fake Discord only through
`discord.api_base_url`, answering with tiny real models through the real ChatService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from bots.discord.adapter import SLOW_DOWN, DiscordAdapter
from bots.discord.commands import HELP
from ttt.check import check
from ttt.serve import serve
from bots.chat.view import APOLOGY
from conftest import make_config, make_settings
from core.config.schema import Config, DiscordSection, PersonaConfig
from core.conversation import ConversationKey
from core.safety import neutralize_mentions
from core.service import open_service
from fakes.discord_server import FakeChannel, FakeDiscord, FakeGuild, FakeUser
from fakes.scripted_model import ScriptedModel
from tiny import WORDS, build_untrained_model, train_reply_model

GREEDY = {"do_sample": False, "max_new_tokens": 16}
STORY = " ".join(
    f"Day {i + 1}: the {WORDS[i % 20]} and the {WORDS[(i * 3 + 1) % 20]} went to the {WORDS[(i * 7 + 2) % 20]} "
    f"to look for a {WORDS[(i * 11 + 5) % 20]}."
    for i in range(36)
)
SHOUT = "@everyone look <@&42> and <@123>!"
PEAR = "apple? no, pear."
CODE = "Here it is:\n```python\n" + "\n".join(f"total = total + {i}  # {WORDS[i % 20]}" for i in range(90)) + "\n```"
HINT = "I didn't catch any words there. Say something after the mention!"


@pytest.fixture(scope="module")
def parrot_model_dir(tmp_path_factory):
    """Says what it was taught: a story over 2,000 characters, a line full of pings, a pear."""
    return train_reply_model(tmp_path_factory.mktemp("models") / "parrot", [
        [("tell me a story", STORY)],
        [("shout", SHOUT)],
        [("the word is apple", PEAR), ("the word is apple", PEAR)],
        [("show me code", CODE)],
    ])


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    return build_untrained_model(tmp_path_factory.mktemp("models") / "slow")


@pytest.fixture
async def fake():
    async with FakeDiscord(bot_name="TTT") as fake:
        yield fake
    assert fake.unknown_requests == [] and fake.server_errors == []
    assert fake.rate_limited == []  # the bot kept within Discord's rate limits


@pytest.fixture
async def model():
    async with ScriptedModel() as m:
        yield m


@dataclass
class World:
    guild: FakeGuild
    general: FakeChannel
    random: FakeChannel
    alice: FakeUser
    bob: FakeUser


@pytest.fixture
def world(fake) -> World:
    guild = fake.add_guild("Test Guild")
    general, random = fake.add_text_channel(guild, "general"), fake.add_text_channel(guild, "random")
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    fake.add_member(guild, alice)
    fake.add_member(guild, bob, nick="Bobby")
    return World(guild, general, random, alice, bob)


def bot_config(tmp_path, word_model_dir, fake: FakeDiscord, world: World, personas=None, **sections) -> Config:
    """The word game as persona `words` (default), more personas, and Discord pointed at the fake."""
    discord = {"api_base_url": fake.api_url, "command_guilds": [world.guild.id], "stream_edit_interval_s": 0,
               "rate_limit_per_minute": 0, **sections.pop("discord", {})}
    config = make_config(tmp_path, word_model_dir, discord=discord, **sections)
    for name, persona in (personas or {}).items():
        config.personas[name] = PersonaConfig.model_validate(persona)
    return config


@contextlib.asynccontextmanager
async def running(config: Config, fake: FakeDiscord):
    """The adapter as `ttt serve` runs it, over a fresh ChatService on the config's database."""
    service = await open_service(config)
    adapter = DiscordAdapter(service, make_settings(config, {"DISCORD_TOKEN": fake.token}), guild_ready_timeout=0.05)
    try:
        await asyncio.wait_for(adapter.start(), 30)
        yield adapter
    finally:
        await adapter.stop()
        await service.close()


def key(channel) -> ConversationKey:
    return ConversationKey("discord", str(channel.id))


async def turns(adapter: DiscordAdapter, channel) -> list[tuple[str, str, str]]:
    return [(t.role, t.author, t.text) for t in await adapter.service.store.recent_turns(key(channel), 50)]


def up(adapter: DiscordAdapter) -> float:
    return adapter.service.metrics.registry.get_sample_value("ttt_adapter_up", {"adapter": "discord"})


async def say(fake: FakeDiscord, channel, user, content: str, **kwargs) -> dict:
    """`user` writes `content`; returns the bot's first message after it."""
    said = await fake.user_says(channel, user, content, **kwargs)
    return await fake.wait_for_message(channel, after=said, timeout=20)


@pytest.mark.timeout(90)
async def test_mention_gets_a_reply_with_typing_and_no_pings(tmp_path, word_model_dir, fake, world, caplog):
    caplog.set_level(logging.INFO, logger="bots.discord.adapter")
    me = fake.bot_user
    async with running(bot_config(tmp_path, word_model_dir, fake, world), fake) as adapter:
        said = await fake.user_says(world.general, world.alice, f"{me.mention} the word is apple")
        reply = await fake.wait_for_message(world.general, after=said, timeout=20)
        assert reply["content"] == "apple!"
        assert reply["message_reference"]["message_id"] == said["id"]
        assert reply["allowed_mentions"] == {"parse": []}
        assert set(fake.typing) == {world.general.id}
        assert fake.edits == []  # streaming off (stream_edit_interval_s: 0): one final message
        assert await turns(adapter, world.general) == [
            ("user", "alice", "the word is apple"), ("bot", "words", "apple!")]
        assert up(adapter) == 1

        # Its managed role's mention addresses it too; other mentions reach the model as names.
        reply = await say(fake, world.general, world.alice, f"{fake.bot_role(world.guild).mention} again")
        assert reply["content"] == "apple!"
        await say(fake, world.general, world.alice, f"<@!{me.id}> ask {world.bob.mention} in {world.random.mention}")
        assert (await turns(adapter, world.general))[-2][2] == "ask Bobby in #random"
        hint = await say(fake, world.general, world.alice, me.mention)  # a bare mention
        assert hint["content"] == HINT and hint["message_reference"]["message_id"]

    invite = next(r.getMessage() for r in caplog.records if "invite" in r.getMessage())
    assert f"client_id={fake.application_id}" in invite and "scope=bot+applications.commands" in invite
    assert "permissions=274877975616" in invite  # view, send, send in threads, read history, add reactions
    assert up(adapter) == 0
    assert fake.find_requests("GET", "/gateway/bot")  # the gateway was found through the configured API


@pytest.mark.timeout(90)
async def test_dms_and_never_bots_or_itself(tmp_path, word_model_dir, fake, world):
    other_bot = fake.add_user("otherbot", bot=True)
    async with running(bot_config(tmp_path, word_model_dir, fake, world), fake) as adapter:
        dm = fake.dm_channel(world.alice)
        reply = await say(fake, dm, world.alice, "the word is tiger")
        assert reply["content"] == "tiger!" and reply["message_reference"]["message_id"]
        assert reply["allowed_mentions"] == {"parse": []}
        # Its own reply came back over the gateway as a DM message: it must not answer itself.
        await fake.expect_no_message(dm, after=reply)
        assert await turns(adapter, dm) == [("user", "alice", "the word is tiger"), ("bot", "words", "tiger!")]

        said = await fake.user_says(world.general, other_bot, f"{fake.bot_user.mention} the word is apple")
        await fake.expect_no_message(world.general, after=said)
        assert await turns(adapter, world.general) == []


@pytest.mark.timeout(90)
async def test_reply_to_the_bot_continues_without_mention_across_a_gateway_drop(
        tmp_path, word_model_dir, fake, world):
    async with running(bot_config(tmp_path, word_model_dir, fake, world), fake) as adapter:
        first = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is cloud")
        assert first["content"] == "cloud!"
        said = await fake.user_says(world.general, world.alice, "again")  # neither mention nor reply
        await fake.expect_no_message(world.general, after=said)

        assert await fake.drop_gateway() == 1
        reply = await say(fake, world.general, world.alice, "again", reference=first)
        assert reply["content"] == "cloud!" and reply["message_reference"]["message_id"] != first["id"]
        await fake.wait_for_connections(2)
        assert len(fake.gateway.resumes) == 1
        assert [t[2] for t in await turns(adapter, world.general)] == ["the word is cloud", "cloud!", "again", "cloud!"]


@pytest.mark.timeout(90)
async def test_channels_run_concurrently_each_with_its_own_context_in_order(tmp_path, word_model_dir, fake, world):
    me = fake.bot_user.mention
    async with running(bot_config(tmp_path, word_model_dir, fake, world), fake) as adapter:
        # Sent at once, without waiting: each channel must see only its own word, in order.
        await fake.user_says(world.general, world.alice, f"{me} the word is apple")
        await fake.user_says(world.random, world.bob, f"{me} the word is river")
        await fake.user_says(world.general, world.alice, f"{me} again")
        await fake.user_says(world.random, world.bob, f"{me} again")
        await fake.wait_for(lambda: len(fake.bot_messages(world.general)) == 2 == len(fake.bot_messages(world.random)),
                            20, "two replies in each channel")
        assert [m["content"] for m in fake.bot_messages(world.general)] == ["apple!", "apple!"]
        assert [m["content"] for m in fake.bot_messages(world.random)] == ["river!", "river!"]
        assert [t[2] for t in await turns(adapter, world.random)] == ["the word is river", "river!", "again", "river!"]
        assert [t[1] for t in await turns(adapter, world.random)][0] == "Bobby"


@pytest.mark.timeout(90)
async def test_slash_commands_sync_defer_follow_up_and_autocomplete(
        tmp_path, word_model_dir, parrot_model_dir, fake, world):
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "description": "says what it learnt",
                           "decoding": GREEDY}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas)
    async with running(config, fake) as adapter:
        assert [(guild, sorted(c["name"] for c in body)) for guild, body in fake.command_syncs] == [
            (world.guild.id, ["forget-me", "help", "persona", "personas", "reset", "server", "usage"])]

        help_ = await fake.invoke_command(world.general, world.alice, "help")
        response = await fake.wait_for_response(help_)
        assert response["type"] == 4 and response["ephemeral"] and response["data"]["content"] == HELP
        assert all(f"`/{name}`" in HELP for name in ("reset", "persona", "personas", "forget-me", "usage", "server",
                                                      "help"))
        listing = await fake.invoke_command(world.general, world.alice, "personas")
        assert "**parrot**" in (await fake.wait_for_response(listing))["data"]["content"]

        await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is apple")
        reset = await fake.invoke_command(world.general, world.alice, "reset")
        followup = await fake.wait_for_followup(reset)
        assert reset.response["type"] == 5 and not reset.response["ephemeral"]  # deferred at once, in the open
        assert followup["body"]["content"].startswith("Done") and followup["body"]["allowed_mentions"] == {"parse": []}
        assert await turns(adapter, world.general) == []

        choices = await fake.autocomplete(world.general, world.alice, "persona", {"name": "PAR"}, focused="name")
        await fake.wait_for_response(choices)
        assert choices.choices == [{"name": "parrot: says what it learnt", "value": "parrot"}]


@pytest.mark.timeout(90)
async def test_commands_sync_globally_without_command_guilds(tmp_path, word_model_dir, fake, world):
    config = bot_config(tmp_path, word_model_dir, fake, world, discord={"command_guilds": []})
    async with running(config, fake):
        assert [guild for guild, _ in fake.command_syncs] == [None]
        help_ = await fake.invoke_command(fake.dm_channel(world.alice), world.alice, "help")
        assert (await fake.wait_for_response(help_))["data"]["content"] == HELP


@pytest.mark.timeout(90)
async def test_this_process_runs_its_shards_found_through_the_api(tmp_path, word_model_dir, fake, world):
    ours, theirs = fake.add_guild("Ours", shard=(2, 3)), fake.add_guild("Theirs", shard=(1, 3))
    here, there = fake.add_text_channel(ours, "here"), fake.add_text_channel(theirs, "there")
    config = bot_config(tmp_path, word_model_dir, fake, world, discord={"shard_count": 3, "shard_ids": [0, 2]})
    async with running(config, fake) as adapter:
        assert sorted(i["shard"] for i in fake.gateway.identifies) == [[0, 3], [2, 3]]
        assert adapter.client.shard_count == 3 and sorted(adapter.client.shards) == [0, 2]
        reply = await say(fake, here, world.alice, f"{fake.bot_user.mention} the word is harbor")
        assert reply["content"] == "harbor!"
        said = await fake.user_says(there, world.alice, f"{fake.bot_user.mention} the word is harbor")
        await fake.expect_no_message(there, after=said)  # another process runs shard 1


@pytest.mark.timeout(10)
def test_shard_ids_must_be_shards_of_the_count():
    assert DiscordSection(shard_count=4, shard_ids=[1, 3]).shard_ids == [1, 3]
    for wrong in ({"shard_ids": [0]}, {"shard_count": 2, "shard_ids": [2]}, {"shard_count": 2, "shard_ids": []},
                  {"shard_count": 2, "shard_ids": [1, 1]}):
        with pytest.raises(ValueError, match="shard"):
            DiscordSection.model_validate(wrong)


@pytest.mark.timeout(30)
async def test_an_unreachable_api_ends_the_start_with_one_clear_line(tmp_path, word_model_dir, fake, world):
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/api/v10"
    config = bot_config(tmp_path, word_model_dir, fake, world, discord={"api_base_url": closed})
    with pytest.raises(RuntimeError) as failed:
        async with running(config, fake):
            pass
    assert str(failed.value).startswith(f"cannot reach the Discord API at {closed}: ")
    assert "\n" not in str(failed.value) and failed.value.__cause__ is None and failed.value.__suppress_context__
    assert fake.token not in str(failed.value)


@pytest.mark.timeout(60)
async def test_a_rejected_token_is_found_by_check_and_stops_serve(tmp_path, word_model_dir, fake, world, capsys):
    config = bot_config(tmp_path, word_model_dir, fake, world)
    wrong = make_settings(config, {"DISCORD_TOKEN": "not-the-token-7d1e"})
    assert await check(wrong) == 2
    out, err = capsys.readouterr()
    assert "PROBLEM: discord: Discord rejected DISCORD_TOKEN" in err and "not-the-token-7d1e" not in out + err
    assert await serve(wrong) == 2
    assert await check(make_settings(config, {"DISCORD_TOKEN": fake.token})) == 0
    assert "discord  starts" in capsys.readouterr().out


@pytest.mark.timeout(120)
async def test_persona_switch_rules_and_persistence_across_restart(
        tmp_path, word_model_dir, parrot_model_dir, fake, world):
    switcher = fake.add_role(world.guild, "persona-switcher")
    carol = fake.add_user("carol")
    fake.add_member(world.guild, carol, roles=[switcher])
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "description": "says what it learnt",
                           "decoding": GREEDY}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas,
                        discord={"persona_switch": "roles", "persona_switch_roles": [switcher.id]})
    async with running(config, fake) as adapter:
        denied = await fake.invoke_command(world.general, world.bob, "persona", {"name": "parrot"})
        assert (await fake.wait_for_response(denied))["ephemeral"]
        assert "persona-switching role" in denied.response["data"]["content"]
        unknown = await fake.invoke_command(world.general, carol, "persona", {"name": "nobody"})
        assert (await fake.wait_for_response(unknown))["ephemeral"]
        assert "no persona called 'nobody'" in unknown.response["data"]["content"]
        assert await adapter.service.store.persona(key(world.general)) is None

        switched = await fake.invoke_command(world.general, carol, "persona", {"name": "parrot"})
        response = await fake.wait_for_response(switched)
        assert not response["ephemeral"] and response["data"]["content"].startswith("Switched to **parrot**")
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is apple")
        assert reply["content"] == PEAR
        other = await say(fake, world.random, world.alice, f"{fake.bot_user.mention} the word is apple")
        assert other["content"] == "apple!"  # per channel

    async with running(config, fake) as adapter:
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is apple")
        assert reply["content"] == PEAR
        stored = await adapter.service.store.recent_turns(key(world.general), 10)
        assert [t.persona for t in stored] == ["parrot"] * 4
        current = await fake.invoke_command(world.general, world.bob, "persona")
        assert "currently **parrot**" in (await fake.wait_for_response(current))["data"]["content"]


@pytest.mark.timeout(90)
async def test_a_channel_persona_reaches_its_threads_and_forget_me(
        tmp_path, word_model_dir, parrot_model_dir, fake, world):
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "decoding": GREEDY}}
    side = fake.add_thread(world.general, "side talk", owner=world.alice)
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, discord={"auto_thread": True})
    me = fake.bot_user.mention
    async with running(config, fake) as adapter:
        switched = await fake.invoke_command(world.general, world.alice, "persona", {"name": "parrot"})
        assert (await fake.wait_for_response(switched))["data"]["content"].startswith("Switched to **parrot**")
        await fake.user_says(world.general, world.alice, f"{me} the word is apple")
        opened = (await fake.wait_for(lambda: fake.threads_created, 20, "a thread"))[0]
        assert (await fake.wait_for_message(opened, timeout=20))["content"] == PEAR  # the channel's persona
        shown = await fake.invoke_command(opened, world.bob, "persona")
        assert "currently **parrot**" in (await fake.wait_for_response(shown))["data"]["content"]
        await fake.wait_for_response(await fake.invoke_command(side, world.alice, "persona", {"name": "words"}))
        assert (await say(fake, side, world.bob, f"{me} the word is apple"))["content"] == "apple!"  # its own

        forget = await fake.invoke_command(world.random, world.alice, "forget-me")
        done = await fake.wait_for_followup(forget)
        assert forget.response["ephemeral"] and done["ephemeral"]
        assert done["body"]["content"].startswith("Done: I've deleted everything you wrote")
        assert await turns(adapter, opened) == []
        assert await turns(adapter, side) == [("user", "Bobby", "the word is apple"), ("bot", "words", "apple!")]


@pytest.mark.timeout(90)
async def test_access_lists_dms_off_input_limit_and_rate_limit(tmp_path, word_model_dir, fake, world):
    muted = fake.add_role(world.guild, "muted")
    mallory, mute = fake.add_user("mallory"), fake.add_user("mute")
    fake.add_member(world.guild, mute, roles=[muted])
    thread = fake.add_thread(world.general, "side talk", owner=world.alice)
    config = bot_config(
        tmp_path, word_model_dir, fake, world, service={"max_input_chars": 40},
        discord={"allowed_channels": [world.general.id], "blocked_users": [mallory.id], "blocked_roles": [muted.id],
                 "dms": False, "rate_limit_per_minute": 3},
    )
    me = fake.bot_user.mention
    async with running(config, fake) as adapter:
        await fake.user_says(world.random, world.alice, f"{me} the word is apple")
        await fake.user_says(world.general, mallory, f"{me} the word is apple")
        await fake.user_says(world.general, mute, f"{me} the word is apple")
        await fake.user_says(fake.dm_channel(world.alice), world.alice, "the word is apple")
        # Gateway events are handled in order: once this is answered, the ones above were dropped.
        reply = await say(fake, thread, world.alice, f"{me} the word is lemon")  # a thread of an allowed channel
        assert reply["content"] == "lemon!"
        assert [c for c, msgs in fake.messages.items() if any(int(m["author"]["id"]) == fake.bot_user.id
                                                             for m in msgs)] == [thread.id]
        refused = await fake.invoke_command(world.random, world.alice, "reset")
        assert (await fake.wait_for_response(refused))["ephemeral"]
        assert "not available" in refused.response["data"]["content"]

        long = await say(fake, world.general, world.alice, f"{me} {'the word is apple ' * 4}")
        assert long["content"].startswith("That message is a bit long for me")  # does not count
        # Alice's second and third this minute.
        assert (await say(fake, world.general, world.alice, f"{me} the word is apple"))["content"] == "apple!"
        assert (await say(fake, thread, world.alice, f"{me} again"))["content"] == "lemon!"
        flood = [await fake.user_says(world.general, world.alice, f"{me} again") for _ in range(4)]
        bob = await say(fake, world.general, world.bob, f"{me} again")  # limits are per person
        assert bob["content"] == "apple!"
        # One quiet sign for the whole flood (a reaction on its first message), nothing in the channel.
        assert fake.reactions == [{"channel_id": world.general.id, "message_id": int(flood[0]["id"]),
                                   "emoji": SLOW_DOWN, "added": True}]
        assert [m for m in fake.bot_messages(world.general) if int(m["id"]) > int(flood[0]["id"])] == [bob]
        assert await turns(adapter, world.general) == [
            ("user", "alice", "the word is apple"), ("bot", "words", "apple!"),
            ("user", "Bobby", "again"), ("bot", "words", "apple!")]


@pytest.mark.timeout(90)
async def test_long_reply_is_split_on_sentences_and_streamed_within_the_channel_budget(
        tmp_path, word_model_dir, parrot_model_dir, fake, world):
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "max_context_tokens": 256,
                           "decoding": {**GREEDY, "max_new_tokens": 100}}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "parrot"},
                        discord={"stream_edit_interval_s": 0.001})
    heard = []

    async def listener(message, update):  # as voice will: every update, unthrottled
        heard.append((message.id, update))

    async def broken_listener(message, update):
        raise RuntimeError("this listener is broken")

    async with running(config, fake) as adapter:
        adapter.reply_hooks += [broken_listener, listener]
        said = await fake.user_says(world.general, world.alice, f"{fake.bot_user.mention} tell me a story")
        await fake.wait_for(lambda: " ".join(m["content"] for m in fake.bot_messages(world.general)) == STORY,
                            20, "the whole story")
        pieces = [m["content"] for m in fake.bot_messages(world.general)]
        assert len(pieces) == 2 and all(len(p) <= 2000 for p in pieces)
        assert pieces[0].endswith(".") and pieces[0][-100:] in STORY  # cut after a sentence
        first = fake.bot_messages(world.general)[0]
        assert first["message_reference"]["message_id"] == said["id"]
        edited = {e["message_id"] for e in fake.edits}  # streamed: sent early, then edited as it grew
        assert int(first["id"]) in edited and edited <= {int(m["id"]) for m in fake.bot_messages(world.general)}
        # Edits are spread out (about 5 per 5 s in a channel), not sent in bursts that Discord would refuse.
        assert all(b["at"] - a["at"] >= 1.0 for a, b in zip(fake.edits, fake.edits[1:]))
        await adapter.stop()  # lets the reply in flight finish: it is stored
        assert (await turns(adapter, world.general))[-1] == ("bot", "parrot", STORY)
    assert {message_id for message_id, _ in heard} == {int(said["id"])}
    texts = [update.text for _, update in heard]
    assert len(heard) > len(fake.edits) + 2 and all(STORY.startswith(t) for t in texts)
    assert texts == sorted(texts, key=len) and heard[-1][1].final and texts[-1] == STORY


@pytest.mark.timeout(90)
async def test_a_code_block_stays_balanced_in_every_piece(tmp_path, word_model_dir, parrot_model_dir, fake, world):
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "max_context_tokens": 512,
                           "decoding": {**GREEDY, "max_new_tokens": 40}}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "parrot"})
    async with running(config, fake):
        await fake.user_says(world.general, world.alice, f"{fake.bot_user.mention} show me code")
        await fake.wait_for(lambda: len(fake.bot_messages(world.general)) >= 2, 20, "a reply in pieces")
        pieces = [m["content"] for m in fake.bot_messages(world.general)]
    assert len(pieces) == 2 and all(len(p) <= 2000 for p in pieces)
    assert pieces[0].startswith("Here it is:\n```python\n") and pieces[0].endswith("\n```")
    assert pieces[1].startswith("```python\n") and pieces[1].endswith("\n```")  # reopened with its language
    lines = [line for piece in pieces for line in piece.splitlines()]
    assert [line for line in lines if not line.startswith(("```", "Here"))] == CODE.splitlines()[2:-1]


@pytest.mark.timeout(90)
async def test_a_stored_reply_is_posted_anew_when_its_message_is_gone(tmp_path, word_model_dir, fake, world, model):
    personas = {"remote": model.persona()}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "remote"},
                        discord={"stream_edit_interval_s": 0.01})
    async with running(config, fake) as adapter:
        said = await fake.user_says(world.general, world.alice, f"{fake.bot_user.mention} tell me")
        await model.request(0)
        model.say(0, "Once upon a time.")
        streamed = await fake.wait_for_message(world.general, after=said)
        fake.delete_message(streamed)  # a moderator deletes the half-written reply
        model.say(0, " The end.")
        model.end(0)
        reply = await fake.wait_for_message(world.general, lambda m: m["content"] == "Once upon a time. The end.",
                                            after=streamed)
        assert reply["message_reference"]["message_id"] == said["id"]
        assert [m["content"] for m in fake.bot_messages(world.general)] == [reply["content"]]  # no apology
        assert (await turns(adapter, world.general))[-1] == ("bot", "remote", "Once upon a time. The end.")


@pytest.mark.timeout(90)
async def test_model_pings_are_delivered_inert(tmp_path, word_model_dir, parrot_model_dir, fake, world):
    personas = {"parrot": {"model": str(parrot_model_dir), "format": "dialogpt", "decoding": GREEDY}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "parrot"})
    async with running(config, fake):
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} shout")
    assert reply["content"] == neutralize_mentions(SHOUT) != SHOUT
    assert "@everyone" not in reply["content"] and "<@" not in reply["content"]
    assert reply["allowed_mentions"] == {"parse": []}
    assert reply["mentions"] == [] and reply["mention_roles"] == [] and not reply["mention_everyone"]


@pytest.mark.timeout(90)
async def test_generation_failure_apologises_and_the_bot_keeps_going(tmp_path, word_model_dir, fake, world, caplog):
    # A persona whose tokenizer knows a word its model has no embedding for: that prompt fails in the model.
    broken = tmp_path / "mismatched"
    shutil.copytree(word_model_dir, broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(broken)
    personas = {"mismatched": {"model": str(broken), "format": "dialogpt", "decoding": GREEDY}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "mismatched"})
    async with running(config, fake) as adapter:
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is zebra")
        assert reply["content"] == "Sorry, something went wrong while I was thinking. Please try again."
        assert reply["message_reference"]["message_id"]
        assert any(r.exc_info and "generation failed" in r.getMessage() for r in caplog.records)  # with traceback
        reply = await say(fake, world.general, world.alice, f"{fake.bot_user.mention} the word is apple")
        assert reply["content"] == "apple!"
        assert [t[2] for t in await turns(adapter, world.general)] == ["the word is apple", "apple!"]


@pytest.mark.timeout(120)
async def test_busy_generator_gets_a_busy_reply(tmp_path, word_model_dir, slow_model_dir, fake, world):
    personas = {"slow": {"model": str(slow_model_dir), "format": "dialogpt", "max_context_tokens": 512,
                         "decoding": {"do_sample": False, "max_new_tokens": 200}}}
    config = bot_config(tmp_path, word_model_dir, fake, world, personas, service={"default_persona": "slow"},
                        generator={"max_queue": 1}, safety={"on_offensive": "allow"},
                        discord={"stream_edit_interval_s": 0.2})
    me = fake.bot_user.mention
    async with running(config, fake) as adapter:
        # The first streamed piece shows the slow reply is decoding: the generator's one place is taken.
        await say(fake, world.general, world.alice, f"{me} the word is apple")
        busy = await say(fake, world.random, world.bob, f"{me} the word is river")
        assert busy["content"] == "I'm busy with a lot of conversations right now; try again in a moment."
        assert busy["allowed_mentions"] == {"parse": []}
        assert await turns(adapter, world.random) == []
    assert len(fake.bot_messages(world.general)) == 1  # the slow reply finished before the bot stopped
    assert fake.edits  # the slow reply was streamed into its message


@pytest.mark.timeout(90)
async def test_auto_thread_opens_a_thread_and_talks_there(tmp_path, word_model_dir, fake, world):
    config = bot_config(tmp_path, word_model_dir, fake, world, discord={"auto_thread": True})
    async with running(config, fake) as adapter:
        said = await fake.user_says(world.general, world.alice, f"{fake.bot_user.mention} the word is violet")
        thread = (await fake.wait_for(lambda: fake.threads_created, 20, "a thread"))[0]
        assert thread.id == int(said["id"]) and thread.name == "the word is violet"
        reply = await fake.wait_for_message(thread, timeout=20)
        assert reply["content"] == "violet!" and "message_reference" not in reply
        reply = await say(fake, thread, world.alice, "again")  # in its own thread, no mention needed
        assert reply["content"] == "violet!"
        assert fake.bot_messages(world.general) == []
        assert [t[2] for t in await turns(adapter, thread)] == ["the word is violet", "violet!", "again", "violet!"]
