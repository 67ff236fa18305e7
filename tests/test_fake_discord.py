"""Smoke tests of the fake Discord (tests/fakes/discord_server.py) with unmodified discord.py."""

from __future__ import annotations

import asyncio
import contextlib

import discord
import pytest
import yarl
from discord import app_commands

from fakes.discord_server import FakeDiscord


@pytest.fixture
async def fake():
    async with FakeDiscord(bot_name="TestBot") as fake:
        with fake.patch_discord_py():
            yield fake


@pytest.fixture
def world(fake):
    guild = fake.add_guild("Test Guild")
    channel = fake.add_text_channel(guild, "general")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    return guild, channel, alice


def message_intents() -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


@contextlib.asynccontextmanager
async def running(client: discord.Client, fake: FakeDiscord, timeout: float = 20):
    """Runs ``client`` against the fake until the block ends; fails fast if start() raises."""
    task = asyncio.create_task(client.start(fake.token))
    ready = asyncio.create_task(client.wait_until_ready())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready in done, "client did not become ready"
        yield client
    finally:
        ready.cancel()
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


@pytest.mark.timeout(60)
async def test_client_logs_in_and_replies(fake, world):
    guild, channel, alice = world
    client = discord.Client(intents=message_intents())
    own_echo = asyncio.Event()

    @client.event
    async def on_message(message: discord.Message):
        if message.author == client.user:
            own_echo.set()
            return
        await message.reply("hi", allowed_mentions=discord.AllowedMentions.none())

    async with running(client, fake):
        g = client.get_guild(guild.id)
        assert g.get_channel(channel.id).name == "general"
        assert g.me.guild_permissions.send_messages
        assert g.get_role(fake.bot_role(guild).id).is_bot_managed()
        assert client.user.id == fake.bot_user.id and client.application_id == fake.application_id

        said = await fake.user_says(channel, alice, "hello bot")
        reply = await fake.wait_for_message(channel, after=said)
        assert reply["content"] == "hi"
        assert reply["message_reference"]["message_id"] == said["id"]
        # discord.py omits replied_user when False (Discord's default then: no ping).
        assert reply["allowed_mentions"] == {"parse": []}
        assert reply["author"]["id"] == str(fake.bot_user.id)
        await asyncio.wait_for(own_echo.wait(), 10)  # the bot saw its own message come back
        assert fake.find_requests("POST", rf"/channels/{channel.id}/messages")
        assert fake.gateway.identifies[0]["intents"] == message_intents().value
    assert fake.unknown_requests == []


@pytest.mark.timeout(60)
async def test_wrong_token_is_rejected(fake):
    client = discord.Client(intents=discord.Intents.default())
    with pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()


@pytest.mark.timeout(60)
async def test_slash_command_defer_followup_and_autocomplete(fake, world):
    guild, channel, alice = world
    client = discord.Client(intents=discord.Intents.default())
    tree = app_commands.CommandTree(client)
    where = discord.Object(guild.id)

    @tree.command(name="ask", description="Ask the bot", guild=where)
    async def ask(interaction: discord.Interaction, question: str, count: int = 1):
        await interaction.response.defer()
        await interaction.followup.send(f"{question} x{count} by {interaction.user.name}", ephemeral=True)

    async def topics(interaction: discord.Interaction, current: str):
        return [app_commands.Choice(name=t, value=t) for t in ("alpha", "beta") if t.startswith(current)]

    @tree.command(name="pick", description="Pick a topic", guild=where)
    @app_commands.autocomplete(topic=topics)
    async def pick(interaction: discord.Interaction, topic: str):
        await interaction.response.send_message(f"picked {topic}")

    async with running(client, fake):
        synced = await tree.sync(guild=where)
        assert sorted(c.name for c in synced) == ["ask", "pick"]
        assert [c["name"] for c in fake.guild_commands[guild.id]] == ["ask", "pick"]

        inter = await fake.invoke_command(channel, alice, "ask", {"question": "life", "count": 3})
        followup = await fake.wait_for_followup(inter)
        assert inter.response["type"] == 5 and not inter.response["ephemeral"]
        assert followup["body"]["content"] == "life x3 by alice"
        assert followup["flags"] & 64 and followup["ephemeral"]

        ac = await fake.autocomplete(channel, alice, "pick", {"topic": "al"}, focused="topic")
        await fake.wait_for_response(ac)
        assert ac.choices == [{"name": "alpha", "value": "alpha"}]

        done = await fake.invoke_command(channel, alice, "pick", {"topic": "beta"})
        response = await fake.wait_for_response(done)
        assert response["type"] == 4 and response["data"]["content"] == "picked beta"
        assert fake.bot_messages(channel)[-1]["content"] == "picked beta"
    assert fake.unknown_requests == []


