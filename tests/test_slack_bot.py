"""The Slack adapter end to end: unmodified slack_bolt/slack_sdk against the local fake Slack.

Replies come from the tiny word-game model (its answers show which context it saw) or, where a
test must decide what the model says and when, from a scripted OpenAI-compatible model server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest

from ttt.check import check
from ttt.serve import serve
from bots.slack.adapter import CHANNEL_RESET, NOT_HERE, SlackAdapter, create_adapter, help_text
from bots.slack.format import MESSAGE_LIMIT, PLACEHOLDER, STREAMING_MARK
from bots.chat.edits import EditBudget
from bots.chat.view import APOLOGY
from conftest import make_config, make_settings
from core.conversation import ConversationKey
from core.service import open_service
from fakes.scripted_model import ScriptedModel
from fakes.slack_server import FakeSlack

SIGNING_SECRET = "test-signing-secret"


@pytest.fixture
async def fake():
    async with FakeSlack() as f:
        yield f
    assert f.rate_limited == []  # the bot kept within Slack's limits


@pytest.fixture
async def model():
    async with ScriptedModel() as m:
        yield m


@pytest.fixture
def models(word_model_dir, word_chat_model_dir):
    return word_model_dir, word_chat_model_dir


def environ(fake: FakeSlack) -> dict[str, str]:
    return {"SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET}


@asynccontextmanager
async def slack_bot(tmp_path, fake, models, *, model=None, slack=None, ping_interval=10.0, edit_budget=None,
                    **sections):
    """A started SlackAdapter on its own ChatService (SQLite under tmp_path) against `fake`."""
    personas = dict(sections.pop("personas", {}))
    if model is not None:
        personas["remote"] = model.persona()
    config = make_config(tmp_path, *models, slack={"api_base_url": fake.api_url, "http_port": 0, **(slack or {})},
                         personas=personas, **sections)
    service = await open_service(config)
    adapter = SlackAdapter(service, make_settings(config, environ(fake)), ping_interval=ping_interval,
                           edit_budget=edit_budget)
    try:
        await adapter.start()
        yield adapter
    finally:
        if model is not None:
            model.end_all()
        await adapter.stop()
        await service.close()


def bot_messages(fake: FakeSlack, channel: str, thread_ts: str | None = None) -> list[dict]:
    return [m for m in fake.messages
            if m.get("bot_id") == fake.bot_id and m["channel"] == channel and m.get("thread_ts") == thread_ts]


def is_final(message: dict) -> bool:
    return message["text"] != PLACEHOLDER and not message["text"].endswith(STREAMING_MARK)


async def bot_replies(fake: FakeSlack, channel: str, thread_ts: str | None = None, count: int = 1,
                      timeout: float = 30) -> list[str]:
    """The bot's messages at (channel, thread), once at least `count` are there and all are final."""

    def done():
        messages = bot_messages(fake, channel, thread_ts)
        if len(messages) >= count and all(is_final(m) for m in messages):
            return [m["text"] for m in messages]
        return None

    return await fake.wait_for(done, timeout, f"{count} final bot message(s) in {channel} thread {thread_ts}")


async def turns(adapter: SlackAdapter, scope: str) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in await adapter.service.store.recent_turns(ConversationKey("slack", scope), 50)]


def requests(adapter: SlackAdapter, outcome: str = "ok") -> float:
    """Chat requests the service handled from Slack with this outcome (its Prometheus counter)."""
    return sum(
        sample.value
        for metric in adapter.service.metrics.registry.collect() if metric.name == "ttt_requests"
        for sample in metric.samples
        if sample.name == "ttt_requests_total"
        and sample.labels["adapter"] == "slack" and sample.labels["outcome"] == outcome
    )


def adapter_up(adapter: SlackAdapter) -> float | None:
    return adapter.service.metrics.registry.get_sample_value("ttt_adapter_up", {"adapter": "slack"})


async def all_acked(fake: FakeSlack) -> None:
    await fake.wait_for(lambda: all(e.acked for e in fake.envelopes.values()), 10, "every envelope acked")
    assert fake.envelopes and max(e.ack_latency for e in fake.envelopes.values()) < 3


async def command(fake: FakeSlack, text: str, channel: str = "D0ALICE", user: str = "U0ALICE",
                  name: str = "/ttt") -> str:
    """Run a slash command; its (ephemeral) response text."""
    before = len(fake.response_url_posts)
    assert await fake.send_slash_command(name, text, user_id=user, channel_id=channel) is None  # acked at once
    await fake.wait_for(lambda: len(fake.response_url_posts) > before, 10, f"the response to {name} {text}")
    body = fake.response_url_posts[before]["body"]
    assert body["response_type"] == "ephemeral"
    return body["text"]


