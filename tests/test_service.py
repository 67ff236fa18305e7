"""ChatService: context, personas, commands, safety and durability, through real tiny models."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import make_config
from core.conversation import ConversationKey, Turn
from core.personas import PersonaUnavailable
from fakes.scripted_model import ScriptedModel
from core.safety import ZWSP, StreamScreen, degeneracy, is_offensive, neutralize_mentions
from core.errors import BUSY, TIMED_OUT, Busy, InputRejected, PersonaError, TimedOut, TooLong
from core.service import open_service
from fakes.openai_server import FakeOpenAIServer
from trap_model import PROMPT, TRAPS, cached_trap_model

KEY = ConversationKey("test", "room-1")


@pytest.mark.timeout(60)
async def test_reply_is_stored_before_the_final_update(service):
    seen_final = False
    async for update in service.respond(KEY, "alice", "the word is river", adapter="test"):
        if update.final:
            stored = await service.store.recent_turns(KEY, 10)
            assert [t.text for t in stored] == ["the word is river", "river!"]
            assert update.text == "river!"
            seen_final = True
        else:
            assert not await service.store.recent_turns(KEY, 10)
    assert seen_final
    assert await service.reply(KEY, "alice", "again", adapter="test") == "river!"


@pytest.mark.timeout(60)
async def test_commands_reset_and_persona_switch_persist_across_restart(tmp_path, word_model_dir, word_chat_model_dir):
    config = make_config(tmp_path, word_model_dir, word_chat_model_dir)
    service = await open_service(config)
    assert "wordchat" in await service.command(KEY, "personas")
    assert "reset" in await service.command(KEY, "help")
    assert "Switched to **wordchat**" in await service.command(KEY, "persona", "wordchat")
    assert await service.reply(KEY, "alice", "the word is tiger", adapter="test") == "tiger!"
    assert "no persona called 'nope'" in await service.command(KEY, "persona", "nope")
    untrained = await service.command(KEY, "persona", "missing")
    assert "train it first" in untrained
    await service.close()

    service = await open_service(config)  # a restart: same database
    assert (await service.persona_for(KEY)).name == "wordchat"
    turns = await service.store.recent_turns(KEY, 10)
    assert [t.persona for t in turns] == ["wordchat", "wordchat"]
    assert await service.reply(KEY, "alice", "again", adapter="test") == "tiger!"
    await service.command(KEY, "reset")
    assert await service.store.recent_turns(KEY, 10) == []
    await service.close()


@pytest.mark.timeout(60)
async def test_bad_input_is_rejected_and_nothing_stored(service):
    for text in ["", "   ", "x" * (service.config.service.max_input_chars + 1)]:
        with pytest.raises(InputRejected) as info:
            await service.reply(KEY, "alice", text, adapter="test")
        assert info.value.user_message
    with pytest.raises(PersonaError, match="no persona called"):
        await service.reply(KEY, "alice", "hi", adapter="test", persona="nope")
    with pytest.raises(PersonaError, match="train it first"):
        await service.reply(KEY, "alice", "hi", adapter="test", persona="missing")
    assert await service.store.recent_turns(KEY, 10) == []
    body = service.metrics.render().decode()
    assert 'ttt_requests_total{adapter="test",outcome="rejected",persona="?"} 3.0' in body


@pytest.mark.timeout(60)
async def test_broken_model_fails_its_persona_only(tmp_path, word_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": "many"}))
    config = make_config(tmp_path, word_model_dir)
    config.personas["broken"] = config.personas["words"].model_copy(update={"model": str(broken)})
    config.personas["nogguf"] = config.personas["words"].model_copy(update={"model": str(tmp_path / "absent.gguf")})
    service = await open_service(config)
    with pytest.raises(PersonaError, match="unavailable"):
        await service.reply(KEY, "alice", "the word is apple", adapter="test", persona="broken")
    assert await service.reply(KEY, "alice", "the word is apple", adapter="test") == "apple!"
    assert service.personas.loaded() == {str(broken): False, str(word_model_dir): True}
    # A GGUF file that is not there is unavailable at once, though its directory exists.
    with pytest.raises(PersonaUnavailable, match="absent.gguf does not exist"):
        service.personas.check(service.personas.get("nogguf"))
    await service.close()


@pytest.mark.timeout(60)
async def test_busy_generator_answers_busy_and_stores_nothing_for_it(tmp_path, word_model_dir):
    service = await open_service(make_config(tmp_path, word_model_dir, generator={"max_queue": 1}))
    keys = [ConversationKey("test", f"c{i}") for i in range(4)]
    results = await asyncio.gather(
        *(service.reply(k, "u", "the word is apple", adapter="test") for k in keys), return_exceptions=True
    )
    busy = [r for r in results if isinstance(r, Busy)]
    assert busy and "busy" in busy[0].user_message
    assert "apple!" in results
    for key, result in zip(keys, results):
        stored = await service.store.recent_turns(key, 10)
        assert len(stored) == (0 if isinstance(result, Busy) else 2)
    await service.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action, generations, seed", [("regenerate", 2, None), ("fallback", 1, None),
                                                       ("regenerate", 2, 2**64 - 1)])  # the retry's seed wraps
async def test_offensive_replies_are_replaced(tmp_path, word_model_dir, action, generations, seed, caplog):
    # A threshold this low makes the real classifier flag every reply.
    config = make_config(tmp_path, word_model_dir, safety={"offensive_threshold": 1e-9, "on_offensive": action})
    config.personas["words"].decoding.seed = seed
    service = await open_service(config)
    with caplog.at_level("INFO", logger="core.replies"):
        updates = [u async for u in service.respond(KEY, "alice", "the word is apple", adapter="test")]
    assert [u.text for u in updates] == [config.safety.fallback_reply]  # nothing flagged was ever shown
    assert len([r for r in caplog.records if "discarding a offensive reply" in r.getMessage()]) == generations
    stored = await service.store.recent_turns(KEY, 10)
    assert stored[-1].text == config.safety.fallback_reply
    await service.close()


@pytest.mark.timeout(30)
def test_no_pings_survive():
    nasty = "hey @everyone and @here, <@123> <@!456> <@&789> <!channel> <!here|here> <@U024BE7LH> <!subteam^S1>"
    safe = neutralize_mentions(nasty)
    for ping in ["@everyone", "@here", "<@123>", "<@!456>", "<@&789>", "<!channel>", "<!here", "<@U024BE7LH>",
                 "<!subteam"]:
        assert ping not in safe
    assert "everyone" in safe and "123" in safe  # the words stay readable
    assert neutralize_mentions("mail me at a@b.com") == "mail me at a@b.com"


@pytest.mark.timeout(30)
def test_offensive_and_degenerate_detection():
    assert is_offensive(["you are a worthless idiot, shut up", "what a lovely day for a walk"]) == [True, False]
    assert degeneracy("", "hi") == "empty"
    assert degeneracy("What is your name?", "what is your name") == "echo"
    assert degeneracy("I don't know. I don't know. I don't know. I don't know. I don't know.", "hi") == "loop"
    assert degeneracy("lolololololololololololololol", "hi") == "loop"
    assert degeneracy("Berkeley has great food, try the dining halls!", "where to eat") is None
    # Emoji say something: an emoji-only reply (to an emoji-only message) is a reply, not an empty one.
    assert [degeneracy(reply, "😀😀") for reply in ("👍", "😂😂😂", "❤️", "👋🏽 hi")] == [None] * 4
    assert degeneracy(" ... ", "hi") == "empty"


@pytest.mark.timeout(60)
async def test_a_thread_inherits_its_channels_persona_until_it_chooses_its_own(service):
    channel = ConversationKey("discord", "100")
    thread = ConversationKey("discord", "200", parent="100")
    assert (await service.persona_for(thread)).name == "words"
    await service.set_persona(channel, "wordchat")
    assert (await service.persona_for(thread)).name == "wordchat"
    assert await service.reply(thread, "alice", "the word is lemon", adapter="test") == "lemon!"
    assert [t.persona for t in await service.store.recent_turns(thread, 10)] == ["wordchat", "wordchat"]
    await service.set_persona(thread, "words")
    assert (await service.persona_for(thread)).name == "words"
    assert (await service.persona_for(channel)).name == "wordchat"


@pytest.mark.timeout(60)
async def test_rate_limit_refuses_over_the_limit_and_notifies_once_a_window(service):
    decisions = [await service.check_rate("discord", "42", 2) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, False, False, False]
    assert [d.notify for d in decisions[2:]] == [True, False, False]
    assert all(0 < d.wait_s <= 60 for d in decisions[2:])
    assert (await service.check_rate("discord", "43", 2)).allowed
    assert (await service.check_rate("slack", "42", 2)).allowed  # platforms count apart
    assert (await service.check_rate("discord", "42", 0)).allowed  # 0: no limit


@pytest.mark.timeout(60)
async def test_forget_me_deletes_what_that_person_wrote_and_the_replies(service):
    await service.reply(KEY, "alice", "the word is piano", adapter="test", author_id="a1")
    await service.reply(KEY, "bob", "the word is lemon", adapter="test", author_id="b2")
    answer = await service.command(KEY, "forget-me", author_id="a1")
    assert "deleted" in answer and "2 message" in answer
    left = await service.store.recent_turns(KEY, 10)
    assert [(t.role, t.author_id) for t in left] == [("user", "b2"), ("bot", None)]
    assert left[0].text == "the word is lemon"
    assert "can't tell who you are" in await service.command(KEY, "forget-me")


@pytest.mark.timeout(60)
async def test_forgotten_words_are_gone_from_the_database_files_at_once(service):
    """Not only the rows: no copy stays in the SQLite file, its write-ahead log or the freed pages."""
    for _ in range(4):  # several copies of the page, as a busy conversation leaves in the log
        await service.reply(KEY, "alice", "the word is xylophone", adapter="test", author_id="a1")
    await service.reply(KEY, "bob", "the word is lemon", adapter="test", author_id="b2")
    database = service.config.database.path
    files = [database, database.with_name(database.name + "-wal")]
    assert any(b"xylophone" in f.read_bytes() for f in files if f.exists())
    await service.command(KEY, "forget-me", author_id="a1")
    for f in files:  # the service is still running: nothing was closed or cleaned up yet
        assert not f.exists() or b"xylophone" not in f.read_bytes(), f
    assert [t.text for t in await service.store.recent_turns(KEY, 10)][0] == "the word is lemon"


@pytest.mark.timeout(60)
async def test_help_is_the_platforms_own_when_given(service):
    assert await service.command(KEY, "help", help_text="Use /reset here.") == "Use /reset here."
    assert "reset" in await service.command(KEY, "help")


@pytest.mark.timeout(60)
async def test_retention_sweep_uses_the_configured_days(tmp_path, word_model_dir):
    for days, kept in ((1, ["new"]), (0, ["old", "new"])):
        config = make_config(tmp_path / str(days), word_model_dir, conversation={"retention_days": days})
        service = await open_service(config)
        await service.store.add_turns(KEY, [Turn("user", "a", "old", time.time() - 2 * 86400)])
        await service.store.add_turns(KEY, [Turn("user", "a", "new")])
        await service.delete_expired()
        assert [t.text for t in await service.store.recent_turns(KEY, 10)] == kept
        await service.close()


# ---- output safety for streamed text ---------------------------------------------------------


@pytest.fixture(scope="module")
def trap_model_dir():
    return cached_trap_model()


@pytest.mark.timeout(60)
async def test_harmless_words_with_flagged_prefixes_stream_intact(tmp_path, word_model_dir, trap_model_dir):
    """Through the real generator: "Shit|ake", "Dick|ens", "ass|ess", "cock|tail" arrive in two pieces each,
    and each prefix alone scores 0.99+ with the classifier; the user sees the reply, sentence by sentence."""
    greedy = {"do_sample": False, "max_new_tokens": 40}
    config = make_config(tmp_path, word_model_dir, personas={"traps": {"model": str(trap_model_dir),
                         "format": "dialogpt", "decoding": greedy}}, service={"default_persona": "traps"})
    service = await open_service(config)
    try:
        updates = [u.text async for u in service.respond(KEY, "alice", PROMPT, adapter="test")]
    finally:
        await service.close()
    sentences = ["I love Shitake.", "Charles Dickens wrote books.", "We should assess it.", "Try a cocktail!"]
    assert updates[-1] == TRAPS
    # Screened (and shown) once per sentence, never half a word.
    assert updates[:-1] == [" ".join(sentences[:n]) for n in range(1, 5)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("screening", [True, False])
def test_streamed_text_never_shows_a_ping_or_half_a_word(screening):
    screen = StreamScreen(screening)
    pieces = [" Hi <", "@12", "3> and @every", "one, <@!45", "6>", " @here", "ford", " Dick", "ens.  "]
    shown = []
    for piece in pieces:
        due = screen.feed(piece)
        if due is not None:
            screen.show(due)
            shown.append(due)
    assert screen.text == neutralize_mentions("".join(pieces)).strip()
    assert "<@" not in screen.text and "@everyone" not in screen.text and "@herefo" in screen.text.replace(ZWSP, "")
    assert all(screen.text.startswith(text) for text in shown)
    assert not any(text.endswith(("<", "@12", "@every", "@here")) for text in shown)
    assert not screening or not any(text.endswith("Dick") for text in shown)
    assert shown[-1] == screen.text
    assert len(shown) == (1 if screening else 6)  # screened text: at the sentence end only


@pytest.mark.timeout(60)
async def test_unreadable_or_overlong_input_is_refused_and_nothing_stored(service):
    with pytest.raises(InputRejected, match="not text"):
        await service.reply(KEY, "alice", "hi \ud800 there", adapter="test")
    # One letter with 1,800 combining marks: within max_input_chars, but it alone fills the context.
    with pytest.raises(TooLong, match="too long"):
        await service.reply(KEY, "alice", "a" + "\u0301" * 1800, adapter="test")
    assert await service.store.recent_turns(KEY, 10) == []


class GatedOpenAIServer(FakeOpenAIServer):
    """The fake model server, answering only once `gate` is set: a generator that is still busy."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = asyncio.Event()

    async def _stream(self, request, body, text, chat):
        await self.gate.wait()
        return await super()._stream(request, body, text, chat)


