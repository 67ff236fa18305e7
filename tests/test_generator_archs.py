"""The generator is exact for every cache layout: batched == sequential `generate`, joins forced.

Tiny random models of each architecture (full attention, sliding windows smaller than the prompts,
hybrid sliding + full, convolution + attention); each request is submitted once the previous one
has streamed its first piece, so it must join a batch that is already decoding.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from core.config.schema import Decoding
from core.engine.local import LocalEngine, PreparedPrompt
from tiny import ARCHITECTURES, build_random_causal_lm, build_tokenizer

JOINABLE = ("gpt2", "llama", "mistral", "gemma3", "qwen2", "phi3")
# Prompt length and reply length per request: the first (longest) leaves before the others, so the
# batch is trimmed while rows that joined later go on decoding.
SHAPES = [(30, 40), (10, 56), (20, 48), (12, 24)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def random_prompt(length: int, rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def decodings(seed: int) -> list[Decoding]:
    """Greedy and seeded sampling, alternating, each with its request's length."""
    out = []
    for i, (_, new) in enumerate(SHAPES):
        if i % 2:
            out.append(Decoding(do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=seed + i, max_new_tokens=new))
        else:
            out.append(Decoding(do_sample=False, max_new_tokens=new))
    return out


def sequential(model, tokenizer, prompt: list[int], decoding: Decoding) -> tuple[str, list[int]]:
    """What `generate` replies to this prompt alone (seeded through the global generator)."""
    kwargs = dict(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample, pad_token_id=0)
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
        torch.manual_seed(decoding.seed)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=model.device),
                             attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=model.device),
                             **kwargs)
    ids = out[0, len(prompt):].tolist()
    return tokenizer.decode(ids, skip_special_tokens=True), ids


async def first_token(generation) -> None:
    """Wait until the request has produced its first token (its text may not show yet)."""
    while generation.stats.first_token_s is None:
        await asyncio.sleep(0.001)


async def forced_joins(engine: LocalEngine, prompts: list[list[int]], decodings: list[Decoding]):
    """Submit each request once the previous one has its first token; returns (texts, generations)."""
    generations, tasks = [], []
    for prompt, decoding in zip(prompts, decodings):
        generation = engine.submit(PreparedPrompt(prompt, frozenset()), decoding, timeout=60)
        tasks.append(asyncio.create_task(generation.text()))
        generations.append(generation)
        await asyncio.wait_for(first_token(generation), 30)
    return await asyncio.gather(*tasks), generations


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_batched_equals_sequential_generate_with_forced_joins(arch, tokenizer):
    model = build_random_causal_lm(arch, len(tokenizer))
    rng = random.Random(arch)
    prompts = [random_prompt(length, rng, len(tokenizer)) for length, _ in SHAPES]
    wanted = decodings(seed=11)
    expected = [sequential(model, tokenizer, p, d)[0] for p, d in zip(prompts, wanted)]
    engine = LocalEngine(model, tokenizer, max_batch_size=8)
    got, generations = await forced_joins(engine, prompts, wanted)
    await engine.close()
    assert got == expected
    assert all(g.stats.new_tokens == d.max_new_tokens for g, d in zip(generations, wanted))
    joined = [g.stats.joined_running_batch for g in generations]
    if arch in JOINABLE:
        assert joined == [False, True, True, True] and engine.joins == 3
    else:  # its cache cannot take rows mid-batch: each request waited for the batch to drain
        assert not any(joined) and engine.joins == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
async def test_prefix_cache_reuse_is_exact_while_others_decode(arch, tokenizer):
    """A conversation's second turn reuses the first turn's keys/values (prompt and reply) and
    replies exactly as without the cache, greedy and seeded, joining a batch that is decoding."""
    model = build_random_causal_lm(arch, len(tokenizer))
    rng = random.Random(f"prefix-{arch}")
    vocab = len(tokenizer)
    greedy = Decoding(do_sample=False, max_new_tokens=12)
    sampled = Decoding(do_sample=True, temperature=0.8, top_p=0.95, seed=5, max_new_tokens=12)
    engine = LocalEngine(model, tokenizer, max_batch_size=8, prefix_cache_mb=64)
    second_turns = []
    for decoding in (greedy, sampled):
        first_turn = random_prompt(40, rng, vocab)
        first = engine.submit(PreparedPrompt(first_turn, frozenset()), decoding)
        reply_text, reply_ids = sequential(model, tokenizer, first_turn, decoding)
        assert await first.text() == reply_text and first.stats.cached_tokens == 0
        # The next turn: the history (prompt + reply) and a new message.
        second_turns.append((first_turn + reply_ids + random_prompt(9, rng, vocab), decoding,
                             len(first_turn) + len(reply_ids) - 1))  # the reply's last token is never fed back

    background = engine.submit(PreparedPrompt(random_prompt(50, rng, vocab), frozenset()),
                               Decoding(do_sample=False, max_new_tokens=60))
    background_text = asyncio.create_task(background.text())
    await asyncio.wait_for(first_token(background), 30)
    for prompt, decoding, history in second_turns:
        generation = engine.submit(PreparedPrompt(prompt, frozenset()), decoding)
        assert await generation.text() == sequential(model, tokenizer, prompt, decoding)[0]
        assert generation.stats.cached_tokens == history and generation.stats.joined_running_batch
    await background_text
    await engine.close()
    assert engine.prefix_cache.hits == 2