# ---- answering ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_mention_answered_in_its_thread_and_followups_need_no_mention(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        assert adapter_up(bot) == 1
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is river")
        envelope = await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["river!"]
        assert (await fake.wait_for_ack(envelope)).ack_latency < 3
        placeholder = fake.calls_to("chat.postMessage")[0].params
        assert placeholder["text"] == PLACEHOLDER and placeholder["thread_ts"] == mention["ts"]
        assert fake.calls_to("chat.update")[-1].params["text"] == "river!"

        # Channel talk without a mention, and threads the bot is not part of, are not for it.
        chatter = fake.channel_message("C0GENERAL", "U0BOB", "the word is tiger")
        await fake.send_event(chatter)
        await fake.send_event(fake.channel_message("C0GENERAL", "U0BOB", "again", thread_ts=chatter["ts"]))
        await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["river!", "river!"]
        assert await turns(bot, f"C0GENERAL/{mention['ts']}") == [
            ("user", "the word is river"), ("bot", "river!"), ("user", "again"), ("bot", "river!")]
        stored = await bot.service.store.recent_turns(ConversationKey("slack", f"C0GENERAL/{mention['ts']}"), 4)
        assert [t.persona for t in stored] == ["words"] * 4
        assert bot_messages(fake, "C0GENERAL") == [] and bot_messages(fake, "C0GENERAL", chatter["ts"]) == []
        assert stored[0].author == "user_u0alice" and fake.calls_to("users.info")[0].params == {"user": "U0ALICE"}
        await all_acked(fake)


@pytest.mark.timeout(120)
async def test_direct_messages_answered_directly_and_dm_threads_apart(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        first = fake.dm("D0ALICE", "U0ALICE", "the word is piano")
        await fake.send_event(first)
        assert await bot_replies(fake, "D0ALICE") == ["piano!"]
        await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "again"))
        assert await bot_replies(fake, "D0ALICE", count=2) == ["piano!", "piano!"]

        threaded = fake.dm("D0ALICE", "U0ALICE", "the word is lemon", thread_ts=first["ts"])
        await fake.send_event(threaded)
        assert await bot_replies(fake, "D0ALICE", first["ts"]) == ["lemon!"]
        assert len(await turns(bot, "D0ALICE")) == 4
        assert await turns(bot, f"D0ALICE/{first['ts']}") == [("user", "the word is lemon"), ("bot", "lemon!")]
        await all_acked(fake)


@pytest.mark.timeout(120)
async def test_two_threads_at_once_keep_their_own_context(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        a = fake.app_mention("C0GENERAL", "U0ALICE", "the word is apple")
        b = fake.app_mention("C0GENERAL", "U0BOB", "the word is tiger")
        await asyncio.gather(fake.send_event(a), fake.send_event(b))
        assert await bot_replies(fake, "C0GENERAL", a["ts"]) == ["apple!"]
        assert await bot_replies(fake, "C0GENERAL", b["ts"]) == ["tiger!"]
        await asyncio.gather(
            fake.send_event(fake.channel_message("C0GENERAL", "U0BOB", "again", thread_ts=b["ts"])),
            fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=a["ts"])),
        )
        assert await bot_replies(fake, "C0GENERAL", a["ts"], count=2) == ["apple!", "apple!"]
        assert await bot_replies(fake, "C0GENERAL", b["ts"], count=2) == ["tiger!", "tiger!"]
        assert [t[1] for t in await turns(bot, f"C0GENERAL/{b['ts']}")] == ["the word is tiger", "tiger!",
                                                                             "again", "tiger!"]


