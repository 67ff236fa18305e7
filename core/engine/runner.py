"""Forward passes of one model for the local engine: prefills and decode steps over a batch's
cache, LoRA adapters served on the shared base model, and the CPU threads each kind of pass gets."""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from core.config.schema import Decoding
from core.engine.capacity import SpeedModel
from core.engine.cpu_kernels import check_kernels
from core.engine.cpu_weights import has_quantized_weights
from core.engine.generator import GenerationFailed
from core.engine.kv_cache import BatchCache, new_cache
from core.engine.prefix_cache import Reuse
from core.engine.sampling import RowSampler, sample
from core.engine.threads import ThreadTuner, bucket
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
                explore: bool = False) -> tuple[BatchCache, torch.Tensor]:
        """Whole prompts together, left-padded to the longest: their cache and next-token logits."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        mask = mask.to(self.device)
        out = self._forward(adapters, ("prefill", bucket(ids.numel())), explore, input_ids=ids.to(self.device),
                            attention_mask=mask, position_ids=positions.to(self.device), logits_to_keep=1,
                            past_key_values=new_cache(self.model.config))
        return BatchCache(out.past_key_values, mask), out.logits[:, -1, :]

    def prefill_after(self, reuse: Reuse, prompt: list[int], adapter: str) -> tuple[BatchCache, torch.Tensor]:
        """Only what follows a reused prefix, on top of its stored keys and values."""
        batch = reuse.state.to_batch(reuse.tokens, owned=reuse.owned)
        rest = prompt[reuse.tokens:]
        batch.mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        out = self._forward([adapter], ("prefill", bucket(len(rest))), False,
                            input_ids=torch.tensor([rest], device=self.device), attention_mask=batch.mask,
                            position_ids=torch.arange(reuse.tokens, len(prompt), device=self.device)[None],
                            past_key_values=batch.cache, logits_to_keep=1)
        return batch, out.logits[:, -1, :]

    def decode(self, batch: BatchCache, tokens: list[int], positions: list[int], adapters: list[str],
               explore: bool = False) -> torch.Tensor:
        """One step: feed each row its latest token; the batch's cache grows by a column."""
        batch.grow()
        out = self._forward(adapters, ("decode", bucket(len(tokens))), explore,
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

    def time_passes(self, rows: int, speed: SpeedModel | None, length: int, steps: int, explore: bool = False) -> None:
        """A prefill of `rows` random prompts of `length` tokens, then `steps` decode steps, each
        sampled as a persona samples and timed into `speed` (unless it tried a thread count out)."""
        generator = torch.Generator().manual_seed(rows * 7919 + length)
        prompts = torch.randint(self.vocab_size, (rows, length), generator=generator).tolist()
        samplers = [RowSampler(Decoding(seed=i), prompt, self.device) for i, prompt in enumerate(prompts)]
        adapters = [BASE_ADAPTER] * rows
        started = time.perf_counter()
        batch, logits = self.prefill(prompts, adapters, explore)
        tokens = sample(samplers, logits)
        if speed and not self.trial:
            speed.record_prefill(rows * length, time.perf_counter() - started)
        for step in range(steps):
            started = time.perf_counter()
            width = batch.width + 1
            logits = self.decode(batch, tokens, [length + step] * rows, adapters, explore)
            tokens = sample(samplers, logits)
            for sampler, token in zip(samplers, tokens):
                sampler.append(token)
            if speed and not self.trial:
                speed.record_step(rows, width, time.perf_counter() - started)

    def _forward(self, adapters: list[str], kind: tuple, explore: bool, **inputs):
        """One forward pass; `adapters` names each row's LoRA adapter (or the base); `explore` tries
        every thread count for a kind not yet measured (see ThreadTuner.choose)."""
        if self.tuner is not None:
            threads = self.tuner.choose(kind, explore)
            if (not explore and self.tuner.is_trial(kind, threads)
                    and not self.may_spend(self.tuner.extra_seconds(kind, threads))):
                threads = self.tuner.preferred(kind)  # the re-check waits for its next turn
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
