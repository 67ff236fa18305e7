"""Benchmark: the shared generator against sequential `generate` and transformers' `generate_batch`.

A DialoGPT-small-shaped GPT-2 (12 layers, width 768, random weights: nothing to download).
32 conversations arrive at staggered times with 30-60 token prompts and want 32 new tokens each,
sampling on. Then the other cache layouts, each an 8-layer, width-512 model of its architecture
(Llama: full attention; Mistral and Phi-3: sliding window of 32, shorter than the prompts;
Gemma-3: sliding and full layers; Qwen2: full, then sliding layers), 16 requests at once, against
`generate_batch` (transformers' continuous batching with a paged cache).
Run: python bench/generator.py [--requests 32] [--archs llama,mistral,...] [--device cuda]
(on CUDA the models run in bfloat16 with SDPA). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models
import transformers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.config.schema import Decoding
from core.engine.local import LocalEngine, PreparedPrompt
from core.engine.threads import in_own_thread

VOCAB = 50257
NEW_TOKENS = 32
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
WINDOW = 32
SHAPE = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1,
             pad_token_id=VOCAB - 1)
# Set from --device: the CPU in float32, or a GPU in bfloat16.
DEVICE, DTYPE = torch.device("cpu"), torch.float32
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE),
    "mistral": lambda: transformers.MistralConfig(sliding_window=WINDOW, **SHAPE),
    "phi3": lambda: transformers.Phi3Config(sliding_window=WINDOW, **SHAPE),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        sliding_window=WINDOW, head_dim=64, layer_types=["sliding_attention"] * 5 + ["full_attention"] * 3, **SHAPE),
    "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=4,
                                              **SHAPE),
}


def build_model() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=VOCAB, eos_token_id=VOCAB - 1,
                        bos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(config).eval().to(DEVICE, DTYPE), build_tokenizer()


def build_tokenizer() -> PreTrainedTokenizerFast:
    # A byte-level vocabulary of GPT-2's size, so decoding costs what it costs with the real one.
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x1A0)]
    vocab = {ch: i for i, ch in enumerate(alphabet[:256])}
    rng = random.Random(0)
    while len(vocab) < VOCAB - 1:
        vocab.setdefault("".join(rng.choices(alphabet[:94], k=rng.randint(2, 7))), len(vocab))
    vocab["<|endoftext|>"] = VOCAB - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def workload(n: int, spread_s: float) -> list[tuple[float, list[int]]]:
    rng = random.Random(1)
    arrivals = sorted(rng.uniform(0, spread_s) for _ in range(n))
    return [(t, [rng.randrange(VOCAB - 1) for _ in range(rng.randint(30, 60))]) for t in arrivals]


def summarize(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(latencies)
    row = dict(
        name=name, wall=wall, replies_s=len(lat) / wall, tokens_s=tokens / wall,
        p50=statistics.median(lat), p95=lat[min(len(lat) - 1, int(0.95 * len(lat)))],
    )
    print(f"{name:<28} wall {wall:6.2f}s  replies/s {row['replies_s']:6.2f}  tokens/s {row['tokens_s']:7.1f}  "
          f"p50 {row['p50']:6.2f}s  p95 {row['p95']:6.2f}s", flush=True)
    return row


def run_sequential(model, work) -> dict:
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, pad_token_id=VOCAB - 1, **SAMPLING)
    start = time.monotonic()
    latencies, tokens = [], 0
    with torch.inference_mode():
        for arrival, prompt in work:
            delay = start + arrival - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            out = model.generate(torch.tensor([prompt], device=DEVICE), generation_config=config)
            tokens += out.shape[1] - len(prompt)
            latencies.append(time.monotonic() - start - arrival)
    return summarize("(a) sequential generate", latencies, tokens, time.monotonic() - start)


def run_generate_batch(model, work) -> dict:
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                              max_batch_tokens=4096, **SAMPLING)
    # generate_batch takes every request up front (an advantage: it never waits for arrivals).
    start = time.monotonic()
    results = model.generate_batch(inputs=[p for _, p in work], generation_config=config, progress_bar=False)
    wall = time.monotonic() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return summarize("(b) generate_batch", [wall] * len(work), tokens, wall)


async def run_engine(engine: LocalEngine, work) -> tuple[dict, float]:
    decoding = Decoding(max_new_tokens=NEW_TOKENS, **SAMPLING)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    async def one(arrival: float, prompt: list[int]) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
        generation = engine.submit(prompt, decoding)
        await generation.text()
        return time.monotonic() - start - arrival, generation.stats.new_tokens

    tick = asyncio.create_task(ticker())
    start = time.monotonic()
    done = await asyncio.gather(*(one(a, p) for a, p in work))
    wall = time.monotonic() - start
    stop.set()
    await tick
    row = summarize("(c) talk-to-transformers", [d[0] for d in done], sum(d[1] for d in done), wall)
    lags.sort()
    return row, lags[int(0.99 * (len(lags) - 1))] * 1000


def direct_single(model, prompt: list[int], repeats: int = 3) -> float:
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=VOCAB - 1,
                              **SAMPLING)
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        with torch.inference_mode():
            model.generate(torch.tensor([prompt], device=DEVICE), generation_config=config)
        times.append(time.monotonic() - start)
    return min(times)


async def engine_single(engine: LocalEngine, prompt: list[int], repeats: int = 3) -> float:
    decoding = Decoding(max_new_tokens=NEW_TOKENS, **SAMPLING)
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        await engine.submit(PreparedPrompt(prompt, frozenset()), decoding).text()
        times.append(time.monotonic() - start)
    return min(times)


async def compare_architecture(arch: str, tokenizer, requests: int) -> float:
    """Tokens/s of this generator and of `generate_batch`, every request submitted at once."""
    torch.manual_seed(0)
    model = in_own_thread(lambda: transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval()
                          .to(DEVICE, DTYPE))
    work = [p for _, p in workload(requests, 0.0)]
    engine = LocalEngine(model, tokenizer, name=arch, max_batch_size=requests)
    await engine.wait_started()
    await engine.submit(work[0], Decoding(max_new_tokens=2)).text()  # warm-up
    decoding = Decoding(max_new_tokens=NEW_TOKENS, **SAMPLING)
    start = time.monotonic()
    generations = [engine.submit(p, decoding) for p in work]
    await asyncio.gather(*(g.text() for g in generations))
    ours = sum(g.stats.new_tokens for g in generations) / (time.monotonic() - start)
    await engine.close()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                              max_batch_tokens=4096, **SAMPLING)

    def theirs() -> tuple[float, list[str]]:
        start = time.monotonic()
        results = model.generate_batch(inputs=work, generation_config=config, progress_bar=False)
        speed = sum(len(r.generated_tokens) for r in results.values()) / (time.monotonic() - start)
        with torch.inference_mode():
            layers = model(torch.tensor([work[0]], device=DEVICE), use_cache=True).past_key_values.layers
        return speed, sorted({type(layer).__name__ for layer in layers})

    speed, layers = in_own_thread(theirs)
    print(f"{arch:<8} ({', '.join(layers)})  generator {ours:6.1f} tokens/s  generate_batch {speed:6.1f} tokens/s  "
          f"ratio {ours / speed:.2f}", flush=True)
    return ours / speed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--spread", type=float, default=2.0, help="arrivals spread over this many seconds")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="other architectures to compare")
    parser.add_argument("--arch-requests", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16)")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE = torch.device(args.device)
    DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    where = f"torch threads {torch.get_num_threads()}" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    print(f"{where}, {DTYPE}, building DialoGPT-small-shaped model...", flush=True)
    model, tokenizer = in_own_thread(build_model)
    work = workload(args.requests, args.spread)
    direct = in_own_thread(direct_single, model, work[0][1])
    a = in_own_thread(run_sequential, model, work)
    b = in_own_thread(run_generate_batch, model, work)
    engine = LocalEngine(model, tokenizer, name="bench", max_batch_size=args.requests)
    await engine.wait_started()
    await engine.submit(work[0][1], Decoding(max_new_tokens=2)).text()  # warm-up
    ours = await engine_single(engine, work[0][1])
    print(f"idle single request: direct generate {direct:.3f}s, generator {ours:.3f}s", flush=True)
    ratio_idle = ours / direct
    c, lag_p99 = await run_engine(engine, work)
    await engine.close()
    vs_a, vs_b = c["tokens_s"] / a["tokens_s"], c["tokens_s"] / b["tokens_s"]
    print(f"c/a {vs_a:.2f}x (target >= 5)  c/b {vs_b:.2f}x (target >= 1.5)  "
          f"loop lag p99 {lag_p99:.1f} ms (target < 50)  idle {ratio_idle:.2f}x (target <= 1.15)", flush=True)
    ratios = [await compare_architecture(arch, tokenizer, args.arch_requests) for arch in args.archs.split(",") if arch]
    print(f"vs_sequential={vs_a:.2f} vs_generate_batch={vs_b:.2f} loop_lag_p99_ms={lag_p99:.1f} "
          f"idle_ratio={ratio_idle:.2f}" + (f" archs_vs_generate_batch_min={min(ratios):.2f}" if ratios else ""))


if __name__ == "__main__":
    asyncio.run(main())
