"""Benchmark: training throughput and padding, with and without length grouping.

A small GPT-2 (4 layers, width 256, random weights: nothing to download) is fine-tuned by
training.train on synthetic Reddit-shaped sessions (2-10 turns, mostly short, 2-30 words a turn)
with the same steps, batch size and seed, once with length-grouped batches and once in plain
random order, alternately, best run of each. Tokens/s counts real (non-padding) tokens.
Run: python bench/training.py [--steps 40 --threads 1]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name hides the training package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from training.train import train  # noqa: E402
from training.train_config import TrainConfig  # noqa: E402

WORDS = 2000


def build_base(path: Path) -> None:
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=512, vocab_size=len(vocab),
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_sessions(path: Path, n: int) -> None:
    rng = random.Random(0)
    path.mkdir(parents=True)
    with (path / "train.jsonl").open("w") as f:
        for i in range(n):
            turns = min(10, 2 + int(rng.expovariate(0.5)))  # most sessions are 2-3 turns, a few reach 10
            session = [{"author": f"u{t % 2}", "text": " ".join(f"w{rng.randrange(WORDS)}"
                                                             for _ in range(rng.randint(2, 30)))}
                       for t in range(turns)]
            f.write(json.dumps({"turns": session, "submission_id": str(i)}) + "\n")


def run(work: Path, base: Path, data: Path, group: bool, steps: int, batch_size: int) -> tuple[float, float]:
    cfg = TrainConfig(
        data_dir=data, out_dir=work / f"out-{group}", checkpoint_dir=work / f"ckpt-{group}", base_model=str(base),
        format="dialogpt", max_steps=steps, batch_size=batch_size, grad_accum=1, learning_rate=1e-4,
        group_by_length=group, max_length=256, log_interval=steps, eval_interval=steps, mixed_precision="no",
    )
    result = train(cfg, quiet=True)
    return result.tokens_per_s, result.padding_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the best counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_base(work / "base")
        write_sessions(work / "data", args.sessions)
        print(f"small GPT-2 (4 x 256), {args.sessions} sessions, {args.steps} steps of {args.batch_size}, "
              f"{torch.get_num_threads()} CPU threads", flush=True)
        rows: dict[bool, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for group in (False, True):
                started = time.perf_counter()
                tokens_s, padding = run(work, work / "base", work / "data", group, args.steps, args.batch_size)
                rows[group] = max(rows.get(group, (0.0, padding)), (tokens_s, padding))
                name = "length-grouped batches" if group else "random batches"
                print(f"{name:<24} {tokens_s:9,.0f} tokens/s   padding {padding:6.1%}   "
                      f"({time.perf_counter() - started:.1f}s with loading and saving)", flush=True)
    ratio = rows[True][0] / rows[False][0]
    print(f"length grouping: {ratio:.2f}x the tokens/s, padding {rows[False][1]:.1%} -> {rows[True][1]:.1%}")
    print(json.dumps({"tokens_s_random": round(rows[False][0]), "tokens_s_grouped": round(rows[True][0]),
                      "padding_random": round(rows[False][1], 4), "padding_grouped": round(rows[True][1], 4),
                      "speedup": round(ratio, 3)}))


if __name__ == "__main__":
    main()