@pytest.mark.timeout(120)
async def test_followups_can_be_switched_off(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, slack={"thread_followups": False}) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is falcon")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["falcon!"]
        await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        await fake.send_event(fake.app_mention("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["falcon!", "falcon!"]
        assert len(await turns(bot, f"C0GENERAL/{mention['ts']}")) == 4


@pytest.mark.timeout(120)
async def test_bot_messages_are_ignored(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is meadow")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["meadow!"]
        # The fake echoes the bot's own posts back as message events, as Slack does (bolt drops
        # them); another bot's messages in the thread or a DM are dropped by the adapter.
        other = fake.channel_message("C0GENERAL", "U0OTHER", "again", thread_ts=mention["ts"])
        await fake.send_event({**other, "bot_id": "B0OTHER", "subtype": "bot_message"})
        await fake.send_event({**fake.dm("D0OTHER", "U0OTHER", "the word is harbor"), "bot_id": "B0OTHER"})
        await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["meadow!", "meadow!"]
        assert bot_messages(fake, "D0OTHER") == []
        assert requests(bot) == 2
        echoes = [e for e in fake.envelopes.values() if e.payload["event"].get("bot_id") == fake.bot_id]
        assert len(echoes) == 2  # both placeholders were echoed back, and never answered
        await all_acked(fake)


@pytest.mark.timeout(120)
async def test_retried_or_duplicate_delivery_answered_once(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is cloud")
        envelopes = [await fake.send_event(mention, event_id="Ev0MENTION")]
        envelopes.append(await fake.send_event(mention, event_id="Ev0MENTION", retry_num=1, retry_reason="timeout"))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["cloud!"]
        # A late retry, the same message under another event id, and its message.channels twin.
        envelopes.append(await fake.send_event(mention, event_id="Ev0MENTION", retry_num=2, retry_reason="timeout"))
        envelopes.append(await fake.send_event(mention, event_id="Ev0SAMETS"))
        envelopes.append(await fake.send_event({**mention, "type": "message", "channel_type": "channel"}))
        later = fake.app_mention("C0GENERAL", "U0BOB", "the word is tiger")
        await fake.send_event(later)
        assert await bot_replies(fake, "C0GENERAL", later["ts"]) == ["tiger!"]

        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["cloud!"]
        assert await turns(bot, f"C0GENERAL/{mention['ts']}") == [("user", "the word is cloud"), ("bot", "cloud!")]
        assert requests(bot) == 2
        for envelope in envelopes:
            assert (await fake.wait_for_ack(envelope)).ack_latency < 3
        await all_acked(fake)


# ---- slash command and personas -------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_slash_command_answers_ephemerally(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, slack={"slash_command": "/talk"}) as bot:
        helped = await command(fake, "help", name="/talk")
        assert "`/talk reset`" in helped and "`/talk persona NAME`" in helped and "`/talk forget-me`" in helped
        assert await command(fake, "", name="/talk") == helped
        listed = await command(fake, "personas", name="/talk")
        assert "*words* (current)" in listed and "*wordchat*" in listed and "**" not in listed
        assert "There is no persona called 'nope'" in await command(fake, "persona nope", name="/talk")
        assert await command(fake, "persona wordchat", name="/talk") == "Switched to *wordchat*: word game, chat format"

        await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "the word is lemon"))
        assert await bot_replies(fake, "D0ALICE") == ["lemon!"]
        stored = await bot.service.store.recent_turns(ConversationKey("slack", "D0ALICE"), 10)
        assert [t.persona for t in stored] == ["wordchat", "wordchat"]

        assert "forgotten" in await command(fake, "reset", name="/talk")
        assert await turns(bot, "D0ALICE") == []
        assert await command(fake, "reset", channel="C0GENERAL", name="/talk") == CHANNEL_RESET
        assert fake.ephemerals == [] and bot_messages(fake, "C0GENERAL") == []
        await all_acked(fake)


@pytest.mark.timeout(180)
async def test_channel_persona_and_threads_survive_a_restart(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models) as bot:
        assert "Switched to *wordchat*" in await command(fake, "persona wordchat", channel="C0GENERAL")
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is lemon")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["lemon!"]
        elsewhere = fake.app_mention("C0RANDOM", "U0ALICE", "the word is candle")
        await fake.send_event(elsewhere)
        assert await bot_replies(fake, "C0RANDOM", elsewhere["ts"]) == ["candle!"]

    async with slack_bot(tmp_path, fake, models) as bot:  # a new process on the same database
        assert "*wordchat*" in await command(fake, "persona", channel="C0GENERAL")
        await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["lemon!", "lemon!"]
        thread = ConversationKey("slack", f"C0GENERAL/{mention['ts']}")
        assert [t.persona for t in await bot.service.store.recent_turns(thread, 10)] == ["wordchat"] * 4
        other = await bot.service.store.recent_turns(ConversationKey("slack", f"C0RANDOM/{elsewhere['ts']}"), 10)
        assert [t.persona for t in other] == ["words", "words"]


@pytest.mark.timeout(120)
async def test_persona_switch_rule_and_forget_me(tmp_path, fake, models):
    fake.users["U0ADMIN"] = {"id": "U0ADMIN", "name": "admin", "is_admin": True, "profile": {"display_name": "admin"}}
    async with slack_bot(tmp_path, fake, models, slack={"persona_switch": "admins"}) as bot:
        assert "Only workspace admins" in await command(fake, "persona wordchat", channel="C0RANDOM")
        assert await bot.service.store.persona(ConversationKey("slack", "C0RANDOM")) is None
        assert "currently *words*" in await command(fake, "persona", channel="C0RANDOM")  # looking is free
        assert "Switched to *wordchat*" in await command(fake, "persona wordchat", channel="C0RANDOM",
                                                         user="U0ADMIN")
        assert "Switched to *wordchat*" in await command(fake, "persona wordchat", channel="D0BOB", user="U0BOB")

        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is apple")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["apple!"]
        await fake.send_event(fake.channel_message("C0GENERAL", "U0BOB", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["apple!", "apple!"]
        await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "the word is lemon"))
        assert await bot_replies(fake, "D0ALICE") == ["lemon!"]

        # Everything alice wrote, in every conversation, with the replies to it; bob's words stay.
        done = await command(fake, "forget-me", channel="C0RANDOM")
        assert "deleted everything you wrote" in done and "4 message" in done
        assert await turns(bot, f"C0GENERAL/{mention['ts']}") == [("user", "again"), ("bot", "apple!")]
        assert await turns(bot, "D0ALICE") == []


# ---- control and bad input ------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_access_control_and_rate_limit(tmp_path, fake, models):
    slack = {"allowed_channels": ["C0OK"], "allowed_users": ["U0ALICE", "U0BOB"], "rate_limit_per_minute": 2}
    async with slack_bot(tmp_path, fake, models, slack=slack) as bot:
        stranger = fake.app_mention("C0OK", "U0EVE", "the word is apple")
        await fake.send_event(stranger)
        await fake.send_event(fake.app_mention("C0ELSEWHERE", "U0ALICE", "the word is apple"))
        await fake.send_event(fake.dm("D0EVE", "U0EVE", "the word is apple"))
        assert await command(fake, "help", channel="D0EVE", user="U0EVE") == NOT_HERE
        assert await command(fake, "personas", channel="C0ELSEWHERE") == NOT_HERE

        threads = []
        for word in ("apple", "tiger"):
            mention = fake.app_mention("C0OK", "U0ALICE", f"the word is {word}")
            threads.append(mention["ts"])
            await fake.send_event(mention)
            assert await bot_replies(fake, "C0OK", mention["ts"]) == [f"{word}!"]
        # Over the limit: told once (privately), then quiet. The empty message last is answered
        # (it counts for nothing), so the ones before it were handled by then.
        for word in ("piano", "lemon", "cloud", ""):
            await fake.send_event(fake.dm("D0ALICE", "U0ALICE", f"the word is {word}" if word else ""))
        assert (await bot_replies(fake, "D0ALICE"))[0].startswith("I didn't catch any words")
        [notice] = fake.ephemerals
        assert (notice["channel"], notice["user"], notice.get("thread_ts")) == ("D0ALICE", "U0ALICE", None)
        assert "faster than I can answer" in notice["text"]

        bob = fake.app_mention("C0OK", "U0BOB", "the word is river")  # the limit is per user
        await fake.send_event(bob)
        assert await bot_replies(fake, "C0OK", bob["ts"]) == ["river!"]
        await fake.send_event(fake.dm("D0BOB", "U0BOB", "the word is cloud"))  # DMs: users only
        assert await bot_replies(fake, "D0BOB") == ["cloud!"]

        assert bot_messages(fake, "C0OK", stranger["ts"]) == []
        assert bot_messages(fake, "C0ELSEWHERE") == [] and bot_messages(fake, "D0EVE") == []
        assert {m["channel"] for m in fake.posted} == {"C0OK", "D0BOB", "D0ALICE"}
        assert len(fake.ephemerals) == 1 and requests(bot) == 4
        await all_acked(fake)


@pytest.mark.timeout(120)
async def test_bad_input_gets_a_short_answer_and_uses_up_nothing(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, service={"max_input_chars": 40},
                         slack={"rate_limit_per_minute": 1}) as bot:
        long = fake.app_mention("C0GENERAL", "U0ALICE", "the word is " + "apple " * 10)
        empty = fake.app_mention("C0GENERAL", "U0ALICE", "")
        await fake.send_event(long)
        await fake.send_event(empty)
        assert await bot_replies(fake, "C0GENERAL", long["ts"]) == [
            "That message is a bit long for me: please keep it under 40 characters."]
        assert await bot_replies(fake, "C0GENERAL", empty["ts"]) == [
            "I didn't catch any words there. Say something after the mention!"]
        assert await turns(bot, f"C0GENERAL/{long['ts']}") == [] and requests(bot, "rejected") == 2
        # Rejected messages do not count: alice's one message a minute is still hers.
        fine = fake.app_mention("C0GENERAL", "U0ALICE", "the word is apple")
        await fake.send_event(fine)
        assert await bot_replies(fake, "C0GENERAL", fine["ts"]) == ["apple!"]
        assert fake.ephemerals == []


# ---- safety, streaming, long replies (scripted model) ----------------------------------------


@pytest.mark.timeout(120)
async def test_mentions_read_as_names_and_model_output_cannot_ping(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"}) as bot:
        # What a user typed literally as "<!channel>" reaches the bot escaped, as Slack sends it.
        text = "hi <@U0BOB> see <#C0RANDOM|random> and <https://example.com|this>: &lt;!channel&gt; &amp; co"
        mention = fake.app_mention("C0GENERAL", "U0ALICE", text)
        await fake.send_event(mention)
        request = await model.request(0)
        assert request["messages"][-1] == {
            "role": "user", "content": "hi @user_u0bob see #random and this: <!channel> & co"}
        model.say(0, "Hey <!channel> and <!here>, ", "<!everyone> <@U0BOB> <!subteam^S0TEAM|@devs> @here ",
                  "**bold** & <b>x</b>")
        model.end(0)
        [shown] = await bot_replies(fake, "C0GENERAL", mention["ts"])
        assert "<" not in shown and ">" not in shown  # so no <!channel>, <!here>, <!everyone>, <@U...>
        for word in ("channel", "here", "everyone", "U0BOB", "subteam"):
            assert f"@\u200b{word}" in shown and f"@{word}" not in shown
        assert "*bold* &amp; &lt;b&gt;x&lt;/b&gt;" in shown
        [(_, said), (_, answered)] = await turns(bot, f"C0GENERAL/{mention['ts']}")
        assert said == "hi @user_u0bob see #random and this: <!channel> & co"
        assert "<!channel>" not in answered and "<@U0BOB>" not in answered


@pytest.mark.timeout(120)
async def test_slow_reply_streams_into_edits_at_most_once_per_interval(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"},
                         slack={"stream_edit_interval_s": 0.5}) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "count for me")
        envelope = await fake.send_event(mention)
        await model.request(0)  # the model is working on it, and the event is already acknowledged
        assert (await fake.wait_for_ack(envelope)).ack_latency < 3
        await fake.wait_for_message("C0GENERAL", lambda m: m["text"] == PLACEHOLDER)

        model.say(0, "one.")  # streamed text is shown a screened sentence at a time
        await fake.wait_for_message("C0GENERAL", lambda m: m["text"] == "one." + STREAMING_MARK)
        model.say(0, " two.", " three.")
        await fake.wait_for_message("C0GENERAL", lambda m: m["text"] == "one. two. three." + STREAMING_MARK)
        numbers = " ".join(f"Number {i} comes after {i - 1}." for i in range(1, 400))
        model.say(0, " " + numbers)
        model.end(0)
        pieces = await bot_replies(fake, "C0GENERAL", mention["ts"], count=3)
        assert len(pieces) == 3 and all(len(p) <= MESSAGE_LIMIT for p in pieces)
        assert " ".join(pieces) == "one. two. three. " + numbers
        assert all(p.endswith(".") for p in pieces)  # cut between sentences
        assert await turns(bot, f"C0GENERAL/{mention['ts']}") == [
            ("user", "count for me"), ("bot", "one. two. three. " + numbers)]

        streaming = [c.at for c in fake.calls_to("chat.update") if c.params["text"].endswith(STREAMING_MARK)]
        assert len(streaming) >= 2
        assert all(later - earlier >= 0.45 for earlier, later in zip(streaming, streaming[1:]))


@pytest.mark.timeout(120)
async def test_followup_while_the_first_reply_is_written_is_answered_after_it(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"}) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "tell me a story")
        await fake.send_event(mention)
        await model.request(0)  # nothing of this thread is stored yet
        followup = await fake.send_event(
            fake.channel_message("C0GENERAL", "U0ALICE", "a long one", thread_ts=mention["ts"]))
        await fake.wait_for_ack(followup)
        model.say(0, "Once upon a time.")
        model.end(0)
        second = await model.request(1)
        assert [m["content"] for m in second["messages"]] == ["tell me a story", "Once upon a time.", "a long one"]
        model.say(1, "The end.")
        model.end(1)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["Once upon a time.", "The end."]
        assert len(await turns(bot, f"C0GENERAL/{mention['ts']}")) == 4


@pytest.mark.timeout(120)
async def test_stop_lets_replies_in_flight_finish(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"}) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "take your time")
        await fake.send_event(mention)
        await model.request(0)
        stopping = asyncio.create_task(bot.stop())
        await fake.wait_for(lambda: fake.open_sockets == 0, 10, "the socket closed")
        assert not stopping.done()
        model.say(0, "finished anyway")
        model.end(0)
        await asyncio.wait_for(stopping, 10)
        assert [m["text"] for m in bot_messages(fake, "C0GENERAL", mention["ts"])] == ["finished anyway"]
        assert await turns(bot, f"C0GENERAL/{mention['ts']}") == [("user", "take your time"),
                                                                  ("bot", "finished anyway")]
        assert adapter_up(bot) == 0


@pytest.mark.timeout(120)
async def test_messages_of_a_conversation_are_answered_in_arrival_order(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"}) as bot:
        await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "hello"))
        await model.request(0)
        model.say(0, "hi")
        model.end(0)
        assert await bot_replies(fake, "D0ALICE") == ["hi"]
        # The first message needs a slow look-up (whose name is <@U0BOB>?), the second none.
        slow_lookup = fake.hold("users.info", user="U0BOB")
        first = await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "ask <@U0BOB>"))
        second = await fake.send_event(fake.dm("D0ALICE", "U0ALICE", "and then?"))
        await fake.wait_for_ack(first)
        await fake.wait_for_ack(second)
        with pytest.raises(asyncio.TimeoutError):  # the second waits for the first
            await model.request(1, timeout=0.5)
        slow_lookup.set()
        assert (await model.request(1))["messages"][-1]["content"] == "ask @user_u0bob"
        model.say(1, "asked")
        model.end(1)
        assert (await model.request(2))["messages"][-1]["content"] == "and then?"
        model.say(2, "then this")
        model.end(2)
        assert await bot_replies(fake, "D0ALICE", count=3) == ["hi", "asked", "then this"]
        assert [text for _, text in await turns(bot, "D0ALICE")] == [
            "hello", "hi", "ask @user_u0bob", "asked", "and then?", "then this"]


@pytest.mark.timeout(120)
async def test_replies_streaming_at_once_share_the_workspace_edit_limit(tmp_path, fake, models, model):
    # Slack allows about 50 chat.update a minute per workspace; here 15 a second, with a budget of 10.
    fake.rate_limits["chat.update"] = (15, 1.0)
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"},
                         slack={"stream_edit_interval_s": 0.01}, edit_budget=EditBudget(10, 1.0)) as bot:
        rooms = ["C0ONE", "C0TWO", "C0SIX"]
        mentions = {room: fake.app_mention(room, "U0ALICE", f"count in {room}") for room in rooms}
        for mention in mentions.values():
            await fake.send_event(mention)
        streams = {}  # room -> its request's number at the model
        for n in range(3):
            streams[(await model.request(n))["messages"][-1]["content"].split()[-1]] = n

        def shown(room: str, text: str) -> bool:
            return any(text in m["text"] for m in bot_messages(fake, room, mentions[room]["ts"]))

        for i in range(8):  # each sentence shown before the next is said: one edit each
            for room in rooms:
                model.say(streams[room], f" Step {i}.")
            await fake.wait_for(lambda: all(shown(room, f"Step {i}.") for room in rooms), 20, f"step {i} everywhere")
        for room in rooms:
            model.end(streams[room])
        whole = " ".join(f"Step {i}." for i in range(8))
        for room in rooms:
            assert await bot_replies(fake, room, mentions[room]["ts"]) == [whole]
        assert len(fake.calls_to("chat.update")) >= 27  # all went through, slowed down (no 429: see `fake`)


