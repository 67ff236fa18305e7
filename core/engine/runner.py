"""Forward passes of one model for the local engine: prefills and decode steps over a batch's
cache, LoRA adapters served on the shared base model, and the CPU threads each kind of pass gets."""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from core.config.schema import Decoding
from core.engine.capacity import PACE_PASSES, SpeedModel
from core.engine.cpu_kernels import check_kernels
from core.engine.cpu_weights import has_quantized_weights
from core.engine.generator import GenerationFailed
from core.engine.kv_cache import BatchCache, new_cache
from core.engine.prefix_cache import Reuse
from core.engine.sampling import RowSampler, sample
from core.engine.threads import EXPLORE, SERVE, SETTLED, ThreadTuner, bucket
from core.loading import model_loading

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class ModelRunner:
    def __init__(self, model, tokenizer, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        text_config = model.config.get_text_config()
        self.vocab_size = min(len(tokenizer), getattr(text_config, "vocab_size", None) or len(tokenizer))
        self.adapters: dict[str, str] = {}  # adapter directory -> peft adapter name
        self._lock = threading.Lock()
        self.tuner = ThreadTuner(torch.get_num_threads()) if self.device.type == "cpu" else None
        self.trial = False  # the last pass tried a thread count out (its time says little about speed)
        # Whether the requests in flight can afford a pass that many seconds slower than usual (a
        # thread count tried out); the engine answers from its deadlines.
        self.may_spend: Callable[[float], bool] = lambda seconds: True

    def load_adapter(self, path: str) -> None:
        """Load a LoRA adapter onto the shared base model (blocking: call it off the event loop)."""
        with model_loading():
            from peft import PeftModel

        if has_quantized_weights(self.model):
            raise GenerationFailed("LoRA adapters need float weights: set generator.cpu_dtype to float32 or bfloat16")
        with self._lock, model_loading():
            if path in self.adapters:
                return
            name = f"adapter{len(self.adapters)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.adapters[path] = name

    def prefill(self, prompts: list[list[int]], adapters: list[str],
                threads: str = SERVE) -> tuple[BatchCache, torch.Tensor]:
        """Whole prompts together, left-padded to the longest: their cache and next-token logits."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        mask = mask.to(self.device)
        out = self._forward(adapters, ("prefill", bucket(ids.numel())), threads, input_ids=ids.to(self.device),
                            attention_mask=mask, position_ids=positions.to(self.device), logits_to_keep=1,
                            past_key_values=new_cache(self.model.config))
        return BatchCache(out.past_key_values, mask), out.logits[:, -1, :]

    def prefill_after(self, reuse: Reuse, prompt: list[int], adapter: str) -> tuple[BatchCache, torch.Tensor]:
        """Only what follows a reused prefix, on top of its stored keys and values."""
        batch = reuse.state.to_batch(reuse.tokens, owned=reuse.owned)
        rest = prompt[reuse.tokens:]
        batch.mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        out = self._forward([adapter], ("prefill", bucket(len(rest))), SERVE,
                            input_ids=torch.tensor([rest], device=self.device), attention_mask=batch.mask,
                            position_ids=torch.arange(reuse.tokens, len(prompt), device=self.device)[None],
                            past_key_values=batch.cache, logits_to_keep=1)
        return batch, out.logits[:, -1, :]

    def decode(self, batch: BatchCache, tokens: list[int], positions: list[int], adapters: list[str],
               threads: str = SERVE) -> torch.Tensor:
        """One step: feed each row its latest token; the batch's cache grows by a column."""
        batch.grow()
        out = self._forward(adapters, ("decode", bucket(len(tokens))), threads,
                            input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=batch.mask,
                            position_ids=torch.tensor(positions, device=self.device)[:, None],
                            past_key_values=batch.cache)
        batch.cache = out.past_key_values
        return out.logits[:, -1, :]

    def check_kernels(self) -> None:
        """Check the quantized layers' kernels on this CPU, on every thread count the engine may use;
        raises KernelMismatch."""
        if self.tuner is not None and has_quantized_weights(self.model):
            check_kernels(self.model, self.tuner.candidates)

    def calibrate(self, speed: SpeedModel, max_rows: int, context: int) -> None:
        """Time the passes the engine will run into `speed`, sampled as a persona samples: a short
        prefill, a decode step at every batch size from `max_rows` down to one row (rows leave one
        cache, as requests leave a batch), and one row on a `context`-token prompt (what a token of
        context costs). Thread counts are tried where they differ most (a short prompt, the largest
        batch, one row); the sizes between start at the nearest size's count, as when serving.
        Each size ends with a pass at its preferred count, the one admission's estimates are made of
        (trials are not recorded: a re-check can be many times slower than what the engine runs)."""
        tries = len(self.tuner.candidates) if self.tuner else 1
        for _ in range(tries):
            self._timed_prefill(1, 16, speed, EXPLORE)
        self._timed_prefill(1, 16, speed, SETTLED)
        batch, samplers = self._timed_prefill(max_rows, 8, speed, EXPLORE)
        sizes = sorted({1 << i for i in range(max_rows.bit_length())} | {max_rows}, reverse=True)
        for rows in sizes:
            if rows < batch.rows:
                batch.keep(list(range(rows)))
                samplers = samplers[:rows]
            if rows in (max_rows, 1):
                self._timed_steps(batch, samplers, tries, speed, EXPLORE)
            self._timed_steps(batch, samplers, 1, speed, SETTLED)
        batch, samplers = self._timed_prefill(1, context, speed, SETTLED)
        self._timed_steps(batch, samplers, 2, speed, SETTLED)

    def probe(self, speed: SpeedModel) -> None:
        """A short prefill and a few decode steps of one row at their preferred thread counts, timed
        into `speed`: what the passes cost now."""
        batch, samplers = self._timed_prefill(1, 16, speed, SETTLED)
        self._timed_steps(batch, samplers, PACE_PASSES // 2 + 1, speed, SETTLED)  # enough to move the pace's median

    def _timed_prefill(self, rows: int, length: int, speed: SpeedModel,
                       threads: str) -> tuple[BatchCache, list[RowSampler]]:
        generator = torch.Generator().manual_seed(rows * 7919 + length)
        prompts = torch.randint(self.vocab_size, (rows, length), generator=generator).tolist()
        samplers = [RowSampler(Decoding(seed=i), prompt, self.device) for i, prompt in enumerate(prompts)]
        started = time.perf_counter()
        batch, logits = self.prefill(prompts, [BASE_ADAPTER] * rows, threads)
        for sampler, token in zip(samplers, sample(samplers, logits)):
            sampler.append(token)
        if not self.trial:
            speed.record_prefill(rows * length, time.perf_counter() - started)
        return batch, samplers

    def _timed_steps(self, batch: BatchCache, samplers: list[RowSampler], steps: int, speed: SpeedModel,
                     threads: str) -> None:
        rows = len(samplers)
        for _ in range(steps):
            started = time.perf_counter()
            width = batch.width + 1
            positions = [len(s.history) - 1 for s in samplers]
            logits = self.decode(batch, [s.history[-1] for s in samplers], positions, [BASE_ADAPTER] * rows, threads)
            for sampler, token in zip(samplers, sample(samplers, logits)):
                sampler.append(token)
            if not self.trial:
                speed.record_step(rows, width, time.perf_counter() - started)

    def _forward(self, adapters: list[str], kind: tuple, mode: str, **inputs):
        """One forward pass; `adapters` names each row's LoRA adapter (or the base); `mode` says how
        its thread count is chosen: EXPLORE tries every count for a kind not yet measured, SERVE
        takes the tuner's choice (a re-check only when the requests in flight can afford it),
        SETTLED the preferred count (see ThreadTuner)."""
        if self.tuner is not None:
            threads = self.tuner.choose(kind, mode == EXPLORE)
            preferred = self.tuner.preferred(kind)
            if mode == SETTLED and preferred is not None:
                threads = preferred
            elif (mode == SERVE and self.tuner.is_trial(kind, threads)
                    and not self.may_spend(self.tuner.extra_seconds(kind, threads))):
                threads = preferred  # the re-check waits for its next turn
            self.trial = self.tuner.is_trial(kind, threads)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        started = time.perf_counter()
        with self._lock:
            if self.adapters:
                inputs["adapter_names"] = adapters
            out = self.model(use_cache=True, **inputs)
        if self.tuner is not None:
            self.tuner.record(kind, torch.get_num_threads(), time.perf_counter() - started)
        return out
