"""Benchmark: does the recipe turn real conversation into a persona that talks like it?

chitchat-dataset (7,168 real conversations between students, MIT) goes through the commands a user
runs, in a fresh working directory: `ttt import jsonl` -> `ttt build-data` (with DialoGPT's Reddit
filters, for the report, then with the chat filters imports get) -> `ttt train --base-model smol
--lora` (the default persona's own base, SmolLM2-135M-Instruct, from its package:// GGUF, offline)
-> `ttt eval` on held-out whole conversations: perplexity of the base and of the fine-tune on the
same replies, distinct-1/2 and length of sampled replies, twenty replies side by side (eval.md).

Run: python bench/persona.py [--work DIR] [--steps N] [--full]. Long: run it alone, under
`flock /tmp/ttt-heavy.lock` on a shared machine. The last line is machine-readable:
ppl_base=X ppl_tuned=Y ppl_drop=Z distinct2=W train_minutes=M
Targets: ppl_drop >= 0.30, distinct2 >= 0.40, train_minutes <= 30 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name hides the training package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from training.dataset import RULES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAME = "chitchat"
CONSENT = ("Chit-Chat Challenge participants (BYU PCC lab) chatted to make this corpus; it is published "
           "under the MIT licence as chitchat-dataset")
# The recipe. A 12-step run measured it first on this 2-core CPU: ~10 s a step (bf16, one thread on a busy
# machine), 90 s a validation; 100 steps and two validations fit 30 minutes with room to spare.
STEPS = 100  # optimizer steps of BATCH_SIZE sessions: 800 of the ~16,000 training sessions
BATCH_SIZE = 8
LEARNING_RATE = 1e-3  # LoRA's; a small adapter learns a style quickly at this rate
MAX_LENGTH = 384  # tokens per session (ten turns of chat fit)
SYSTEM_PROMPT = "You are a student chatting with another student."
VALIDATION_FRACTION = 0.014  # about 60 held-out conversations
SAMPLES = 20


def run(args: list[str], cwd: Path, env: dict) -> str:
    """A `ttt` command, its output shown as it runs and returned; the benchmark stops if it fails."""
    command = [sys.executable, "-m", "ttt", "--config", str(REPO / "config.yaml"), *args]
    print(f"\n$ ttt {' '.join(args)}", flush=True)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait():
        sys.exit(f"ttt {args[0]} failed (exit {process.returncode})")
    return "".join(lines)


def write_conversations(path: Path) -> int:
    """chitchat-dataset as `ttt import jsonl` reads it: one conversation per line, a turn per message."""
    import chitchat_dataset

    data = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as out:
        for conversation_id, conversation in data.items():
            turns = [{"author": m["sender"], "text": m["text"], "time": m["timestamp"]}
                     for turn in conversation["messages"] for m in turn]
            out.write(json.dumps({"id": conversation_id, "turns": turns}) + "\n")
    return len(data)


def filter_table(reddit: dict, chat: dict) -> str:
    """What each filter dropped (the first rule a turn fails), with DialoGPT's Reddit settings and with chat's."""
    rows = [("rule", "reddit", "chat")]
    rows += [(f"dropped: {rule}", reddit["turns_dropped"].get(rule, 0), chat["turns_dropped"].get(rule, 0))
             for rule in RULES if reddit["turns_dropped"].get(rule) or chat["turns_dropped"].get(rule)]
    rows += [("pruned below a dropped turn", reddit["turns_under_dropped"], chat["turns_under_dropped"]),
             ("turns kept", reddit["turns_kept"], chat["turns_kept"]),
             ("share of turns kept", f"{reddit['turns_kept'] / reddit['turns']:.1%}",
              f"{chat['turns_kept'] / chat['turns']:.1%}"),
             ("training sessions", reddit["train_sessions"], chat["train_sessions"])]
    return "\n".join(f"{a:<32}{b:>10}{c:>10}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--full", action="store_true", help="fine-tune every weight instead of a LoRA adapter (GPU)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-persona-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    on_gpu = torch.cuda.is_available()
    fast_bf16 = torch.cpu._is_avx512_bf16_supported()  # AVX512-BF16 or AMX: bfloat16 is ~1.5x faster
    precision = "auto" if on_gpu else ("bf16" if fast_bf16 else "no")
    print(f"working in {work}; {'CUDA' if on_gpu else f'CPU, {os.cpu_count()} cores'}; "
          f"{'full fine-tuning' if args.full else 'LoRA'}; mixed precision {precision}")

    conversations = write_conversations(work / "chitchat.jsonl")
    print(f"{conversations} conversations from chitchat-dataset")
    run(["import", "jsonl", "chitchat.jsonl", "--name", NAME, "--consent", CONSENT], work, env)
    split = ["--validation-fraction", str(VALIDATION_FRACTION)]
    run(["build-data", "--name", NAME, "--filters", "reddit", "--out", "reddit-filters", *split], work, env)
    run(["build-data", "--name", NAME, *split], work, env)
    reddit = json.loads((work / "reddit-filters/report.json").read_text())
    chat = json.loads((work / f"data/training/{NAME}/report.json").read_text())
    print("\nWhat each filter dropped, of", chat["turns"], "turns (DialoGPT's Reddit filters prune what follows a"
          " dropped turn; a chat conversation is a chain, so they keep little):")
    print(filter_table(reddit, chat))

    started = time.perf_counter()
    adapter = [] if args.full else ["--lora", "--lr", str(LEARNING_RATE)]  # full: the default rate, 5e-5
    run(["train", "--name", NAME, "--base-model", "smol", *adapter,
         "--max-steps", str(args.steps), "--batch-size", str(BATCH_SIZE), "--grad-accum", "1", "--max-length", str(MAX_LENGTH),
         "--eval-interval", str(args.steps), "--log-interval", "10", "--mixed-precision", precision,
         "--system-prompt", SYSTEM_PROMPT], work, env)
    train_minutes = (time.perf_counter() - started) / 60
    evaluation = run(["eval", "--name", NAME, "--samples", str(SAMPLES)], work, env)
    metrics = dict(re.findall(r"(\w+)=([-\d.]+)", evaluation.strip().splitlines()[-1]))
    print(f"\nreplies side by side: {work / 'personalities' / NAME / 'eval.md'}")
    print(f"ppl_base={metrics['ppl_base']} ppl_tuned={metrics['ppl_tuned']} ppl_drop={metrics['ppl_drop']} "
          f"distinct2={metrics['distinct2']} train_minutes={train_minutes:.1f}")


if __name__ == "__main__":
    main()