@pytest.mark.timeout(60)
async def test_autosharded_client_discovers_gateway(fake, world):
    guild, channel, alice = world
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL("ws://127.0.0.1:9/nowhere")  # must not be used
    client = discord.AutoShardedClient(intents=message_intents())
    got = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message):
        if message.author != client.user:
            got.put_nowait(message)

    async with running(client, fake):
        assert fake.find_requests("GET", "/gateway/bot")
        assert fake.gateway.identifies[0]["shard"] == [0, 1]
        await fake.user_says(channel, alice, "sharded hello")
        message = await asyncio.wait_for(got.get(), 10)
        assert message.content == "sharded hello" and message.guild.id == guild.id
        assert message.author.id == alice.id and isinstance(message.author, discord.Member)


@pytest.mark.timeout(60)
async def test_client_resumes_after_gateway_drop(fake, world):
    guild, channel, alice = world
    client = discord.Client(intents=message_intents())

    @client.event
    async def on_message(message: discord.Message):
        if message.author != client.user:
            await message.channel.send(f"echo: {message.content}")

    async with running(client, fake):
        assert await fake.drop_gateway() == 1
        # Sent while the bot is disconnected: replayed when it resumes.
        said = await fake.user_says(channel, alice, "are you there?")
        await fake.wait_for_connections(2)
        reply = await fake.wait_for_message(channel, after=said)
        assert reply["content"] == "echo: are you there?"
        assert len(fake.gateway.resumes) == 1 and len(fake.gateway.identifies) == 1

        assert await fake.drop_gateway(code=None) == 1  # TCP cut, client sees 1006
        await fake.wait_for_connections(3)
        said = await fake.user_says(channel, alice, "and now?")
        reply = await fake.wait_for_message(channel, after=said)
        assert reply["content"] == "echo: and now?"
        assert len(fake.gateway.identifies) == 1


@pytest.mark.timeout(60)
async def test_message_content_needs_intent_unless_mentioned(fake, world):
    guild, channel, alice = world
    client = discord.Client(intents=discord.Intents.default())  # no message_content
    got = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message):
        got.put_nowait(message)

    async with running(client, fake):
        await fake.user_says(channel, alice, "secret")
        assert (await asyncio.wait_for(got.get(), 10)).content == ""
        await fake.user_says(channel, alice, f"{fake.bot_user.mention} hello")
        message = await asyncio.wait_for(got.get(), 10)
        assert message.content.endswith("hello") and client.user in message.mentions
        dm = fake.dm_channel(alice)
        await fake.user_says(dm, alice, "private")
        message = await asyncio.wait_for(got.get(), 10)
        assert message.content == "private" and isinstance(message.channel, discord.DMChannel)


@pytest.mark.timeout(60)
async def test_threads_dms_typing_edits_history_and_members(fake, world):
    guild, channel, alice = world
    voice = fake.add_voice_channel(guild, "Voice")
    existing = fake.add_thread(channel, "old thread", owner=alice)
    helper = fake.add_role(guild, "helper")
    bob = fake.add_user("bob")
    fake.add_member(guild, bob, roles=[helper])
    intents = message_intents()
    intents.members = True  # members cached from GUILD_CREATE; query_members uses op 8
    client = discord.Client(intents=intents)
    got = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message):
        if message.author != client.user:
            got.put_nowait(message)

    async with running(client, fake):
        g = client.get_guild(guild.id)
        assert g.get_member(bob.id).get_role(helper.id) is not None
        assert [m.name for m in await g.query_members(user_ids=[bob.id])] == ["bob"]  # op 8 -> chunk
        assert isinstance(g.get_channel(voice.id), discord.VoiceChannel)
        assert g.get_thread(existing.id).name == "old thread"

        said = await fake.user_says(existing, bob, f"hi {helper.mention}", mentions=[alice])
        message = await asyncio.wait_for(got.get(), 10)
        assert isinstance(message.channel, discord.Thread) and message.role_mentions[0].id == helper.id
        assert [m.id for m in message.mentions] == [alice.id]

        async with message.channel.typing():
            sent = await message.channel.send("working")
        await sent.edit(content="done")
        assert fake.typing == [existing.id]
        assert fake.edits[0]["body"]["content"] == "done"
        assert (await message.channel.fetch_message(sent.id)).content == "done"
        history = [m.content async for m in message.channel.history(limit=10)]
        assert history == ["done", said["content"]]

        starter = await g.get_channel(channel.id).send("let's talk in a thread")
        started = await starter.create_thread(name="new thread")
        assert started.id == starter.id and fake.threads_created[0].name == "new thread"
        await started.send("in thread")
        assert (await fake.wait_for_message(started))["content"] == "in thread"

        await client.get_user(alice.id).send("psst")  # user cached from the guild member list
        dm = fake.dm_channel(alice)
        assert fake.dm_channels_created == [dm]
        assert (await fake.wait_for_message(dm))["content"] == "psst"
        await sent.add_reaction("\N{THUMBS UP SIGN}")
        assert fake.reactions[0]["emoji"] == "\N{THUMBS UP SIGN}"
    assert fake.unknown_requests == [] and fake.server_errors == []