@pytest.mark.timeout(60)
async def test_a_reply_past_its_deadline_is_a_clear_busy_answer(tmp_path, word_model_dir):
    async with GatedOpenAIServer() as server:
        config = make_config(tmp_path, word_model_dir, generator={"request_timeout_s": 0.2},
                             personas={"remote": {"model": "served", "endpoint": {"base_url": server.url,
                                                                                   "model": "m"}}})
        service = await open_service(config)
        try:
            with pytest.raises(Busy) as info:
                await service.reply(KEY, "alice", "hello", adapter="test", persona="remote")
            # Not the refusal's text: this person waited, and is told why.
            assert isinstance(info.value, TimedOut) and info.value.user_message == TIMED_OUT != BUSY
            assert await service.store.recent_turns(KEY, 10) == []
            assert 'outcome="timeout"' in service.metrics.render().decode()
        finally:
            server.gate.set()
            await service.close()


@pytest.mark.timeout(60)
async def test_a_persona_whose_own_system_prompt_fills_the_context_says_so(tmp_path, word_model_dir, word_chat_model_dir):
    config = make_config(tmp_path, word_model_dir, word_chat_model_dir)
    config.personas["wordchat"].system_prompt = "you play the word game " * 60
    service = await open_service(config)
    try:
        with pytest.raises(PersonaError, match="misconfigured.*system prompt"):
            await service.reply(KEY, "alice", "the word is apple", adapter="test", persona="wordchat")
        assert await service.store.recent_turns(KEY, 10) == []
    finally:
        await service.close()


