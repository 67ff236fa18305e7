"""The prefix cache: keyed by tokens and adapter, bounded (LRU), exact, partial reuse only where the
cache layout still holds the prefix; and the pieces a lone request's speed rests on (weight types:
tests/test_generator_weights.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from core.config.schema import Decoding
from core.engine.detokenize import ReplyText
from core.engine.local import LocalEngine, PreparedPrompt
from core.metrics import Metrics
from core.engine.models import ModelSource, choose_placement, load_model
from core.engine.threads import EXPLORE_EVERY, ThreadTuner
from test_generator_archs import random_prompt, sequential
from tiny import TEST_DEVICE, build_random_causal_lm, build_tokenizer

GREEDY = Decoding(do_sample=False, max_new_tokens=8)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


async def reply(engine: LocalEngine, prompt: list[int], adapter: str | None = None):
    generation = engine.submit(PreparedPrompt(prompt, frozenset()), GREEDY, adapter=adapter)
    return await generation.text(), generation.stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
async def test_a_shorter_shared_prefix_is_reused_only_where_the_layout_holds_it(arch, tokenizer):
    model = build_random_causal_lm(arch, len(tokenizer))
    rng = random.Random(arch)
    stored = random_prompt(60, rng, len(tokenizer))
    engine = LocalEngine(model, tokenizer, prefix_cache_mb=16)
    await reply(engine, stored)
    # Shares the first 40 tokens, then goes elsewhere (an edited or trimmed history).
    branch = stored[:40] + random_prompt(10, rng, len(tokenizer))
    text, stats = await reply(engine, branch)
    await engine.close()
    assert text == sequential(model, tokenizer, branch, GREEDY)[0]
    # Full attention keeps every position; a sliding window of 8 no longer holds positions 32-39.
    assert stats.cached_tokens == (40 if arch == "llama" else 0)


@pytest.mark.timeout(60)
async def test_cache_is_bounded_least_recently_used_and_reported(tokenizer):
    model = build_random_causal_lm("llama", len(tokenizer))
    rng = random.Random(1)
    metrics = Metrics()
    first, second = (random_prompt(100, rng, len(tokenizer)) for _ in range(2))
    engine = LocalEngine(model, tokenizer, name="lru", metrics=metrics, prefix_cache_mb=16)
    await reply(engine, first)
    engine.prefix_cache.budget_bytes = int(1.5 * engine.prefix_cache.bytes)  # room for one conversation
    await reply(engine, second)  # evicts the first conversation's entry
    _, again_second = await reply(engine, second + [5, 6, 7])
    _, again_first = await reply(engine, first + [5, 6, 7])
    await engine.close()
    assert again_second.cached_tokens == 100 and again_first.cached_tokens == 0
    assert engine.prefix_cache.bytes <= engine.prefix_cache.budget_bytes
    value = lambda name: metrics.registry.get_sample_value(name, {"engine": "lru"})  # noqa: E731
    assert value("ttt_prefix_cache_hits_total") == 1 and value("ttt_prefix_cache_misses_total") == 3
    assert value("ttt_prefix_cache_reused_tokens_total") == 100
    assert 0 < value("ttt_prefix_cache_bytes") <= engine.prefix_cache.budget_bytes


@pytest.mark.timeout(60)
async def test_adapter_is_part_of_the_key(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = build_random_causal_lm("llama", len(tokenizer))
    torch.manual_seed(3)
    lora = get_peft_model(build_random_causal_lm("llama", len(tokenizer)),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    prompt = random_prompt(50, random.Random(2), len(tokenizer))
    engine = LocalEngine(base, tokenizer, prefix_cache_mb=16)
    engine.load_adapter(str(tmp_path / "adapter"))
    with_adapter, first = await reply(engine, prompt, adapter=str(tmp_path / "adapter"))
    plain, second = await reply(engine, prompt + [7, 8])  # the same tokens, computed without the adapter
    again, third = await reply(engine, prompt + [7, 8], adapter=str(tmp_path / "adapter"))
    await engine.close()
    adapted = PeftModel.from_pretrained(build_random_causal_lm("llama", len(tokenizer)), tmp_path / "adapter").eval()
    assert with_adapter == sequential(adapted, tokenizer, prompt, GREEDY)[0]
    assert plain == sequential(build_random_causal_lm("llama", len(tokenizer)), tokenizer, prompt + [7, 8], GREEDY)[0]
    assert again == sequential(adapted, tokenizer, prompt + [7, 8], GREEDY)[0] and again != plain
    assert (first.cached_tokens, second.cached_tokens) == (0, 0) and third.cached_tokens >= 50


def test_streamed_text_equals_a_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        text = ReplyText(tokenizer, [])
        assert "".join(text.add(t) for t in tokens) + text.finish() == full
        stop, shown = ReplyText(tokenizer, ["d!"]), ""
        for token in tokens:
            shown += stop.add(token)
            if stop.stopped:
                break
        shown += "" if stop.stopped else stop.finish()
        assert shown == (full[: full.find("d!")] if "d!" in full else full)


def test_thread_tuner_ignores_one_delayed_pass_and_follows_the_load():
    """One two-thread pass the scheduler delayed changes nothing; a busy machine moves a lone decode
    to one thread within a few passes, and a quiet one brings it back within a few passes of the
    next re-check."""
    tuner, kind = ThreadTuner(2), ("decode", 1)
    quiet, busy = {1: 0.075, 2: 0.045}, {1: 0.075, 2: 1.5}

    def run(passes: int, times: dict[int, float], delayed_pass: int = -1) -> list[int]:
        used = []
        for i in range(passes):
            threads = tuner.choose(kind)
            tuner.record(kind, threads, 1.5 if i == delayed_pass else times[threads])
            used.append(threads)
        return used

    used = run(300, quiet, delayed_pass=100)
    assert used[100] == 2 and used[101:].count(1) <= 2  # re-checks only
    assert run(600, busy)[3:].count(2) <= 4  # re-checks only
    used = run(2000, quiet)
    assert 2 in used
    assert used[used.index(2) + 3:].count(1) <= 10


def test_thread_tuner_keeps_the_faster_count_per_kind_and_rechecks_ever_more_rarely():
    tuner = ThreadTuner(2)
    lone, batch = ("decode", 1), ("decode", 32)
    for kind, times in ((lone, {1: 0.01, 2: 0.08}), (batch, {1: 0.3, 2: 0.2})):
        for _ in range(2):
            threads = tuner.choose(kind, explore=True)  # as the engine times itself before serving
            assert tuner.is_trial(kind, threads)  # each count is tried once before one is preferred
            tuner.record(kind, threads, times[threads])
    assert tuner.best(lone) == 1 and tuner.best(batch) == 2
    assert not tuner.is_trial(lone, 1) and tuner.is_trial(lone, 2)  # a re-check of the runner-up is one too
    rechecks = []
    for i in range(7 * EXPLORE_EVERY):
        threads = tuner.choose(lone)
        tuner.record(lone, threads, {1: 0.01, 2: 0.08}[threads])
        if threads == 2:
            rechecks.append(i)
    # The runner-up is re-measured now and then; each time it loses, the next re-check waits twice as long.
    assert rechecks == [2 * EXPLORE_EVERY - 1, 6 * EXPLORE_EVERY - 1]


def test_thread_tuner_runs_a_size_never_run_at_the_count_of_the_nearest_size_run():
    """A pass of a new size is not a trial (which can be many times slower than admission's
    estimate): it runs where the nearest measured size is best; the other count is tried at its next
    pass, as a re-check (which the engine runs only when the requests in flight can afford it), and
    once it loses, after the usual interval."""
    tuner = ThreadTuner(2)
    measured, new = ("prefill", 256), ("prefill", 1024)
    for _ in range(2):
        threads = tuner.choose(measured, explore=True)
        tuner.record(measured, threads, {1: 0.3, 2: 0.2}[threads])
    used = []
    for _ in range(EXPLORE_EVERY + 2):
        threads = tuner.choose(new)
        used.append((threads, tuner.is_trial(new, threads)))
        tuner.record(new, threads, {1: 1.2, 2: 0.8}[threads])
    assert used[:2] == [(2, False), (1, True)]
    assert used[2:-1] == [(2, False)] * (EXPLORE_EVERY - 1) and used[-1] == (1, True)
    assert tuner.extra_seconds(new, 1) == pytest.approx(0.4)
    assert ThreadTuner(2).choose(("prefill", 8)) == 1  # nothing measured yet: each count in turn


def test_a_count_a_size_never_ran_at_is_judged_by_the_nearest_size_that_ran_at_both():
    """A size that only ran at two threads re-checks one thread only when the requests in flight can
    afford it: what that costs is judged by the nearest size of its sort timed at both counts. When a
    neighbour makes two threads slow there, trying one thread costs nothing, so the re-check runs."""
    tuner = ThreadTuner(2)
    lone, batch, other = ("decode", 1), ("decode", 4), ("prefill", 4)
    for threads, seconds in ((1, 0.075), (2, 0.045)):
        tuner.record(lone, threads, seconds)
    tuner.record(batch, 2, 0.06)
    tuner.record(other, 2, 0.1)
    assert tuner.extra_seconds(batch, 1) == pytest.approx(0.06 * (0.075 / 0.045 - 1))
    assert tuner.extra_seconds(other, 1) == math.inf  # nothing of its sort ran at both
    for _ in range(3):  # a neighbour: two threads are slow now
        tuner.record(lone, 2, 1.5)
    assert tuner.extra_seconds(batch, 1) == 0.0


@pytest.mark.timeout(60)
@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the CPU's attention path")
async def test_cpu_attention_without_key_copies_gives_the_same_replies(tmp_path, tokenizer):
    """Loaded for the CPU, a grouped-query model attends through SDPA's own grouped heads whenever a
    mask is needed (padded rows, a prompt continuing a cached prefix): replies are those of plain SDPA."""
    from transformers import AutoModelForCausalLM

    build_random_causal_lm("llama", len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, _ = load_model(ModelSource(str(tmp_path / "m")), choose_placement("cpu"))
    assert model.config._attn_implementation == "ttt_cpu_sdpa"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reference.config._attn_implementation == "sdpa"
    rng = random.Random(5)
    first, other = random_prompt(40, rng, len(tokenizer)), random_prompt(25, rng, len(tokenizer))
    engine = LocalEngine(model, tokenizer, prefix_cache_mb=16)
    await reply(engine, first)
    _, reply_ids = sequential(reference, tokenizer, first, GREEDY)
    follow_up = first + reply_ids + random_prompt(6, rng, len(tokenizer))
    texts, stats = zip(*[await reply(engine, p) for p in (follow_up, other)])
    await engine.close()
    assert stats[0].cached_tokens > 0
    assert list(texts) == [sequential(reference, tokenizer, p, GREEDY)[0] for p in (follow_up, other)]
