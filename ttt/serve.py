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

import aiohttp

from core.config.loading import Settings
from core.conversation import StoreUnavailable, StoreUnusable
from core.devices import configured_device_problems
from core.service import ChatService, open_service

log = logging.getLogger(__name__)

RETENTION_SWEEP_S = 3600.0
NO_ADAPTER = "no adapter is enabled: set a platform token or web.enabled: on"
DISCORD_API = "https://discord.com/api/v10"
SLACK_API = "https://slack.com/api/"


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
    plans.append(_plan("discord", "bots.discord.adapter", wanted, problem, library="discord"))

    slack_needs = ["SLACK_BOT_TOKEN", "SLACK_APP_TOKEN" if cfg.slack.mode == "socket" else "SLACK_SIGNING_SECRET"]
    wanted = cfg.slack.enabled == "on" or (cfg.slack.enabled == "auto" and secrets.has("SLACK_BOT_TOKEN"))
    missing = [name for name in slack_needs if not secrets.has(name)]
    problem = f"{' and '.join(missing)} not set (slack.mode is {cfg.slack.mode})" if missing else None
    plans.append(_plan("slack", "bots.slack.adapter", wanted, problem, library="slack_bolt"))

    platforms = any(p.starts for p in plans)
    wanted = cfg.web.enabled == "on" or (cfg.web.enabled == "auto" and not platforms)
    problem = None
    if not cfg.web.loopback_only and not secrets.has("TTT_API_KEY"):
        problem = f"web.host is {cfg.web.host}: binding beyond this machine needs TTT_API_KEY set"
    plans.append(_plan("web", "bots.web.server", wanted, problem))
    return plans


def _plan(name: str, module: str, wanted: bool, problem: str | None, library: str | None = None) -> AdapterPlan:
    if wanted and problem is None and library and importlib.util.find_spec(library) is None:
        problem = f"install the extra: pip install 'talk-to-transformers[{name}]'"
    if wanted and problem is None and importlib.util.find_spec(module) is None:
        problem = f"the {name} adapter is not part of this build yet ({module})"
    return AdapterPlan(name, module, wanted, problem)


async def platform_problem(plan: AdapterPlan, settings: Settings, timeout_s: float = 5.0) -> str | None:
    """Why the platform would not let the adapter start: its API cannot be reached from here, or it
    rejects the token (the same call the adapter makes first); None when it takes the token."""
    cfg, secrets = settings.config, settings.secrets
    if plan.name == "discord":
        from bots.discord.adapter import TOKEN_REJECTED

        token = secrets.get("DISCORD_TOKEN")
        calls = [("GET", (cfg.discord.api_base_url or DISCORD_API).rstrip("/") + "/users/@me", f"Bot {token}",
                  TOKEN_REJECTED)]
    elif plan.name == "slack":
        base = (cfg.slack.api_base_url or SLACK_API).rstrip("/")
        calls = [("POST", base + "/auth.test", f"Bearer {secrets.get('SLACK_BOT_TOKEN')}", "SLACK_BOT_TOKEN")]
        if cfg.slack.mode == "socket":
            calls.append(("POST", base + "/apps.connections.open", f"Bearer {secrets.get('SLACK_APP_TOKEN')}",
                          "SLACK_APP_TOKEN"))
    else:
        return None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            for method, url, authorization, rejected in calls:
                async with http.request(method, url, headers={"Authorization": authorization}) as response:
                    if plan.name == "discord" and response.status == 401:
                        return rejected
                    if plan.name == "slack":
                        body = await response.json(content_type=None)
                        if isinstance(body, dict) and not body.get("ok"):
                            return f"Slack rejected {rejected} ({body.get('error') or response.status})"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return f"cannot reach {url}: {exc or type(exc).__name__}"
    return None


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or `stop`); returns a process exit code.

    Anything that stops start-up (an adapter that cannot start, an unusable database) ends it
    with one log line that says what, and exit code 2.
    """
    devices = configured_device_problems(settings.config)
    for problem in devices:
        log.error("cannot start: %s", problem)
    if devices:
        return 2
    plans = [p for p in plan_adapters(settings) if p.wanted]
    broken = [p for p in plans if p.problem]
    for plan in broken:
        log.error("%s adapter cannot start: %s", plan.name, plan.problem)
    if broken:
        return 2
    if not plans:
        log.error(NO_ADAPTER)
        return 2
    try:
        service = await open_service(settings.config, dict(os.environ))
    except (StoreUnusable, StoreUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 2
    if any(persona.endpoint is None for persona in settings.config.personas.values()):
        placement = await asyncio.to_thread(lambda: service.personas.placement)  # CUDA probing can take a while
        log.info("generator: %s", placement.describe())
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    adapters: list[Adapter] = []
    preload = asyncio.create_task(_preload(service))
    sweep = asyncio.create_task(_retention_sweep(service))
    try:
        for plan in plans:
            try:
                adapter = importlib.import_module(plan.module).create_adapter(service, settings)
                await adapter.start()
            except Exception as exc:  # noqa: BLE001 - reported in one line; the traceback is at DEBUG
                log.debug("%s adapter failed to start", plan.name, exc_info=True)
                log.error("%s adapter could not start: %s", plan.name, str(exc) or type(exc).__name__)
                return 2
            adapters.append(adapter)
            log.info("%s adapter started", plan.name)
        await stop.wait()
        log.info("shutting down: finishing replies in flight")
    finally:
        preload.cancel()
        sweep.cancel()
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


async def _retention_sweep(service: ChatService) -> None:
    """Delete turns past `conversation.retention_days` now and every RETENTION_SWEEP_S while serving."""
    while True:
        try:
            await service.delete_expired()
        except Exception:  # noqa: BLE001 - try again at the next sweep
            log.warning("retention sweep failed", exc_info=True)
        await asyncio.sleep(RETENTION_SWEEP_S)


async def _preload(service: ChatService) -> None:
    """Load the default persona's model at start so the first reply does not wait for it."""
    try:
        await service.personas.engine(service.personas.get(service.personas.default))
    except Exception as exc:  # noqa: BLE001 - reported on /healthz and at the first reply
        log.error("default persona could not be loaded: %s", exc)