@pytest.mark.timeout(60)
async def test_a_conversation_held_past_the_lock_wait_is_busy_not_memory_loss(tmp_path, word_model_dir):
    from core.stores.sqlite import SQLiteStore
    from core.metrics import Metrics
    from core.personas import PersonaRegistry
    from core.service import ChatService

    config = make_config(tmp_path, word_model_dir)
    metrics = Metrics()
    store = await SQLiteStore(config.database.path, lock_wait_s=0.2).open()
    service = ChatService(config, store, PersonaRegistry(config, metrics), metrics)
    try:
        async with store.lock(KEY):  # an earlier reply that takes too long
            with pytest.raises(Busy, match="still answering an earlier message"):
                await service.reply(KEY, "alice", "the word is apple", adapter="test")
        assert await store.recent_turns(KEY, 10) == []
        assert await service.reply(KEY, "alice", "the word is apple", adapter="test") == "apple!"
    finally:
        await service.close()


@pytest.mark.timeout(60)
async def test_an_emoji_only_message_gets_the_models_emoji_reply_not_the_fallback(tmp_path, word_model_dir):
    async with ScriptedModel() as model:
        config = make_config(tmp_path, word_model_dir, personas={"scripted": model.persona()},
                             service={"default_persona": "scripted"})
        service = await open_service(config)
        try:
            reply = asyncio.ensure_future(service.reply(KEY, "alice", "😀😀😀", adapter="test", author_id="a1"))
            await model.request(0)
            model.say(0, "😂", "👍")
            model.end(0)
            assert await asyncio.wait_for(reply, 30) == "😂👍"
            assert len(model.requests) == 1  # not regenerated either
        finally:
            await service.close()