@pytest.mark.timeout(120)
async def test_a_stored_reply_reaches_the_user_when_showing_it_fails(tmp_path, fake, models, model, caplog):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"},
                         slack={"stream_edit_interval_s": 0.01}) as bot:
        once = fake.app_mention("C0GENERAL", "U0ALICE", "first")
        await fake.send_event(once)
        await model.request(0)
        model.say(0, "Half.")
        await fake.wait_for_message("C0GENERAL", lambda m: m["text"] == "Half." + STREAMING_MARK)
        final = lambda params: not params["text"].endswith(STREAMING_MARK)  # noqa: E731
        fake.inject_error("chat.update", "internal_error", when=final)  # the final edit fails once: retried
        model.say(0, " Whole.")
        model.end(0)
        assert await bot_replies(fake, "C0GENERAL", once["ts"]) == ["Half. Whole."]

        gone = fake.app_mention("C0GENERAL", "U0ALICE", "second")
        await fake.send_event(gone)
        await model.request(1)
        model.say(1, "Half.")
        await fake.wait_for(lambda: any(m["text"] == "Half." + STREAMING_MARK
                                        for m in bot_messages(fake, "C0GENERAL", gone["ts"])), 10, "half")
        fake.inject_error("chat.update", "message_not_found", times=3, when=final)  # every try fails: posted anew
        model.say(1, " Whole.")
        model.end(1)
        assert await bot_replies(fake, "C0GENERAL", gone["ts"]) == ["Half. Whole."]
        assert fake.deleted and APOLOGY not in str(fake.posted)
        assert await turns(bot, f"C0GENERAL/{gone['ts']}") == [("user", "second"), ("bot", "Half. Whole.")]


