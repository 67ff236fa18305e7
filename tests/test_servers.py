"""Server settings, token budgets and usage through the ChatService, on both stores (SQLite and a
real PostgreSQL): what a server's admins set, what the host's config.yaml allows, what is counted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from pathlib import Path

import pytest

from conftest import make_config
from core import servers
from core.budgets import utc_day
from core.config.schema import LimitsSection, PersonaConfig
from core.conversation import ConversationKey
from core.errors import OverBudget
from core.service import open_service
from fakes.scripted_model import ScriptedModel
from pg import pg_url, postgres  # noqa: F401 (fixtures)

GUILD = "9"
CHANNEL = ConversationKey("discord", "100", server=GUILD)
THREAD = ConversationKey("discord", "101", parent="100", server=GUILD)
NEW_CHANNEL = ConversationKey("discord", "102", server=GUILD)
ELSEWHERE = ConversationKey("discord", "200", server="8")
DM = ConversationKey("discord", "300")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> dict:
    return {"url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}


@pytest.fixture
def serving(tmp_path, word_model_dir, word_chat_model_dir, database):
    """serving(**sections) -> a ChatService (async context) on the test's database; several share it."""

    @contextlib.asynccontextmanager
    async def serve(**sections):
        personas = sections.pop("personas", {})
        config = make_config(tmp_path, word_model_dir, word_chat_model_dir, database=database, **sections)
        config.personas.update({name: PersonaConfig.model_validate(p) for name, p in personas.items()})
        service = await open_service(config)
        try:
            yield service
        finally:
            await service.close()

    return serve


async def server(service, words: str, *, admin: bool = True, key: ConversationKey = CHANNEL) -> str:
    return await service.command(key, "server", words, author_id="1", admin=admin)


def sample(service, name: str, **labels) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.timeout(90)
async def test_the_server_persona_answers_in_channels_that_chose_none(serving):
    async with serving() as service, serving() as replica:
        await service.set_persona(CHANNEL, "words")  # this channel chose its own
        assert "answer as **wordchat**" in await server(service, "persona wordchat")
        # Applies at once, on every replica: a new channel, a thread of a channel that chose none.
        assert (await replica.persona_for(NEW_CHANNEL)).name == "wordchat"
        assert (await replica.persona_for(ConversationKey("discord", "103", parent="102", server=GUILD))).name \
            == "wordchat"
        assert (await replica.persona_for(CHANNEL)).name == "words"
        assert (await replica.persona_for(THREAD)).name == "words"  # its channel's choice
        assert (await replica.persona_for(ELSEWHERE)).name == "words"  # another server
        assert (await replica.persona_for(DM)).name == "words"  # no server: the host's default
        assert await replica.reply(NEW_CHANNEL, "alice", "the word is tiger", adapter="test") == "tiger!"
        assert [t.persona for t in await replica.history(NEW_CHANNEL)] == ["wordchat", "wordchat"]
        assert "**wordchat**" in await server(replica, "show")

        assert "answer as the host's default" in await server(replica, "persona clear")
        assert (await service.persona_for(NEW_CHANNEL)).name == "words"


