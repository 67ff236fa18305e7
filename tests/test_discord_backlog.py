"""A Discord reconnect that delivers a backlog of mentions at once: the real discord.py client resumes
its session on the fake Discord, which replays the mentions it missed, as Discord does; each is
answered in time or refused at once, none fails after waiting."""

from __future__ import annotations

import pytest

from core.errors import BUSY
from test_discord_bot import bot_config, fake, running, turns, world  # noqa: F401 (fixtures)
from test_generator_overload import lone_reply_seconds
from tiny import WORDS, build_untrained_model

BACKLOG = 48
PROMPTLY_S = 1.0  # a refusal is posted this soon after the mention reached the bot


@pytest.fixture(scope="module")
def slower_model_dir(tmp_path_factory):
    """An untrained GPT-2 big enough that a lone 64-token reply takes a second or two here."""
    return build_untrained_model(tmp_path_factory.mktemp("slower"), n_embd=1024, n_layer=6)


@pytest.mark.timeout(240)
async def test_mentions_replayed_on_resume_are_answered_in_time_or_refused_at_once(
        tmp_path, slower_model_dir, fake, world):
    """The bot is ready, its gateway connection is cut, 48 people mention it in 48 channels meanwhile;
    on RESUME Discord replays them all at once. The deadline is twice a lone reply's time (at least
    3 s, so that a refusal at once and one after waiting are told apart): some are answered in time,
    the others get the busy reply at once; none gets it late (a reply that timed out), none is left
    unanswered."""
    deadline = max(2 * await lone_reply_seconds(slower_model_dir), 3 * PROMPTLY_S)
    people = [world.alice, world.bob] + [fake.add_user(name) for name in ("carol", "dave")]
    for person in people[2:]:
        fake.add_member(world.guild, person)
    channels = [world.general, world.random] + [fake.add_text_channel(world.guild, f"room-{i}")
                                                for i in range(BACKLOG - 2)]
    personas = {"slow": {"model": str(slower_model_dir), "format": "dialogpt", "max_context_tokens": 200,
                         "decoding": {"do_sample": False, "max_new_tokens": 64}}}
    config = bot_config(tmp_path, slower_model_dir, fake, world, personas, service={"default_persona": "slow"},
                        generator={"request_timeout_s": deadline}, safety={"on_offensive": "allow"})
    async with running(config, fake) as adapter:
        service = adapter.service
        persona = service.personas.get("slow")
        await service.personas.engine(persona)  # what `ttt serve` does at start
        assert service.personas.is_loaded(persona)  # ready (/healthz)

        # The connection is cut (no await until the mentions are in: the bot cannot resume before).
        assert await fake.drop_gateway(code=None) == 1
        me = fake.bot_user.mention
        mentions = [await fake.user_says(channel, people[i % len(people)], f"{me} the word is {WORDS[i % 20]} {i}")
                    for i, channel in enumerate(channels)]
        replay = (await fake.wait_for(lambda: fake.gateway.replays, 30, "a RESUME"))[0]
        assert replay["events"] == BACKLOG and len(fake.gateway.identifies) == 1  # resumed, all replayed at once

        def answers() -> dict[str, list[dict]]:
            """Mention id -> the bot's messages replying to it."""
            found = {m["id"]: [] for m in mentions}
            for channel in channels:
                for message in fake.bot_messages(channel):
                    found[message["message_reference"]["message_id"]].append(message)
            return found

        await fake.wait_for(lambda: all(answers().values()), deadline + 30, "an answer to every mention")
        replies = answers()
        outcomes = [(service.metrics.registry.get_sample_value(
            "ttt_requests_total", {"adapter": "discord", "persona": "slow", "outcome": outcome}) or 0)
            for outcome in ("ok", "busy", "timeout")]
        stored = [await turns(adapter, channel) for channel in channels]

    assert all(len(messages) == 1 for messages in replies.values())  # one answer each, never two
    answered = [(mention, replies[mention["id"]][0]) for mention in mentions]
    busy = [reply["at"] - replay["at"] for _, reply in answered if reply["content"] == BUSY]
    real = [reply["at"] - replay["at"] for _, reply in answered if reply["content"] != BUSY]
    assert max(busy, default=0) < PROMPTLY_S, f"busy replies {sorted(busy)[-5:]} s after the backlog arrived"
    assert outcomes == [len(real), len(busy), 0]  # the service saw no reply time out after waiting
    assert real and max(real) < deadline + PROMPTLY_S
    # An answered mention is stored with its reply; a refused one leaves nothing behind.
    for (mention, reply), history in zip(answered, stored):
        assert len(history) == (0 if reply["content"] == BUSY else 2)