# ---- faults -------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_busy_generator_gets_a_busy_reply(tmp_path, fake, models, model):
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"},
                         generator={"max_queue": 1}) as bot:
        first = fake.app_mention("C0GENERAL", "U0ALICE", "think hard")
        await fake.send_event(first)
        await model.request(0)
        second = fake.app_mention("C0GENERAL", "U0BOB", "me too")
        await fake.send_event(second)
        [busy] = await bot_replies(fake, "C0GENERAL", second["ts"])
        assert busy == "I'm busy with a lot of conversations right now; try again in a moment."
        model.say(0, "done thinking")
        model.end(0)
        assert await bot_replies(fake, "C0GENERAL", first["ts"]) == ["done thinking"]
        assert await turns(bot, f"C0GENERAL/{second['ts']}") == [] and len(model.requests) == 1
        assert requests(bot, "busy") == 1


@pytest.mark.timeout(120)
async def test_failed_or_timed_out_generation_apologizes(tmp_path, fake, models, model, caplog):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    personas = {"broken": {"model": str(broken), "format": "dialogpt"}}
    async with slack_bot(tmp_path, fake, models, model=model, service={"default_persona": "remote"},
                         generator={"request_timeout_s": 3}, personas=personas) as bot:
        model.fail_with = 500
        failing = fake.app_mention("C0GENERAL", "U0ALICE", "hello")
        with caplog.at_level(logging.WARNING):
            await fake.send_event(failing)
            assert await bot_replies(fake, "C0GENERAL", failing["ts"]) == [
                "Sorry, something went wrong while I was thinking. Please try again."]
        assert any(r.exc_info and "generation failed" in r.getMessage() for r in caplog.records)

        # A reply that stops halfway: what was shown (two messages, it was long) becomes the apology.
        model.fail_with = None
        slow = fake.app_mention("C0GENERAL", "U0ALICE", "hello again")
        await fake.send_event(slow)
        await model.request(1)
        model.say(1, " ".join(str(i) for i in range(1500)))
        await fake.wait_for(lambda: len(bot_messages(fake, "C0GENERAL", slow["ts"])) == 2, 10, "two messages")
        assert await bot_replies(fake, "C0GENERAL", slow["ts"]) == [  # a timeout says so
            "That took me too long to answer (a lot of conversations at once); try again in a moment."]
        assert len(fake.deleted) == 1

        assert "Switched to *broken*" in await command(fake, "persona broken", channel="C0BROKEN")
        unloadable = fake.app_mention("C0BROKEN", "U0ALICE", "hello")
        await fake.send_event(unloadable)
        [apology] = await bot_replies(fake, "C0BROKEN", unloadable["ts"])
        assert apology.startswith("Persona 'broken' is unavailable")
        for thread in (f"C0GENERAL/{failing['ts']}", f"C0GENERAL/{slow['ts']}", f"C0BROKEN/{unloadable['ts']}"):
            assert await turns(bot, thread) == []


