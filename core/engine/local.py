"""The local backend: a transformers causal LM on this machine, serving many requests at once.

The engine decodes in a worker thread with iteration-level (continuous) batching: each round
prefills newly admitted requests (only the tokens the prefix cache does not already hold),
joins them to the running batch, and runs one decode step for every row. Requests are admitted
only if they can finish by their deadline at the speed the engine measures. The event loop
only hands requests over and receives text pieces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Sequence

import torch

from core import prompts
from core.engine import capacity
from core.config.schema import Decoding
from core.conversation import Turn
from core.engine.detokenize import ReplyText
from core.engine.request import PreparedPrompt, Request
from core.engine.generator import (
    Engine, Generation, GenerationCancelled, GenerationFailed, GenerationTimeout, GeneratorBusy, checked_decoding,
)
from core.engine.cpu_kernels import KernelMismatch
from core.engine.kv_cache import BatchCache, Layout
from core.metrics import Metrics
from core.engine.runner import BASE_ADAPTER, ModelRunner
from core.engine.prefix_cache import SPARE_TOKENS, PrefixCache, Reuse, Stored
from core.engine.sampling import RowSampler, sample

log = logging.getLogger(__name__)

# Prompt tokens prefilled per round at most (one long prompt still goes alone): the running batch
# gets a decode step between rounds, so a burst of arrivals does not stall everyone's stream.
PREFILL_TOKENS_PER_ROUND = 1024
# Idle with a pace above 1 (passes ran slower than measured before: a neighbour's load), the engine
# times a few passes this often, so that admission does not keep planning with a load that has gone.
PROBE_IDLE_S = 2.0
PROBE_ABOVE_PACE = 1.25


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
        prefix_cache_mb: float = 0,
    ):
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        config = model.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(t for t in eos + [tokenizer.eos_token_id] if t is not None)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.runner = ModelRunner(model, tokenizer, pad_id)
        self.runner.may_spend = self._can_spend
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.speed = capacity.SpeedModel()
        self.layout: Layout | None = None  # known after the first prefill
        self.joins = 0  # requests that joined a batch already decoding
        self._stop_ids: dict[str, frozenset[int]] = {}
        self._pending: deque[Request] = deque()
        self._inflight: list[Request] = []  # every request not yet ended, in arrival order
        self._rows: list[Request] = []  # the running batch, in cache row order
        self._batch: BatchCache | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._pass_ended: float | None = None  # when the last pass ended, unless the worker waited since
        self._probing = True  # idle after a slowdown, time a few passes (see _probe)
        if metrics:
            metrics.expected_wait.labels(name).set_function(self.expected_wait)
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def prepare(self, fmt: str, turns: Sequence[Turn], system_prompt: str, budget: int) -> PreparedPrompt:
        ids = prompts.fit_to_budget(fmt, self.tokenizer, turns, system_prompt, budget)[1]
        return PreparedPrompt(ids, self.stop_ids(fmt))

    def stop_ids(self, fmt: str) -> frozenset[int]:
        """Tokens that end a reply in this prompt format: the model's eos and the format's end of turn
        (a chat persona on a base whose eos is not <|im_end|> must still stop there)."""
        if fmt not in self._stop_ids:
            self._stop_ids[fmt] = self.eos_ids | frozenset(prompts.end_of_turn_ids(fmt, self.tokenizer))
        return self._stop_ids[fmt]

    def has_adapter(self, path: str) -> bool:
        return path in self.runner.adapters

    def load_adapter(self, path: str) -> None:
        """Load a LoRA adapter onto the shared base model (blocking: call it off the event loop)."""
        self.runner.load_adapter(path)

    def submit(
        self,
        prompt: PreparedPrompt | Sequence[int],
        decoding: Decoding,
        timeout: float | None = None,
        adapter: str | None = None,
    ) -> Generation:
        """Queue a request; raises GeneratorBusy (full, or it could not finish in time) or GenerationFailed."""
        decoding = checked_decoding(decoding)
        if not isinstance(prompt, PreparedPrompt):
            prompt = PreparedPrompt(list(prompt), self.eos_ids)
        ids = prompt.ids
        if adapter is not None and adapter not in self.runner.adapters:
            raise GenerationFailed(f"adapter {adapter} is not loaded")
        if not ids:
            raise GenerationFailed("empty prompt")
        max_new = decoding.max_new_tokens
        if self.max_positions:
            if len(ids) >= self.max_positions:
                raise GenerationFailed(
                    f"prompt of {len(ids)} tokens does not fit the model's {self.max_positions} positions"
                )
            max_new = min(max_new, self.max_positions - len(ids))
        generation = Generation(asyncio.get_running_loop(), timeout)
        row = Request(generation, list(ids), prompt.stop_ids, RowSampler(decoding, ids, self.runner.device),
                      ReplyText(self.tokenizer, decoding.stop), max_new,
                      self.runner.adapters[adapter] if adapter else BASE_ADAPTER)
        with self._cv:
            if self._closing:
                failed = self._started.exception() if self._started.done() else None
                if failed is not None:  # it never started: say why, not "shutting down"
                    raise GenerationFailed(str(failed))
                self._refuse("closing", "the generator is shutting down")
            if len(self._inflight) >= self.max_queue:
                self._refuse("queue_full", "the generator's queue is full")
            if generation.deadline is not None and not self._in_time(row):
                self._refuse("deadline", "the generator could not finish this request before its deadline "
                             f"({self._late_by(row)})")
            self._pending.append(row)
            self._inflight.append(row)
            self._cv.notify()
        self._gauge()
        return generation

    def _refuse(self, reason: str, message: str) -> None:
        if self.metrics:
            self.metrics.generator_refused.labels(self.name, reason).inc()
        raise GeneratorBusy(message)

    def _in_time(self, row: Request) -> bool:
        """Called with the lock held: would this request (and everyone admitted) finish in time?
        Before the engine has timed itself nothing can be judged: a caller that submits before
        `wait_started` (the service never does) takes its chances with its deadline."""
        if not self._started.done():
            return True
        running, waiting = self._queue()
        return capacity.admits(running, waiting, row.work(), self.max_batch_size, self.speed, time.monotonic(),
                               joinable=self._joinable)

    def _late_by(self, row: Request) -> str:
        """Called with the lock held, for a refused request: the estimate that refused it (a refusal
        that surprises can be read from its message)."""
        running, waiting = self._queue()
        new = row.work()
        now = time.monotonic()
        capacity.plan(running, waiting + [new], self.max_batch_size, self.speed, now, joinable=self._joinable)
        return (f"estimated to finish in {new.finish - now:.3f} s, its deadline is in {new.deadline - now:.3f} s; "
                f"{len(running)} running, {len(waiting)} waiting, pace {self.speed.pace:.2f}")

    def expected_wait(self) -> float:
        """Estimated seconds before a request arriving now would have its first token: the passes of
        the requests ahead of it, until a slot is free and it is prefilled."""
        running, waiting = self._queue()
        probe = capacity.Work(remaining=1, context=1, prefill=1, deadline=None)
        now = time.monotonic()
        capacity.plan(running, waiting + [probe], self.max_batch_size, self.speed, now, joinable=self._joinable)
        return probe.finish - now

    def _can_spend(self, seconds: float) -> bool:
        """Called by the worker: whether a pass `seconds` slower than estimated still leaves every
        request with a deadline in time, as planned now."""
        running, waiting = self._queue()
        if all(w.deadline is None for w in running + waiting):
            return True
        capacity.plan(running, waiting, self.max_batch_size, self.speed, time.monotonic(), joinable=self._joinable)
        return all(w.deadline is None or w.finish + seconds <= w.deadline for w in running + waiting)

    def _queue(self) -> tuple[list[capacity.Work], list[capacity.Work]]:
        """What is left of the requests decoding and of those waiting, in order, as admission plans them."""
        with self._cv:
            rows = list(self._inflight)
        return [r.work() for r in rows if r.started], [r.work() for r in rows if not r.started]

    @property
    def _joinable(self) -> bool:
        return self.layout in (None, Layout.JOINABLE)

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
            if not self._start_up():
                return
            while True:
                with self._cv:
                    probe = False
                    while not (self._pending or self._rows or self._closing or probe):
                        self._pass_ended = None
                        probe = (not self._cv.wait(PROBE_IDLE_S) and self._probing
                                 and self.speed.pace > PROBE_ABOVE_PACE)
                    if not probe:
                        if self._closing and not self._pending and not self._rows:
                            return
                        admitted = self._take()
                        self._probing = True
                if probe:
                    self._probe()
                    continue
                try:
                    self._round(admitted)
                except Exception as exc:  # noqa: BLE001 - the worker must outlive any one failure
                    log.exception("generator round failed; failing %d request(s)", len(self._rows) + len(admitted))
                    for row in self._rows + admitted:
                        self._fail(row, GenerationFailed(f"generation failed: {exc}"))
                    self._rows, self._batch = [], None
                self._gauge()

    def _take(self) -> list[Request]:
        """Called with the lock held: the waiting requests this round prefills."""
        if self._rows and self.layout is not Layout.JOINABLE:
            return []  # this layout cannot join a running batch: let it drain
        taken: list[Request] = []
        tokens = 0
        while self._pending and len(self._rows) + len(taken) < self.max_batch_size:
            if taken and tokens + len(self._pending[0].prompt) > PREFILL_TOKENS_PER_ROUND:
                break
            taken.append(self._pending.popleft())
            tokens += len(taken[-1].prompt)
        return taken

    def _round(self, admitted: list[Request]) -> None:
        """Prefill the newly admitted requests, then one decode step for the whole batch."""
        admitted = [row for row in admitted if self._still_wanted(row)]
        now = time.monotonic()
        for row in admitted:
            row.generation.stats.queue_wait_s = now - row.generation.submitted
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._step()

    def _still_wanted(self, row: Request) -> bool:
        generation = row.generation
        if generation.cancelled:
            self._fail(row, GenerationCancelled("cancelled"))
            return False
        if generation.deadline is not None and time.monotonic() > generation.deadline:
            self._fail(row, GenerationTimeout("the reply took too long"))
            return False
        return True

    def _prefill(self, rows: list[Request]) -> None:
        fresh = []
        for row in rows:
            row.reuse = reuse = self._lookup(row)
            if reuse is None:
                fresh.append(row)
            elif reuse.scores is not None:  # this very prompt again: it starts from its stored scores
                self._start([row], lambda: (reuse.state.to_batch(reuse.tokens, owned=reuse.owned), reuse.scores[None]))
            else:
                self._start([row], lambda: self.runner.prefill_after(reuse, row.prompt, row.adapter))
        if fresh:
            self._start(fresh, lambda: self.runner.prefill([r.prompt for r in fresh], [r.adapter for r in fresh]))

    def _start(self, rows: list[Request], forward) -> None:
        """Run a prefill; on failure retry each request alone, so that only a bad one fails."""
        started = self._pass_started()
        try:
            batch, logits = forward()
            tokens = sample([r.sampler for r in rows], logits)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request below
            if len(rows) > 1:
                for row in rows:
                    self._start([row], lambda: self.runner.prefill([row.prompt], [row.adapter]))  # noqa: B023
                return
            log.exception("prefill failed for one request")
            self._fail(rows[0], GenerationFailed(f"generation failed: {exc}"))
            return
        prefilled = sum(len(r.prompt) - (r.reuse.tokens if r.reuse else 0) for r in rows)
        if self.layout is None:
            self.layout = batch.layout
        if self._rows and batch.layout is not Layout.JOINABLE:
            for row in rows:  # cannot happen for a layout that is known; a safe answer anyway
                self._fail(row, GenerationFailed("this model's cache cannot join a running batch"))
            return
        for i, row in enumerate(rows):
            if self.prefix_cache is not None:
                row.scores = logits[i].clone()
            stats = row.generation.stats
            stats.prompt_tokens = len(row.prompt)
            stats.cached_tokens = row.reuse.tokens if row.reuse else 0
            stats.joined_running_batch = bool(self._rows)
            row.position, row.started, row.reuse = len(row.prompt), True, None
        if self._rows:
            self.joins += len(rows)
            self._batch.join(batch)
            self._rows.extend(rows)
        else:
            self._batch, self._rows = batch, list(rows)
        self._advance(tokens, first=len(self._rows) - len(rows))
        self._pass_ended = time.perf_counter()
        if prefilled and not self.runner.trial:
            self.speed.record_prefill(prefilled, self._pass_ended - started)
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(len(self._rows))

    def _step(self) -> None:
        """One decode step for every row; its whole cost (bookkeeping included) teaches the speed model,
        unless the step tried a thread count out."""
        started = self._pass_started()
        self._drop_unwanted()
        if not self._rows:
            return
        batch, rows = self._batch, self._rows
        try:
            logits = self.runner.decode(batch, [r.tokens[-1] for r in rows], [r.position for r in rows],
                                        [r.adapter for r in rows])
            tokens = sample([r.sampler for r in rows], logits)
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("decode step failed; failing %d request(s)", len(self._rows))
            for row in self._rows:
                self._fail(row, GenerationFailed(f"generation failed: {exc}"))
            self._rows, self._batch = [], None
            return
        width = batch.width
        for row in rows:
            row.position += 1
        self._advance(tokens, first=0)
        self._pass_ended = time.perf_counter()
        if not self.runner.trial:
            self.speed.record_step(len(rows), width, self._pass_ended - started)

    def _pass_started(self) -> float:
        """When the pass about to run began: where the worker went on from another pass, when that one
        ended, so that the time between passes (locking, streaming, the event loop's share of the
        interpreter) counts too: it is part of what each step costs, a large part for a small model."""
        return time.perf_counter() if self._pass_ended is None else self._pass_ended

    def _advance(self, tokens: list[int | None], first: int) -> None:
        """Record each row's new token, stream its text, and retire finished rows."""
        finished: list[int] = []
        for offset, token in enumerate(tokens):
            i = first + offset
            row = self._rows[i]
            if token is None:
                self._fail(row, GenerationFailed("generation failed: the model gave no valid next-token distribution"))
                finished.append(i)
                continue
            reason = self._consume(row, token)
            if reason:
                self._finish(row, reason, i)
                finished.append(i)
        if finished:
            self._keep([i for i in range(len(self._rows)) if i not in finished])

    def _consume(self, row: Request, token: int) -> str | None:
        stats = row.generation.stats
        if stats.first_token_s is None:
            stats.first_token_s = time.monotonic() - row.generation.submitted
            if self.metrics:
                self.metrics.first_token.observe(stats.first_token_s)
        return row.consume(token)

    def _finish(self, row: Request, reason: str, index: int) -> None:
        stats = row.generation.stats
        stats.total_s = time.monotonic() - row.generation.submitted
        stats.finish_reason = reason
        if self.metrics:
            self.metrics.generated_tokens.labels(self.name).inc(len(row.tokens))
        self._remember(row, index)
        self._end(row, ("done", stats))

    def _fail(self, row: Request, error: GenerationFailed) -> None:
        self._end(row, ("error", error))

    def _end(self, row: Request, event: tuple[str, object]) -> None:
        """The one place a request ends: its caller hears it once, and it leaves the queue count."""
        if row.ended:
            return
        row.ended = True
        with self._cv:
            self._inflight.remove(row)
        row.generation.push(*event)

    def _drop_unwanted(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if self._still_wanted(row)]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._batch = [], None
            return
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    # ---- prefix cache ----------------------------------------------------------------------

    def _lookup(self, row: Request) -> Reuse | None:
        if self.prefix_cache is None or not self._joinable:
            return None
        hit = self.prefix_cache.lookup(row.adapter, row.prompt)
        if self.metrics:
            if hit:
                self.metrics.prefix_cache_hits.labels(self.name).inc()
                self.metrics.prefix_cache_reused_tokens.labels(self.name).inc(hit.tokens)
            else:
                self.metrics.prefix_cache_misses.labels(self.name).inc()
        return hit

    def _remember(self, row: Request, index: int) -> None:
        """Keep a finished row's keys and values (prompt and reply) for the conversation's next turn,
        and the scores its prompt ended with, for the same prompt again."""
        if self.prefix_cache is None or self._batch.layout is not Layout.JOINABLE:
            return
        tokens = (row.prompt + row.tokens)[: row.position]
        state = self._batch.row_state(index, row.position, spare=SPARE_TOKENS, handover=len(self._rows) == 1)
        self.prefix_cache.store(row.adapter, Stored(tokens, state, len(row.prompt), row.scores))
        if self.metrics:
            self.metrics.prefix_cache_bytes.labels(self.name).set(self.prefix_cache.bytes)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            self.metrics.active_requests.labels(self.name).set(len(self._rows))

    # ---- speed ------------------------------------------------------------------------------

    def _start_up(self) -> bool:
        """Check the kernels this model's weights run on, then time the passes admission plans with.
        A kernel that is wrong on this CPU fails the start (and whatever was submitted meanwhile)."""
        try:
            self.runner.check_kernels()
        except KernelMismatch as exc:
            log.error("%s", exc)
            with self._cv:
                self._closing = True
                waiting = list(self._pending)
            for row in waiting:
                self._fail(row, GenerationFailed(str(exc)))
            self._started.set_exception(exc)
            return False
        self._calibrate()
        self._started.set_result(None)
        return True

    def _probe(self) -> None:
        """Idle after a slowdown: time a few passes, so that the pace follows the speed now. Without
        them a pace measured under a neighbour's load would outlive the load: every request refused,
        no pass run, nothing measured again."""
        before = self.speed.pace
        try:
            self.runner.probe(self.speed)
        except Exception:  # noqa: BLE001 - the next real passes will measure it
            log.warning("could not time the model while idle", exc_info=True)
        # Probing goes on while it finds the machine faster than the pace said; a pace it confirms
        # stays until the next request (an idle engine does not keep timing a busy machine).
        self._probing = self.speed.pace < 0.95 * before

    def _calibrate(self) -> None:
        """Time a decode step at every batch size the engine will run, and prefills, before serving:
        the first burst is admitted at measured speeds (see ModelRunner.calibrate)."""
        try:
            context = max(8, min(256, (self.max_positions or 256) - 4))
            self.runner.calibrate(self.speed, self.max_batch_size, context)
        except Exception:  # noqa: BLE001 - sizes left unmeasured are assumed slow
            log.warning("could not time the model; admission assumes what it has not measured is slow", exc_info=True)

    async def wait_started(self) -> None:
        """Until the engine has checked its kernels and timed its passes (what admission needs);
        raises KernelMismatch if a kernel is wrong on this CPU."""
        # Shielded: a caller that gives up must not cancel the start itself (the worker sets it).
        await asyncio.shield(asyncio.wrap_future(self._started))
