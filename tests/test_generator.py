"""The shared generator: mixed decoding, streaming, isolation, busy, cancel, timeout (exactness per
architecture: test_generator_archs.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.config.schema import Decoding
from core.conversation import Turn
from core.engine.generator import GenerationFailed, GenerationTimeout, GeneratorBusy
from core.engine.local import LocalEngine
from core.engine.models import ModelSource, choose_placement, load_model
from tiny import WORDS

GREEDY = Decoding(do_sample=False, max_new_tokens=12)
# The dialogpt prompt holds eos; banning every repeated token bans eos too: this runs to the length limit.
ENDLESS = Decoding(do_sample=True, no_repeat_ngram_size=1, max_new_tokens=4096, seed=1)


@pytest.fixture(scope="module")
def word_model(word_model_dir):
    return load_model(ModelSource(str(word_model_dir)), choose_placement("cpu"))


def prompt_for(engine: LocalEngine, word: str) -> list[int]:
    return engine.prepare("dialogpt", [Turn("user", "alice", f"the word is {word}")], "", 200)


@pytest.mark.timeout(120)
async def test_mixed_decoding_in_one_batch_and_seeded_sampling_is_reproducible(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer)
    sampled = Decoding(do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=7, max_new_tokens=10)
    ngram = Decoding(do_sample=False, no_repeat_ngram_size=2, repetition_penalty=1.3, max_new_tokens=10)
    prompt = prompt_for(engine, "apple")
    alone = await engine.submit(prompt, sampled).text()
    together = await asyncio.gather(
        engine.submit(prompt, sampled).text(),
        engine.submit(prompt, GREEDY).text(),
        engine.submit(prompt_for(engine, "river"), ngram).text(),
        engine.submit(prompt, sampled).text(),
    )
    await engine.close()
    assert together[0] == alone and together[3] == alone  # same seed, same reply, whatever shares the batch
    assert together[1] == "apple!"  # the greedy row is unaffected by its sampled neighbours


@pytest.mark.timeout(120)
async def test_streaming_pieces_and_stop_strings(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer)
    pieces = [p async for p in engine.submit(prompt_for(engine, "castle"), GREEDY)]
    assert "".join(pieces) == "castle!" and len(pieces) >= 2
    stopped = engine.submit(prompt_for(engine, "castle"), GREEDY.model_copy(update={"stop": ["tle"]}))
    assert await stopped.text() == "cas"
    assert stopped.stats.finish_reason == "stop" and stopped.stats.new_tokens >= 1
    # Text held back in case it starts a stop string still arrives when the reply simply ends.
    unmatched = engine.submit(prompt_for(engine, "castle"), GREEDY.model_copy(update={"stop": ["zzzzzz"]}))
    assert await unmatched.text() == "castle!"
    await engine.close()


@pytest.mark.timeout(120)
async def test_worker_survives_an_unexpected_failure(word_model_dir):
    # A tokenizer that cannot decode what the model produces breaks the worker's own bookkeeping
    # (not the forward pass): the affected requests fail, and the engine keeps serving.
    model, tokenizer = load_model(ModelSource(str(word_model_dir)), choose_placement("cpu"))
    engine = LocalEngine(model, tokenizer)
    original = tokenizer.decode
    tokenizer.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("decoder exploded"))
    with pytest.raises(GenerationFailed, match="decoder exploded"):
        await engine.submit(prompt_for(engine, "harbor"), GREEDY, timeout=30).text()
    tokenizer.decode = original
    assert await engine.submit(prompt_for(engine, "harbor"), GREEDY, timeout=30).text() == "harbor!"
    await engine.close()


@pytest.mark.timeout(120)
async def test_full_queue_says_busy_at_once(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer, max_batch_size=2, max_queue=3)
    long = Decoding(do_sample=False, max_new_tokens=200)
    prompt = prompt_for(engine, "tiger")
    held = [engine.submit(prompt, long) for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(GeneratorBusy):
        engine.submit(prompt, long)
    assert time.monotonic() - started < 0.1
    for generation in held:
        generation.cancel()
    await engine.close()


@pytest.mark.timeout(120)
async def test_cancelled_request_stops_consuming_compute(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer)
    uncancelled = engine.submit(prompt_for(engine, "piano"), ENDLESS)
    await uncancelled.text()
    assert uncancelled.stats.finish_reason == "length" and uncancelled.stats.new_tokens > 100
    generation = engine.submit(prompt_for(engine, "piano"), ENDLESS)
    async for _ in generation:
        break  # the consumer walks away after the first piece: that cancels the request
    deadline = time.monotonic() + 5
    while engine.active and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    assert engine.active == 0
    assert generation.stats.new_tokens < uncancelled.stats.new_tokens / 4
    # The engine still serves the next request normally.
    assert await engine.submit(prompt_for(engine, "piano"), GREEDY).text() == "piano!"
    await engine.close()


@pytest.mark.timeout(120)
async def test_timeout_fails_the_request(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer)
    with pytest.raises(GenerationTimeout):
        await engine.submit(prompt_for(engine, "lemon"), ENDLESS, timeout=0.05).text()
    await engine.close()


@pytest.mark.timeout(120)
async def test_failing_request_fails_alone(word_model):
    model, tokenizer = word_model
    engine = LocalEngine(model, tokenizer)
    too_long = [tokenizer.eos_token_id] * (engine.max_positions + 5)
    with pytest.raises(GenerationFailed):
        engine.submit(too_long, GREEDY)
    # An invalid token id only fails inside the forward pass: the batch is split and the others survive.
    bad = prompt_for(engine, "rocket").ids + [len(tokenizer) + 1000]
    results = await asyncio.gather(
        engine.submit(prompt_for(engine, "forest"), GREEDY).text(),
        engine.submit(bad, GREEDY).text(),
        engine.submit(prompt_for(engine, "cloud"), GREEDY).text(),
        return_exceptions=True,
    )
    await engine.close()
    assert results[0] == "forest!" and results[2] == "cloud!"
    assert isinstance(results[1], GenerationFailed)


@pytest.mark.timeout(180)
async def test_fifty_concurrent_conversations_no_cross_talk(service):
    """50 conversations at once, two turns each: every reply names its own conversation's word."""
    from core.conversation import ConversationKey

    keys = [ConversationKey("test", f"chan-{i}") for i in range(50)]
    words = [WORDS[i % len(WORDS)] for i in range(50)]

    async def converse(key, word) -> tuple[str, str]:
        first = await service.reply(key, f"user-{key.scope}", f"the word is {word}", adapter="test")
        second = await service.reply(key, f"user-{key.scope}", "again", adapter="test")
        return first, second

    results = await asyncio.gather(*(converse(k, w) for k, w in zip(keys, words)))
    assert results == [(f"{w}!", f"{w}!") for w in words]
    for key, word in zip(keys, words):
        turns = await service.store.recent_turns(key, 10)
        assert [t.text for t in turns] == [f"the word is {word}", f"{word}!", "again", f"{word}!"]