# ---- connection: HTTP mode, reconnects ------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_http_mode_checks_signatures_and_answers_once(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, slack={"mode": "http"}) as bot:
        async with aiohttp.ClientSession() as http:

            async def deliver(event: dict, secret: str = SIGNING_SECRET, **headers) -> int:
                body = json.dumps(fake.event_payload(event, event_id=f"Ev{event['ts']}")).encode()
                signed = {**fake.signed_request_headers(body, secret, headers.pop("timestamp", None)), **headers}
                async with http.post(bot.url, data=body, headers=signed) as response:
                    return response.status

            forged = fake.app_mention("C0GENERAL", "U0EVE", "the word is tiger")
            assert await deliver(forged, "wrong-secret") == 401
            assert await deliver(forged, timestamp=int(time.time()) - 600) == 401  # stale: a replay

            mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is silver")
            started = time.monotonic()
            assert await deliver(mention) == 200
            assert time.monotonic() - started < 3
            assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["silver!"]
            retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
            assert await deliver(mention, **retry) == 200
            later = fake.app_mention("C0GENERAL", "U0BOB", "the word is copper")
            assert await deliver(later) == 200
        assert await bot_replies(fake, "C0GENERAL", later["ts"]) == ["copper!"]
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["silver!"]
        assert bot_messages(fake, "C0GENERAL", forged["ts"]) == []
        assert await turns(bot, f"C0GENERAL/{forged['ts']}") == []
        assert len(await turns(bot, f"C0GENERAL/{mention['ts']}")) == 2 and requests(bot) == 2
        assert fake.connections == 0 and fake.calls_to("apps.connections.open") == []


