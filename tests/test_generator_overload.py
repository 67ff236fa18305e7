"""Overload: the queue bound is exact, requests that cannot finish in time are refused at once,
what is admitted finishes, and bad decoding values fail the request cleanly at submit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from core.config.schema import Decoding
from core.engine.generator import GenerationFailed, GenerationTimeout, GeneratorBusy
from core.engine.local import LocalEngine
from core.metrics import Metrics
from core.engine.models import ModelSource, choose_placement, load_model
from tiny import build_untrained_model

ENDLESS = Decoding(do_sample=False, max_new_tokens=60)  # the untrained model never says eos


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A tiny GPT-2 that always generates up to its limit."""
    return load_model(ModelSource(str(build_untrained_model(tmp_path_factory.mktemp("untrained")))),
                      choose_placement("cpu"))


@pytest.mark.timeout(60)
async def test_queue_bound_counts_requests_being_prefilled(slow_model):
    model, tokenizer = slow_model
    engine = LocalEngine(model, tokenizer, max_batch_size=4, max_queue=8)
    prompt = list(range(3, 40))
    await engine.submit(prompt, Decoding(do_sample=False, max_new_tokens=2)).text()  # the engine is warm
    # Hold the worker inside its next forward pass: the requests it took are being prefilled.
    entered, gate = threading.Event(), threading.Event()
    hook = model.register_forward_pre_hook(lambda *_: (entered.set(), gate.wait()))
    try:
        admitted = [engine.submit(prompt, ENDLESS) for _ in range(8)]
        assert await asyncio.to_thread(entered.wait, 10)
        refused = 0
        for _ in range(16):
            with pytest.raises(GeneratorBusy):
                engine.submit(prompt, ENDLESS)
            refused += 1
    finally:
        gate.set()
        hook.remove()
    texts = await asyncio.gather(*(g.text() for g in admitted))
    await engine.close()
    assert refused == 16 and all(g.stats.new_tokens == 60 for g in admitted) and len(texts) == 8


@pytest.mark.timeout(60)
async def test_requests_that_cannot_finish_by_their_deadline_are_refused_at_once(slow_model):
    model, tokenizer = slow_model
    metrics = Metrics()
    engine = LocalEngine(model, tokenizer, name="serial", max_batch_size=1, metrics=metrics)
    prompt = list(range(3, 40))
    await engine.submit(prompt, Decoding(do_sample=False, max_new_tokens=2)).text()  # warm
    started = time.monotonic()
    await engine.submit(prompt, ENDLESS).text()
    alone = time.monotonic() - started
    # One at a time, each takes about `alone`: within three of those, two fit (with room to spare).
    timeout = 3 * alone
    admitted, refused_in = [], []
    for _ in range(12):
        before = time.monotonic()
        try:
            admitted.append(engine.submit(prompt, ENDLESS, timeout=timeout))
        except GeneratorBusy:
            refused_in.append(time.monotonic() - before)
    wait = metrics.registry.get_sample_value("ttt_generator_expected_wait_seconds", {"engine": "serial"})
    texts = await asyncio.gather(*(g.text() for g in admitted))  # none of them times out
    await engine.close()
    assert 1 <= len(admitted) <= 3 and len(refused_in) == 12 - len(admitted)
    assert max(refused_in) < 0.25  # at once: no waiting for a slot
    assert all(g.stats.new_tokens == 60 for g in admitted) and len(texts) == len(admitted)
    assert wait > alone * (len(admitted) - 1) * 0.5
    refusals = metrics.registry.get_sample_value("ttt_generator_refused_total",
                                                 {"engine": "serial", "reason": "deadline"})
    assert refusals == len(refused_in)


@pytest.mark.timeout(60)
async def test_an_idle_engine_takes_what_its_estimate_calls_too_slow(slow_model):
    """Estimates go wrong (a long history after short replies): alone, a request is never refused;
    it runs to its deadline. Beside a running request, the same one is refused at once."""
    model, tokenizer = slow_model
    engine = LocalEngine(model, tokenizer, name="idle", max_batch_size=1)
    prompt = list(range(3, 40))
    await engine.submit(prompt, Decoding(do_sample=False, max_new_tokens=2)).text()  # warm: the speed is known
    too_short = 3 * engine.speed.step_seconds(1, len(prompt))  # 3 steps' time for 60 tokens
    with pytest.raises(GenerationTimeout):
        await engine.submit(prompt, ENDLESS, timeout=too_short).text()
    running = engine.submit(prompt, ENDLESS)
    with pytest.raises(GeneratorBusy):
        engine.submit(prompt, ENDLESS, timeout=too_short)
    await running.text()
    await engine.close()


@pytest.mark.timeout(60)
async def test_bad_decoding_values_fail_at_submit_and_change_nothing(slow_model):
    model, tokenizer = slow_model
    engine = LocalEngine(model, tokenizer, max_queue=2)
    prompt = list(range(3, 20))
    good = Decoding(do_sample=True, seed=3, max_new_tokens=5)
    for bad, name in [({"seed": 10**30}, "seed"), ({"temperature": 0.0}, "temperature"),
                      ({"top_p": float("nan")}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"stop": [""]}, "stop")]:
        with pytest.raises(GenerationFailed, match=f"invalid decoding settings: {name}"):
            engine.submit(prompt, good.model_copy(update=bad))
    # Nothing was queued: both places are free, and the engine answers as before.
    replies = await asyncio.gather(engine.submit(prompt, good).text(), engine.submit(prompt, good).text())
    await engine.close()
    assert replies[0] == replies[1]