@pytest.mark.timeout(90)
async def test_only_admins_in_a_server_and_bad_values_change_nothing(serving):
    async with serving(limits={"tokens_per_person_per_day": 500}, discord={"rate_limit_per_minute": 6}) as service:
        assert await server(service, "persona wordchat", admin=False) == servers.ADMINS_ONLY
        assert await server(service, "show", admin=False) == servers.ADMINS_ONLY
        assert await server(service, "persona wordchat", key=DM) == servers.NO_SERVER
        before = await server(service, "show")
        refusals = {
            "persona nope": "no persona called 'nope'",
            "persona missing": "train it first",  # exists, but cannot be served
            "persona": "Name the persona",
            "prompt": "Give the prompt's text",
            "prompt " + "x" * 2001: "keep it to 2000",
            "rate-limit fast": "whole number of messages",
            "rate-limit -1": "from 0",
            "rate-limit 7": "The host allows at most 6 messages per person per minute",
            "budget person 501": "The host allows at most 500 tokens per person per day",
            "budget everyone 5": "Say which budget",
            "budget server 1e9": "whole number of tokens",
            "volume 11": "There is no server setting 'volume'",
        }
        for words, why in refusals.items():
            assert why in await server(service, words), words
        assert await server(service, "show") == before
        assert (await service.persona_for(NEW_CHANNEL)).name == "words"

        assert "now 3 messages" in await server(service, "rate-limit 3")
        assert "now 200 tokens" in await server(service, "budget person 200")
        assert "now 5000 tokens" in await server(service, "budget server 5000")  # the host sets none
        shown = await server(service, "show")
        assert "rate-limit: 3 messages per person per minute (the host's: 6" in shown
        assert "budget person: 200 tokens per person per day (the host's: 500" in shown
        assert "budget server: 5000 tokens per day (the host's: no limit)" in shown
        assert "prompt is set" in await server(service, "prompt " + "y" * 2000)
        assert len(await server(service, "show")) < 2000  # one Discord message, however long the prompt
        assert "here is the host's" in await server(service, "budget person 0")
        assert "budget person: the host's (500 tokens per person per day)" in await server(service, "show")


@pytest.mark.timeout(90)
async def test_a_spent_person_budget_gets_one_private_notice_then_silence_while_others_are_answered(serving):
    async with serving(limits={"tokens_per_person_per_day": 5}, discord={"rate_limit_per_minute": 0}) as service:
        assert await service.reply(CHANNEL, "alice", "the word is apple", adapter="discord", author_id="a") == "apple!"
        # 4 of 5 tokens spent: the next reply is capped to the 1 left, and not cut after it starts.
        assert len(await service.reply(CHANNEL, "alice", "the word is apple", adapter="discord", author_id="a")) == 1
        assert "you have used 5 of 5 tokens here; this server has used 5 tokens (no daily limit)" in \
            await service.command(CHANNEL, "usage", author_id="a")

        first = await service.admit("the word is pear", key=CHANNEL, author_id="a")
        assert first.message is None
        assert first.private_notice == "You have used today's 5 tokens here; it resets at 00:00 UTC."
        again = await service.admit("the word is pear", key=NEW_CHANNEL, author_id="a")
        assert again.message is None and again.private_notice is None and again.notice is None  # silence

        bob = await service.admit("the word is river", key=NEW_CHANNEL, author_id="b")
        assert await service.reply(NEW_CHANNEL, "bob", bob.message, adapter="discord", author_id="b") == "river!"
        assert (await service.admit("hi", key=ELSEWHERE, author_id="a")).message is not None  # another server
        with pytest.raises(OverBudget):  # a caller without admission (the web page, a terminal) is refused too
            await service.reply(CHANNEL, "alice", "the word is pear", adapter="web", author_id="a")
        assert len(await service.history(CHANNEL)) == 4  # nothing stored for the refused ones

        assert sample(service, "ttt_budget_refusals_total", adapter="discord", budget="person") == 2
        assert sample(service, "ttt_budget_refusals_total", adapter="web", budget="person") == 1
        assert sample(service, "ttt_tokens_generated_total", adapter="discord", persona="words") == 5 + 3
        assert sample(service, "ttt_requests_total", adapter="discord", persona="?", outcome="over_budget") == 2

    async with serving(limits={"tokens_per_person_per_day": 5}) as restarted:  # the count is in the store
        assert (await restarted.admit("again", key=CHANNEL, author_id="a")).message is None