@pytest.mark.timeout(120)
async def test_two_replicas_answer_an_event_once(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, slack={"mode": "http"}) as one, \
            slack_bot(tmp_path, fake, models, slack={"mode": "http"}) as two:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is silver")
        body = json.dumps(fake.event_payload(mention, event_id="Ev0SILVER")).encode()
        async with aiohttp.ClientSession() as http:
            for replica in (one, two):  # a retry that the load balancer sent to the other replica
                headers = fake.signed_request_headers(body, SIGNING_SECRET)
                async with http.post(replica.url, data=body, headers=headers) as response:
                    assert response.status == 200
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["silver!"]
        later = fake.app_mention("C0GENERAL", "U0BOB", "the word is copper")
        async with aiohttp.ClientSession() as http:
            body = json.dumps(fake.event_payload(later)).encode()
            async with http.post(two.url, data=body, headers=fake.signed_request_headers(body, SIGNING_SECRET)):
                pass
        assert await bot_replies(fake, "C0GENERAL", later["ts"]) == ["copper!"]
        assert len(bot_messages(fake, "C0GENERAL", mention["ts"])) == 1 and requests(one) + requests(two) == 2


@pytest.mark.timeout(120)
async def test_socket_mode_reconnects_and_keeps_the_conversation(tmp_path, fake, models):
    async with slack_bot(tmp_path, fake, models, ping_interval=1) as bot:
        mention = fake.app_mention("C0GENERAL", "U0ALICE", "the word is copper")
        await fake.send_event(mention)
        assert await bot_replies(fake, "C0GENERAL", mention["ts"]) == ["copper!"]
        await fake.drop_socket(abrupt=True)
        await fake.wait_for_connections(2, timeout=30)
        await fake.send_event(fake.channel_message("C0GENERAL", "U0ALICE", "again", thread_ts=mention["ts"]))
        assert await bot_replies(fake, "C0GENERAL", mention["ts"], count=2) == ["copper!", "copper!"]
        assert len(await turns(bot, f"C0GENERAL/{mention['ts']}")) == 4
        await fake.wait_for(lambda: adapter_up(bot) == 1, 10, "adapter_up back to 1")


