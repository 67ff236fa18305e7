"""The shared generator: one engine per loaded model, batching every conversation's requests.

The engine decodes in a worker thread with iteration-level (continuous) batching: each step
runs one forward pass for every active request; requests that arrive meanwhile are prefilled
and join the running batch at the next step, their key/value cache left-padded to line up.
The event loop only hands requests over and receives text pieces.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import torch
import torch.nn.functional as F

from core import prompts
from core.config import Decoding
from core.conversation import Turn
from core.metrics import Metrics
from core.sampling import RowSampler, sample

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class GeneratorBusy(Exception):
    """The queue is full; try again in a moment."""


class GenerationFailed(Exception):
    """This request could not be generated (others are unaffected)."""


class GenerationTimeout(GenerationFailed):
    """The request ran past its deadline."""


class GenerationCancelled(GenerationFailed):
    """The caller gave up on this request."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    queue_wait_s: float = 0.0
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = ""


class Generation:
    """One request's output: iterate for text pieces, or await `text()`; `cancel()` stops it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout if timeout else None
        self.cancelled = False
        self.stats = GenerationStats()
        self._done = False
        self._pieces: list[str] = []

    def push(self, kind: str, value) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the loop has closed: nobody is listening any more

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while not self._done:
                remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic()) + 1.0
                try:
                    kind, value = await asyncio.wait_for(self._events.get(), remaining)
                except asyncio.TimeoutError:
                    raise GenerationTimeout("the reply took too long") from None
                if kind == "text":
                    self._pieces.append(value)
                    yield value
                elif kind == "done":
                    self._done = True
                else:
                    self._done = True
                    raise value
        finally:
            if not self._done:
                self.cancel()

    async def text(self) -> str:
        async for _ in self:
            pass
        return "".join(self._pieces)


class Engine:
    """What every backend offers: prepare a prompt from turns, submit it, close."""

    name: str

    def prepare(self, fmt: str, turns: Sequence[Turn], system_prompt: str, budget: int):
        raise NotImplementedError

    def submit(self, prompt, decoding: Decoding, timeout: float | None = None, adapter: str | None = None) -> Generation:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


@dataclass
class _Row:
    generation: Generation
    prompt: list[int]
    sampler: RowSampler
    max_new_tokens: int
    position: int
    adapter: str = BASE_ADAPTER
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""


class LocalEngine(Engine):
    """A transformers causal LM on this machine, serving many requests at once."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "local",
        max_batch_size: int = 32,
        max_queue: int = 128,
        metrics: Metrics | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.device = next(model.parameters()).device
        config = model.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in eos + [tokenizer.eos_token_id] if t is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._pending: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._cv = threading.Condition()
        self._model_lock = threading.Lock()
        self._adapters: dict[str, str] = {}  # adapter directory -> peft adapter name
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def prepare(self, fmt: str, turns: Sequence[Turn], system_prompt: str, budget: int) -> list[int]:
        return prompts.fit_to_budget(fmt, self.tokenizer, turns, system_prompt, budget)[1]

    def has_adapter(self, path: str) -> bool:
        return path in self._adapters

    def load_adapter(self, path: str) -> None:
        """Load a LoRA adapter onto the shared base model (blocking: call it off the event loop)."""
        from peft import PeftModel

        with self._model_lock:
            if path in self._adapters:
                return
            name = f"adapter{len(self._adapters)}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self._adapters[path] = name

    def submit(
        self, prompt: list[int], decoding: Decoding, timeout: float | None = None, adapter: str | None = None
    ) -> Generation:
        if adapter is not None and adapter not in self._adapters:
            raise GenerationFailed(f"adapter {adapter} is not loaded")
        generation = Generation(asyncio.get_running_loop(), timeout)
        if not prompt:
            raise GenerationFailed("empty prompt")
        max_new = decoding.max_new_tokens
        if self.max_positions:
            if len(prompt) >= self.max_positions:
                raise GenerationFailed(
                    f"prompt of {len(prompt)} tokens does not fit the model's {self.max_positions} positions"
                )
            max_new = min(max_new, self.max_positions - len(prompt))
        row = _Row(generation, list(prompt), RowSampler(decoding, prompt), max_new, len(prompt),
                   self._adapters[adapter] if adapter else BASE_ADAPTER)
        with self._cv:
            if self._closing:
                raise GeneratorBusy("the generator is shutting down")
            if len(self._pending) + len(self._rows) >= self.max_queue:
                raise GeneratorBusy("the generator's queue is full")
            self._pending.append(row)
            self._cv.notify()
        self._gauge()
        return generation

    @property
    def active(self) -> int:
        return len(self._rows)

    async def close(self) -> None:
        """Finish in-flight requests, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._pending and not self._rows and not self._closing:
                        self._cv.wait()
                    if self._closing and not self._pending and not self._rows:
                        return
                    room = self.max_batch_size - len(self._rows)
                    admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                try:
                    self._iterate(admitted)
                except Exception as exc:  # noqa: BLE001 - the worker must outlive any one failure
                    log.exception("generator step failed; failing %d request(s)", len(self._rows) + len(admitted))
                    for row in {id(r): r for r in self._rows + admitted}.values():
                        row.generation.push("error", GenerationFailed(f"generation failed: {exc}"))
                    self._rows, self._cache, self._mask, self._next = [], None, None, None
                self._gauge()

    def _iterate(self, admitted: list[_Row]) -> None:
        """One round: prefill the newly admitted requests, then one decode step for the whole batch."""
        admitted = [row for row in admitted if self._still_wanted(row)]
        now = time.monotonic()
        for row in admitted:
            row.generation.stats.queue_wait_s = now - row.generation.submitted
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._step()

    def _still_wanted(self, row: _Row) -> bool:
        generation = row.generation
        if generation.cancelled:
            generation.push("error", GenerationCancelled("cancelled"))
            return False
        if generation.deadline is not None and time.monotonic() > generation.deadline:
            generation.push("error", GenerationTimeout("the reply took too long (queued past its deadline)"))
            return False
        return True

    def _prefill(self, rows: list[_Row]) -> None:
        try:
            cache, mask, logits = self._forward_prompts(rows)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request below
            if len(rows) > 1:
                for row in rows:
                    self._prefill([row])
                return
            log.exception("prefill failed for one request")
            rows[0].generation.push("error", GenerationFailed(f"generation failed: {exc}"))
            return
        for row in rows:
            row.generation.stats.prompt_tokens = len(row.prompt)
        tokens = sample([r.sampler for r in rows], logits)
        self._join(rows, cache, mask)
        self._advance(tokens, first=len(self._rows) - len(rows))
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(len(self._rows))

    def _forward_prompts(self, rows: list[_Row]):
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            rows,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=1,
        )
        return out.past_key_values, mask.to(self.device), out.logits[:, -1, :]

    def _forward(self, rows: list[_Row], **inputs):
        with self._model_lock:
            if self._adapters:
                inputs["adapter_names"] = [row.adapter for row in rows]
            return self.model(use_cache=True, **inputs)

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            self._next = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for running, joining in zip(self._cache.layers, cache.layers):
            running.keys = torch.cat([_left_pad(running.keys, width - old), _left_pad(joining.keys, width - new)])
            running.values = torch.cat(
                [_left_pad(running.values, width - old), _left_pad(joining.values, width - new)]
            )
        self._mask = torch.cat([F.pad(self._mask, (width - old, 0)), F.pad(mask, (width - new, 0))])
        self._next = torch.cat([self._next, torch.zeros(len(rows), dtype=torch.long, device=self.device)])
        self._rows.extend(rows)

    def _step(self) -> None:
        self._drop_unwanted()
        if not self._rows:
            return
        self._mask = F.pad(self._mask, (0, 1), value=1)
        positions = torch.tensor([[r.position] for r in self._rows], device=self.device)
        try:
            out = self._forward(
                self._rows,
                input_ids=self._next[:, None],
                attention_mask=self._mask,
                position_ids=positions,
                past_key_values=self._cache,
            )
            tokens = sample([r.sampler for r in self._rows], out.logits[:, -1, :])
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("decode step failed; failing %d request(s)", len(self._rows))
            for row in self._rows:
                row.generation.push("error", GenerationFailed(f"generation failed: {exc}"))
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        self._cache = out.past_key_values
        for row in self._rows:
            row.position += 1
        self._advance(tokens, first=0)

    def _advance(self, tokens: list[int], first: int) -> None:
        """Record each row's new token, stream its text, and retire finished rows."""
        finished: set[int] = set()
        for offset, token in enumerate(tokens):
            i = first + offset
            row = self._rows[i]
            self._next[i] = token
            reason = self._consume(row, token)
            if reason:
                self._finish(row, reason)
                finished.add(i)
        if finished:
            self._keep([i for i in range(len(self._rows)) if i not in finished])

    def _consume(self, row: _Row, token: int) -> str | None:
        stats = row.generation.stats
        if stats.first_token_s is None:
            stats.first_token_s = time.monotonic() - row.generation.submitted
            if self.metrics:
                self.metrics.first_token.observe(stats.first_token_s)
        if token in self.eos_ids:
            # Text held back in case it began a stop string is part of the reply after all.
            self._emit(row, self.tokenizer.decode(row.tokens, skip_special_tokens=True))
            return "stop"
        row.tokens.append(token)
        row.sampler.append(token)
        stats.new_tokens = len(row.tokens)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stop = row.sampler.decoding.stop
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            self._emit(row, text[:cut])
            return "stop"
        if len(row.tokens) >= row.max_new_tokens:
            self._emit(row, text)
            return "length"
        hold = max((len(s) - 1 for s in stop), default=0)
        if not text.endswith("\ufffd"):
            self._emit(row, text[: len(text) - hold] if hold else text)
        return None

    def _emit(self, row: _Row, text: str) -> None:
        if len(text) > len(row.emitted) and text.startswith(row.emitted):
            row.generation.push("text", text[len(row.emitted):])
            row.emitted = text

    def _finish(self, row: _Row, reason: str) -> None:
        stats = row.generation.stats
        stats.total_s = time.monotonic() - row.generation.submitted
        stats.finish_reason = reason
        if self.metrics:
            self.metrics.generated_tokens.labels(self.name).inc(len(row.tokens))
        row.generation.push("done", stats)

    def _drop_unwanted(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if self._still_wanted(row)]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows; trim cache columns that no remaining row attends to."""
        if not keep:
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._next = self._next[index]
        start = int(self._mask.any(0).int().argmax())
        if start:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self._mask = self._mask[:, start:]

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            self.metrics.active_requests.labels(self.name).set(len(self._rows))


def _left_pad(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """Pad a [batch, heads, seq, dim] cache tensor with `amount` empty positions in front."""
    return F.pad(tensor, (0, 0, amount, 0)) if amount else tensor
