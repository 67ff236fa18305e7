"""Overload: the queue bound is exact, requests that cannot finish in time are refused at once,
what is admitted finishes (from the first burst after ready), the estimates follow the speed
measured now (bench/admission.py runs bursts beside a neighbour that slows the machine down), and
bad decoding values fail the request cleanly at submit."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time

import pytest
import torch

from conftest import make_config
from core.config.schema import Decoding
from core.conversation import Turn
from core.engine.capacity import PACE_PASSES, SpeedModel
from core.engine.generator import GenerationFailed, GeneratorBusy
from core.engine.local import LocalEngine
from core.errors import Busy
from core.metrics import Metrics
from core.engine.models import ModelSource, choose_placement, load_model
from core.engine.runner import ModelRunner
from core.service import open_service
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
async def test_a_request_alone_is_refused_only_when_it_cannot_finish_at_all(slow_model):
    """Alone, a request that its estimate says cannot finish even with the engine to itself is refused
    at once (waiting for its deadline would tell its caller no more, later); one that can finish is
    taken. Beside a running request, the estimate keeps time in reserve."""
    model, tokenizer = slow_model
    engine = LocalEngine(model, tokenizer, name="idle", max_batch_size=1)
    await engine.wait_started()
    prompt = list(range(3, 40))
    too_short = 3 * engine.speed.step_seconds(1, len(prompt))  # 3 steps' time for 60 tokens
    started = time.monotonic()
    with pytest.raises(GeneratorBusy) as refused:
        engine.submit(prompt, ENDLESS, timeout=too_short)
    assert time.monotonic() - started < 0.25
    # The message shows the estimate that refused it: a refusal that surprises can be read.
    numbers = re.fullmatch(r"the generator could not finish this request before its deadline \(estimated to "
                           r"finish in ([0-9.]+) s, its deadline is in ([0-9.]+) s; 0 running, 0 waiting, "
                           r"pace [0-9.]+\)", str(refused.value))
    assert numbers, str(refused.value)
    assert float(numbers[1]) > float(numbers[2])
    alone = engine.speed.prefill_seconds(len(prompt)) + 59 * engine.speed.step_seconds(1, len(prompt) + 60)
    admitted = engine.submit(prompt, ENDLESS, timeout=3 * alone + 1)
    with pytest.raises(GeneratorBusy):
        engine.submit(prompt, ENDLESS, timeout=alone / 0.9)  # in time with the engine to itself only
    await admitted.text()
    await engine.close()


@pytest.mark.timeout(60)
async def test_an_idle_engine_finds_out_that_a_slowdown_has_passed(slow_model):
    """Passes that ran many times slower than measured (a neighbour's load) raise the pace, and then
    every request is refused: no pass runs that could show the load has gone. Idle, the engine times
    a few passes itself, and a lone request is admitted again, with no request needed first."""
    model, tokenizer = slow_model
    engine = LocalEngine(model, tokenizer, name="slowed", max_batch_size=2)
    await engine.wait_started()
    prompt = list(range(3, 40))
    alone = engine.speed.prefill_seconds(len(prompt)) + 59 * engine.speed.step_seconds(1, len(prompt) + 60)
    step = engine.speed.step_seconds(1, len(prompt))
    for _ in range(PACE_PASSES):  # what a neighbour's load did to the last passes
        engine.speed.record_step(1, len(prompt), 50 * step)
    assert engine.speed.pace > 10
    with pytest.raises(GeneratorBusy):
        engine.submit(prompt, ENDLESS, timeout=3 * alone)
    started = time.monotonic()
    while engine.speed.pace > 2 and time.monotonic() - started < 20:
        await asyncio.sleep(0.05)
    assert engine.speed.pace <= 2
    await engine.submit(prompt, ENDLESS, timeout=3 * alone + 1).text()
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


@pytest.mark.timeout(60)
def test_calibration_times_every_size_at_the_count_it_will_run_whichever_count_won(slow_model):
    """Before serving, the engine times each batch size and prefills at the thread count it will run
    them at. When a count has just won its re-check, the tuner re-checks the loser at the next pass
    (a trial, whose time admission must not plan with): calibration still ends each size with a
    pass at the preferred count, so nothing is left unmeasured (unmeasured: every request refused)."""
    model, tokenizer = slow_model
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = ModelRunner(model, tokenizer, tokenizer.pad_token_id)
        for sort, sizes in (("prefill", range(13)), ("decode", range(6))):
            for kind in ((sort, 1 << i) for i in sizes):
                runner.tuner.record(kind, 1, 1.0)
                runner.tuner.record(kind, 2, 0.5)  # two threads won: one thread is re-checked next
        speed = SpeedModel()
        with torch.inference_mode():
            runner.calibrate(speed, max_rows=4, context=32)
    finally:
        torch.set_num_threads(previous)
    assert all(math.isfinite(speed.step_seconds(rows, 40)) for rows in (1, 2, 3, 4))
    assert all(math.isfinite(speed.prefill_seconds(tokens)) for tokens in (8, 16, 40, 300))


def test_the_estimates_follow_the_speed_measured_now_and_assume_unmeasured_sizes_slow():
    """Calibrated at every size, then a neighbour halves the speed: a few slow steps at one batch
    size double the estimates at every size. A size never measured is no faster than the next
    larger one measured, or, above them all, no faster per row than the largest."""
    speed = SpeedModel()
    step = {1: 0.010, 2: 0.012, 8: 0.022, 16: 0.035}  # seconds at width 100
    for rows, seconds in step.items():
        for _ in range(3):
            speed.record_step(rows, 100, seconds)
    speed.record_prefill(16, 0.02)
    speed.record_prefill(128, 0.1)
    assert speed.step_seconds(8, 100) == pytest.approx(0.022, rel=0.01)
    assert speed.step_seconds(4, 100) == pytest.approx(0.022, rel=0.01)  # as slow as 8 rows
    assert speed.step_seconds(32, 100) == pytest.approx(2 * 0.035, rel=0.01)  # no faster per row than 16
    assert speed.prefill_seconds(1024) == pytest.approx(8 * 0.1, rel=0.01)
    assert SpeedModel().step_seconds(1, 10) == float("inf")  # nothing measured: no promise can be kept
    for _ in range(4):
        speed.record_step(2, 100, 2 * step[2])
    for rows, seconds in step.items():
        assert speed.step_seconds(rows, 100) == pytest.approx(2 * seconds, rel=0.1)
    assert speed.prefill_seconds(128) == pytest.approx(0.2, rel=0.1)
    for _ in range(16):  # the neighbour leaves
        speed.record_step(8, 100, step[8])
    assert speed.step_seconds(1, 100) == pytest.approx(step[1], rel=0.1)


BURST = 48


@pytest.fixture(scope="module")
def heavier_model_dir(tmp_path_factory):
    """An untrained GPT-2 big enough that a 64-token reply takes a noticeable time."""
    return build_untrained_model(tmp_path_factory.mktemp("heavier"), n_embd=256, n_layer=4)


async def lone_reply_seconds(model_dir) -> float:
    """How long a lone 64-token reply takes here, on an engine of its own (the one under test gets
    no warm-up)."""
    model, tokenizer = load_model(ModelSource(str(model_dir)), choose_placement("cpu"))
    engine = LocalEngine(model, tokenizer)
    await engine.wait_started()
    started = time.monotonic()
    await engine.submit(list(range(3, 30)), Decoding(do_sample=False, max_new_tokens=64)).text()
    await engine.close()
    return time.monotonic() - started


async def burst(service, deadline: float) -> tuple[list[float], list[float]]:
    """BURST concurrent 64-token requests: (seconds each answered one took, seconds each refused one
    took to hear it); a request that fails after waiting fails the test."""
    persona = service.personas.get("slow")
    decoding = persona.config.decoding.model_copy(update={"max_new_tokens": 64})
    metrics = service.metrics.registry

    async def ask(i: int):
        started = time.monotonic()
        try:
            generation = await service.generate(persona, [Turn("user", "alice", f"message number {i}")],
                                                decoding=decoding)
        except Busy:
            return "refused", time.monotonic() - started
        await generation.text()  # raises GenerationTimeout if it runs past the deadline
        assert generation.stats.new_tokens == 64
        return "answered", time.monotonic() - started

    tasks = [asyncio.create_task(ask(i)) for i in range(BURST)]
    await asyncio.sleep(0)
    waits = []
    while not all(t.done() for t in tasks):
        waits.append(metrics.get_sample_value("ttt_generator_expected_wait_seconds", {"engine": persona.config.model}))
        await asyncio.sleep(0.05)
    outcomes = [t.result() for t in tasks]
    answered = [s for kind, s in outcomes if kind == "answered"]
    refused = [s for kind, s in outcomes if kind == "refused"]
    assert max(answered) < deadline
    assert max(waits) > 0  # the estimate saw the queue
    return answered, refused


def slow_service_config(tmp_path, model_dir, deadline: float):
    config = make_config(tmp_path, model_dir, generator={"request_timeout_s": deadline})
    config.personas["slow"] = config.personas["words"].model_copy(update={"model": str(model_dir)})
    config.service.default_persona = "slow"
    return config


@pytest.mark.timeout(180)
async def test_a_burst_right_after_ready_is_answered_in_time_or_refused_at_once(tmp_path, heavier_model_dir):
    """`ttt serve` just ready (/healthz: the default persona's engine is loaded), then 48 concurrent
    64-token requests whose deadline is twice a lone reply's time: the engine timed its passes before
    it was ready, so some are answered in time and the others are refused at once; none fails after
    waiting, and the first is not held up by timing work."""
    deadline = 2 * await lone_reply_seconds(heavier_model_dir)
    service = await open_service(slow_service_config(tmp_path, heavier_model_dir, deadline))
    persona = service.personas.get("slow")
    await service.personas.engine(persona)  # what `ttt serve` does at start
    assert service.personas.is_loaded(persona)  # what /healthz reports as ready
    answered, refused = await burst(service, deadline)
    await service.close()
    assert answered and len(refused) >= BURST // 3
    assert max(refused) < 0.5
