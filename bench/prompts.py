"""Benchmark: prompt fitting (core.prompts.fit_to_budget) against re-rendering after each dropped turn.

A long conversation (by default 450 messages of ~200 characters, as an API request may carry) is fitted
to a context budget in both prompt formats, by fit_to_budget and by the naive loop it replaced (drop
the oldest turn, render and tokenize everything again), on a byte-level BPE tokenizer with a ChatML
template trained on the fly. Both must give the same prompt; the ratio is naive time / fitted time.
Run: python bench/prompts.py [--messages 450 --chars 200 --budget 1024]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from core.conversation import Turn
from core.prompts import CHATML_TEMPLATE, encode, fit_to_budget

WORDS = "the a to of and in is it you that for on was with he as have be at one this but they".split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def naive_fit(fmt, tokenizer, turns, system_prompt, budget):
    kept = list(turns)
    while kept and len(encode(fmt, tokenizer, kept, system_prompt)) > budget:
        kept.pop(0)
    return kept, encode(fmt, tokenizer, kept, system_prompt)


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=450)
    parser.add_argument("--chars", type=int, default=200, help="characters a message")
    parser.add_argument("--budget", type=int, default=1024, help="context budget in tokens")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    rng = random.Random(1)
    turns = []
    for i in range(args.messages):
        text = ""
        while len(text) < args.chars:
            text += rng.choice(WORDS) + " "
        turns.append(Turn("user" if i % 2 == 0 else "bot", f"user{i % 3}", text.strip()))
    print(f"{args.messages} messages of ~{args.chars} characters, budget {args.budget} tokens")
    figures = {}
    for fmt in ("dialogpt", "chat"):
        naive_s, expected = timed(naive_fit, fmt, tokenizer, turns, "Be brief.", args.budget)
        fitted_s, got = timed(fit_to_budget, fmt, tokenizer, turns, "Be brief.", args.budget)
        assert got == expected, "fit_to_budget differs from the naive loop"
        ratio = naive_s / fitted_s
        print(f"{fmt:<9} kept {len(got[0]):>3} turns ({len(got[1])} tokens): naive {naive_s * 1000:9.1f} ms, "
              f"fit_to_budget {fitted_s * 1000:7.2f} ms, {ratio:,.0f}x faster", flush=True)
        figures[fmt] = {"naive_ms": round(naive_s * 1000, 2), "fit_ms": round(fitted_s * 1000, 3),
                        "speedup": round(ratio, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