@pytest.mark.timeout(60)
async def test_create_adapter_uses_the_configured_api_base_url(tmp_path, fake, models):
    config = make_config(tmp_path, *models, slack={"api_base_url": fake.api_url.rstrip("/")})
    service = await open_service(config)
    adapter = create_adapter(service, make_settings(config, environ(fake)))
    try:
        await adapter.start()
        await fake.wait_for_connections(1)
        assert [c.method for c in fake.calls] == ["auth.test", "apps.connections.open", "apps.connections.open"]
        assert adapter.bot_user_id == fake.bot_user_id
    finally:
        await adapter.stop()
        await service.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret", ["SLACK_BOT_TOKEN", "SLACK_APP_TOKEN"])
async def test_a_rejected_token_is_found_by_check_and_stops_serve(tmp_path, fake, models, capsys, caplog, secret):
    config = make_config(tmp_path, *models, slack={"api_base_url": fake.api_url, "http_port": 0})
    wrong = make_settings(config, {**environ(fake), secret: "xoxb-not-the-token-2c9f"})
    assert await check(wrong) == 2
    out, err = capsys.readouterr()
    assert f"PROBLEM: slack: Slack rejected {secret} (invalid_auth)" in err and "not-the-token" not in out + err
    assert await serve(wrong) == 2
    assert f"slack adapter could not start: Slack rejected {secret} (invalid_auth)" in caplog.text
    assert await check(make_settings(config, environ(fake))) == 0
    assert "slack    starts" in capsys.readouterr().out
