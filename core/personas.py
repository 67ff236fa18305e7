"""Personas and the engines behind them.

A persona is a model source, a prompt format, decoding settings and a description. Personas on
the same base model share one engine (one loaded copy), whatever their decoding settings.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from core.config.schema import Config, PersonaConfig
from core.engine.generator import Engine
from core.metrics import Metrics
from core.engine.models import ModelSource, ModelUnavailable, Placement, choose_placement, load_model, resolve_source
from core.engine.remote import OpenAIEngine

log = logging.getLogger(__name__)


class UnknownPersona(Exception):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"There is no persona called {name!r}. Try one of: {', '.join(known)}.")


class PersonaUnavailable(Exception):
    """The persona's model cannot be served; the message says what to do."""


@dataclass(frozen=True)
class Persona:
    name: str
    config: PersonaConfig

    @property
    def description(self) -> str:
        return self.config.description or self.config.model


class PersonaRegistry:
    """Every configured persona, loading each engine on first use and sharing it."""

    def __init__(self, config: Config, metrics: Metrics, secrets_env: dict[str, str] | None = None):
        self._config = config
        self._metrics = metrics
        self._env = secrets_env or {}
        self.personas = {name: Persona(name, cfg) for name, cfg in config.personas.items()}
        self._engines: dict[object, Engine] = {}
        self._failures: dict[object, str] = {}
        self._locks: dict[object, asyncio.Lock] = {}
        self._placement: Placement | None = None

    @property
    def names(self) -> list[str]:
        return list(self.personas)

    @property
    def default(self) -> str:
        return self._config.service.default_persona

    def get(self, name: str) -> Persona:
        try:
            return self.personas[name]
        except KeyError:
            raise UnknownPersona(name, self.names) from None

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            g = self._config.generator
            self._placement = choose_placement(g.device, g.dtype, g.device_map, g.cpu_dtype)
        return self._placement

    def engine_key(self, persona: Persona) -> object:
        if persona.config.endpoint is not None:
            return ("endpoint", persona.config.endpoint.base_url, persona.config.endpoint.model)
        return resolve_source(persona.config.model, persona.config.gguf_file)

    def loaded(self) -> dict[str, bool]:
        """Per model label: True when loaded, False when it failed to load."""
        status = {_label(key): True for key in self._engines}
        status.update({_label(key): False for key in self._failures})
        return status

    def check(self, persona: Persona) -> None:
        """Raise PersonaUnavailable now if the persona clearly cannot load (no model files, failed before)."""
        try:
            key = self.engine_key(persona)
        except ModelUnavailable as exc:
            raise PersonaUnavailable(self._explain(persona, str(exc))) from None
        if key in self._failures:
            raise PersonaUnavailable(self._explain(persona, self._failures[key]))
        for path in (key.path if isinstance(key, ModelSource) else None, persona.config.adapter):
            if path and Path(path).is_absolute() and not Path(path).exists():
                raise PersonaUnavailable(self._explain(persona, f"{path} does not exist"))

    def is_loaded(self, persona: Persona) -> bool:
        """Whether the persona's engine is up (so its first reply will not wait for a model load)."""
        try:
            return self.engine_key(persona) in self._engines
        except ModelUnavailable:
            return False

    async def engine(self, persona: Persona) -> Engine:
        """The shared engine for this persona, loading it (and its adapter) off the event loop on first use."""
        engine = await self._base_engine(persona)
        adapter = persona.config.adapter
        if adapter and not engine.has_adapter(adapter):  # adapters are served on local models only
            if adapter in self._failures:
                raise PersonaUnavailable(self._explain(persona, self._failures[adapter]))
            try:
                await asyncio.to_thread(engine.load_adapter, adapter)
            except Exception as exc:  # noqa: BLE001 - a bad adapter fails its persona only
                log.warning("could not load adapter %s", adapter, exc_info=True)
                self._failures[adapter] = f"adapter {adapter}: {exc}"
                raise PersonaUnavailable(self._explain(persona, self._failures[adapter])) from None
        return engine

    async def _base_engine(self, persona: Persona) -> Engine:
        try:
            key = self.engine_key(persona)
        except ModelUnavailable as exc:
            raise PersonaUnavailable(self._explain(persona, str(exc))) from None
        if key in self._engines:
            return self._engines[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self._engines:
                return self._engines[key]
            if key in self._failures:
                raise PersonaUnavailable(self._explain(persona, self._failures[key]))
            try:
                engine = await self._build(persona, key)
            except ModelUnavailable as exc:
                self._failures[key] = str(exc)
                self._metrics.model_loaded.labels(_label(key)).set(0)
                raise PersonaUnavailable(self._explain(persona, str(exc))) from None
            self._engines[key] = engine
            self._metrics.model_loaded.labels(_label(key)).set(1)
            return engine

    async def _build(self, persona: Persona, key: object) -> Engine:
        g = self._config.generator
        if isinstance(key, ModelSource):
            from core.engine.cpu_kernels import KernelMismatch
            from core.engine.local import LocalEngine
            from core.engine.prefix_cache import default_prefix_cache_mb

            placement = await asyncio.to_thread(lambda: self.placement)  # CUDA probing can take a while
            model, tokenizer = await asyncio.to_thread(load_model, key, placement, g.cache_dir)
            cache_mb = default_prefix_cache_mb(placement.device) if g.prefix_cache_mb is None else g.prefix_cache_mb
            engine = LocalEngine(
                model, tokenizer, name=_label(key), max_batch_size=g.max_batch_size, max_queue=g.max_queue,
                metrics=self._metrics, prefix_cache_mb=cache_mb,
            )
            try:  # ready only once its kernels are checked and its passes timed: admission needs them
                await engine.wait_started()
            except KernelMismatch as exc:
                await engine.close()
                raise ModelUnavailable(str(exc)) from None
            return engine
        endpoint = persona.config.endpoint
        api_key = self._env.get(endpoint.api_key_env) if endpoint.api_key_env else None
        return OpenAIEngine(endpoint, api_key=api_key, max_queue=g.max_queue, metrics=self._metrics)

    def _explain(self, persona: Persona, problem: str) -> str:
        trained = Path(persona.config.adapter or persona.config.model)
        if persona.config.train_hint and not trained.exists():
            return f"Persona {persona.name!r} has not been trained yet: {persona.config.train_hint}"
        return f"Persona {persona.name!r} is unavailable: {problem}"

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()
        self._engines.clear()


def _label(key: object) -> str:
    if isinstance(key, ModelSource):
        return key.label
    if isinstance(key, str):  # an adapter directory
        return key
    return f"{key[1]}#{key[2]}"
