"""`ttt serve`: start every configured adapter on one shared ChatService, stop them gracefully.

Each adapter module exposes `create_adapter(service, settings) -> Adapter`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import signal
from dataclasses import dataclass
from typing import Protocol

from core.config import Settings
from core.service import ChatService, open_service

log = logging.getLogger(__name__)


class Adapter(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and begin answering; returns once running."""

    async def stop(self) -> None:
        """Stop taking new messages and let replies in flight finish."""


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    module: str
    wanted: bool
    problem: str | None = None

    @property
    def starts(self) -> bool:
        return self.wanted and self.problem is None


def plan_adapters(settings: Settings) -> list[AdapterPlan]:
    """Which adapters `serve` would start, and what stops the ones that are wanted but cannot."""
    cfg, secrets = settings.config, settings.secrets
    plans: list[AdapterPlan] = []

    wanted = cfg.discord.enabled == "on" or (cfg.discord.enabled == "auto" and secrets.has("DISCORD_TOKEN"))
    problem = None if secrets.has("DISCORD_TOKEN") else "DISCORD_TOKEN is not set"
    plans.append(_plan("discord", "bots.discord_bot", wanted, problem, library="discord"))

    slack_needs = ["SLACK_BOT_TOKEN", "SLACK_APP_TOKEN" if cfg.slack.mode == "socket" else "SLACK_SIGNING_SECRET"]
    wanted = cfg.slack.enabled == "on" or (cfg.slack.enabled == "auto" and secrets.has("SLACK_BOT_TOKEN"))
    missing = [name for name in slack_needs if not secrets.has(name)]
    problem = f"{' and '.join(missing)} not set (slack.mode is {cfg.slack.mode})" if missing else None
    plans.append(_plan("slack", "bots.slack_bot", wanted, problem, library="slack_bolt"))

    platforms = any(p.starts for p in plans)
    wanted = cfg.web.enabled == "on" or (cfg.web.enabled == "auto" and not platforms)
    problem = None
    if not cfg.web.loopback_only and not secrets.has("TTT_API_KEY"):
        problem = f"web.host is {cfg.web.host}: binding beyond this machine needs TTT_API_KEY set"
    plans.append(_plan("web", "bots.web", wanted, problem))
    return plans


def _plan(name: str, module: str, wanted: bool, problem: str | None, library: str | None = None) -> AdapterPlan:
    if wanted and problem is None and library and importlib.util.find_spec(library) is None:
        problem = f"install the extra: pip install 'talk-to-transformers[{name}]'"
    if wanted and problem is None and importlib.util.find_spec(module) is None:
        problem = f"the {name} adapter is not part of this build yet ({module})"
    return AdapterPlan(name, module, wanted, problem)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or `stop`); returns a process exit code."""
    plans = [p for p in plan_adapters(settings) if p.wanted]
    broken = [p for p in plans if p.problem]
    for plan in broken:
        log.error("%s adapter cannot start: %s", plan.name, plan.problem)
    if broken:
        return 2
    if not plans:
        log.error("no adapter is enabled: set a platform token or web.enabled: on")
        return 2
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = await open_service(settings.config, dict(os.environ))
    adapters: list[Adapter] = []
    preload = asyncio.create_task(_preload(service))
    try:
        for plan in plans:
            adapter = importlib.import_module(plan.module).create_adapter(service, settings)
            await adapter.start()
            adapters.append(adapter)
            log.info("%s adapter started", plan.name)
        await stop.wait()
        log.info("shutting down: finishing replies in flight")
    finally:
        preload.cancel()
        for adapter in reversed(adapters):
            try:
                await adapter.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("%s adapter did not stop cleanly", adapter.name)
        await service.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _preload(service: ChatService) -> None:
    """Load the default persona's model at start so the first reply does not wait for it."""
    try:
        await service.personas.engine(service.personas.get(service.personas.default))
    except Exception as exc:  # noqa: BLE001 - reported on /healthz and at the first reply
        log.error("default persona could not be loaded: %s", exc)
