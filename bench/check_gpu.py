"""`make check-gpu`: the GPU paths, run on this machine's CUDA device, every figure printed.

The CPU paths are checked by `make test` on every machine; the CUDA ones only run where there is a
GPU, so this is what a GPU machine runs:
1. the cache-layout exactness tests and the prefix-cache tests, their models on the GPU
   (TTT_TEST_DEVICE=cuda: batched == sequential `generate`, greedy and seeded, every layout);
2. bench/generator.py --device cuda: this generator against sequential `generate` and
   `generate_batch`, bfloat16 with SDPA;
3. bench/conversation.py --device cuda: the shipped persona's growing conversations, the prefix
   cache, a lone reply's ms per token, greedy replies on three runs;
4. bench/voice.py: speech synthesis (pocket-tts, XTTS) and Whisper (transformers, faster-whisper),
   on the GPU since voice.device and voice.listen.device are auto.
Each step runs in a process of its own, its output streamed; then one line per step with its last
line (the figures) and whether it passed. Exit status 0 only if every step passed; without a CUDA
device, one line that says so and exit status 2.
Run: python bench/check_gpu.py [--only tests,generator,conversation,voice] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STEPS = {
    "tests": ("exactness and prefix-cache tests on the GPU",
              [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_generator_archs.py",
               "tests/test_generator_prefix.py"], {"TTT_TEST_DEVICE": "cuda"}),
    "generator": ("bench/generator.py, bfloat16", [PYTHON, "bench/generator.py", "--device", "cuda"], {}),
    "conversation": ("bench/conversation.py, bfloat16", [PYTHON, "bench/conversation.py", "--device", "cuda"], {}),
    "voice": ("bench/voice.py: speech synthesis and Whisper", [PYTHON, "bench/voice.py"], {}),
}


def describe_gpu() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
            f"bfloat16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def run_step(title: str, command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run one step, streaming its output; (exit status, its last line, seconds)."""
    print(f"== {title}: {' '.join(Path(c).name if c == PYTHON else c for c in command)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    last = ""
    for line in process.stdout:
        print(f"   {line}", end="", flush=True)
        last = line.strip() or last
    status = process.wait()
    watchdog.cancel()
    if time.monotonic() - started >= timeout:
        last = f"stopped after {timeout:.0f} s"
    return status, last, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STEPS), help="the steps to run, of: " + ", ".join(STEPS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each step may take")
    args = parser.parse_args()
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"check-gpu: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        print(f"check-gpu: no CUDA device here (torch {torch.__version__}, {build}); run it on a machine with an "
              f"NVIDIA GPU, set up with `make setup TORCH_SPEC=torch` (PyPI's CUDA build)", file=sys.stderr)
        return 2
    gpu = describe_gpu()
    print(f"check-gpu on {gpu}", flush=True)
    results = [(name, *run_step(STEPS[name][0], *STEPS[name][1:], args.timeout)) for name in steps]
    print(f"== check-gpu on {gpu}:")
    for name, status, last, seconds in results:
        print(f"{'ok  ' if status == 0 else 'FAIL'} {STEPS[name][0]} ({seconds:.0f} s): {last}")
    return 0 if all(status == 0 for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