@pytest.mark.timeout(90)
async def test_a_server_budget_set_by_its_admins_is_shared_by_everyone_there(serving):
    async with serving(discord={"rate_limit_per_minute": 0}) as service:
        assert "now 6 tokens" in await server(service, "budget server 6")
        assert await service.reply(CHANNEL, "alice", "the word is apple", adapter="discord", author_id="a") == "apple!"
        assert len(await service.reply(NEW_CHANNEL, "bob", "the word is apple", adapter="discord",
                                       author_id="b")) < len("apple!")  # capped to the 2 tokens left
        refused = await service.admit("hello", key=CHANNEL, author_id="c")
        assert refused.private_notice == "This server has used today's 6 tokens; it resets at 00:00 UTC."
        assert "this server has used 6 of 6 tokens" in await service.command(CHANNEL, "usage", author_id="c")
        assert (await service.admit("hello", key=ELSEWHERE, author_id="c")).message is not None
        assert sample(service, "ttt_budget_refusals_total", adapter="discord", budget="server") == 1


@pytest.mark.timeout(60)
async def test_yesterdays_tokens_do_not_count_today(serving):
    async with serving(limits={"tokens_per_person_per_day": 5}) as service:
        await service.store.add_tokens(CHANNEL.server_id, "a", utc_day() - datetime.timedelta(days=1), 500)
        assert (await service.admit("hi", key=CHANNEL, author_id="a")).message is not None
        assert "you have used 0 of 5 tokens" in await service.command(CHANNEL, "usage", author_id="a")


@pytest.mark.timeout(60)
async def test_a_server_rate_limit_counts_within_the_hosts(serving):
    async with serving(discord={"rate_limit_per_minute": 4}) as service:
        assert "now 2 messages" in await server(service, "rate-limit 2")
        taken = [await service.admit("hi", key=CHANNEL, author_id="a") for _ in range(3)]
        assert [a.message is not None for a in taken] == [True, True, False]
        assert taken[2].slow_down and taken[2].slow_down > 0  # told once to slow down
        assert (await service.admit("hi", key=ELSEWHERE, author_id="a")).message is not None  # the host's 4 there


@pytest.mark.timeout(60)
async def test_max_new_tokens_is_capped_by_what_remains_and_the_server_prompt_reaches_chat_personas(serving):
    async with ScriptedModel() as model, serving(limits={"tokens_per_person_per_day": 10},
                                                 personas={"remote": model.persona()}) as service:
        assert "answer as **remote**" in await server(service, "persona remote")
        assert "prompt is set" in await server(service, "prompt Always answer like a pirate.")
        assert '"Always answer like a pirate."' in await server(service, "show")

        async def ask(n: int) -> dict:
            replying = asyncio.ensure_future(service.reply(CHANNEL, "alice", "hello", adapter="discord", author_id="a"))
            request = await model.request(n)
            model.say(n, "one", " two", " three")
            model.end(n)
            await replying
            return request

        first = await ask(0)
        assert first["max_tokens"] == 10
        assert first["messages"][0] == {"role": "system", "content": "Always answer like a pirate."}
        second = await ask(1)
        assert second["max_tokens"] == 7  # three streamed pieces counted as three tokens
        assert "prompt is removed" in await server(service, "prompt clear")
        third = await ask(2)
        assert third["messages"][0]["role"] == "user"  # no system prompt left


def test_readme_documents_the_commands_settings_and_metrics_by_their_names():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    discord = readme[readme.index("## Discord"):readme.index("## Slack")]
    slack = readme[readme.index("## Slack"):readme.index("## Server settings, token budgets and files")]
    for words in ("persona NAME", "prompt TEXT", "prompt clear", "rate-limit N", "budget person\\|server N", "show"):
        assert f"`/server {words}`" in discord, words
    assert "`/usage`" in discord and "`/ttt usage`" in slack
    assert all(f"`/ttt server {words}" in slack for words in ("persona", "prompt", "rate-limit", "budget", "show"))
    assert [key for key in LimitsSection.model_fields if f"| `{key}` |" not in readme] == []
    assert "`service.max_attachment_kb`" in readme
    assert "`ttt_tokens_generated_total{adapter,persona}`" in readme
    assert "`ttt_budget_refusals_total{adapter,budget}`" in readme
