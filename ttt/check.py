"""`ttt check`: what `ttt serve` would start, and every problem that would stop it."""

from __future__ import annotations

import os
import sys

from core.config.loading import ConfigError, Settings, check_can_serve
from core.config.schema import PersonaConfig


async def check(settings: Settings) -> int:
    """Print what `serve` would start and every problem that would stop it; non-zero when there is one."""
    from core.devices import configured_device_problems
    from core.metrics import Metrics
    from core.personas import PersonaRegistry
    from core.stores import check_database
    from ttt.serve import NO_ADAPTER, plan_adapters, platform_problem

    cfg = settings.config
    problems: list[str] = []
    print(f"config: {settings.source or '(built-in defaults)'}")
    try:
        check_can_serve(settings)
    except ConfigError as exc:
        problems.append(str(exc))
    database = await check_database(cfg.database, dict(os.environ))
    print(f"database: {cfg.database.url or cfg.database.path}{'  PROBLEM: ' + database if database else ''}")
    problems += [database] if database else []
    devices = configured_device_problems(cfg)
    problems += devices
    if devices:
        print(f"device: {cfg.generator.device}  PROBLEM: {'; '.join(devices)}")
    else:
        placement = PersonaRegistry(cfg, Metrics()).placement
        print(f"device: {placement.device}  dtype: {placement.dtype}"
              f"{'  device_map: ' + placement.device_map if placement.device_map else ''}")
    print("adapters:")
    plans = plan_adapters(settings)
    problems += [] if any(plan.wanted for plan in plans) else [NO_ADAPTER]
    for plan in plans:
        problem = plan.problem if plan.wanted else None
        if plan.starts:
            problem = await platform_problem(plan, settings)
        state = "starts" if plan.starts and not problem else ("CANNOT START: " + problem if problem else "off")
        problems += [f"{plan.name}: {problem}"] if problem else []
        print(f"  {plan.name:<8} {state}")
    print("personas:")
    for name, persona in cfg.personas.items():
        default = name == cfg.service.default_persona
        where, problem = _where(persona)
        problems += [f"default persona {name}: {problem}"] if problem and default else []
        print(f" {'*' if default else ' '}{name:<12} {persona.format:<8} {where}")
    from voice.check import check_voice  # voice: engine, licence, registered voices, each persona's voice

    voice = check_voice(cfg)
    print("\n".join(voice.lines))
    problems += voice.problems
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _where(persona: PersonaConfig) -> tuple[str, str | None]:
    """Where a persona's model comes from, and what is wrong with it (None when nothing is)."""
    from core.engine.models import ModelUnavailable, resolve_source

    if persona.endpoint:
        return f"served by {persona.endpoint.base_url} as {persona.endpoint.model}", None
    try:
        source = resolve_source(persona.model, persona.gguf_file)
    except ModelUnavailable as exc:
        return f"UNAVAILABLE: {exc}", str(exc)
    if source.path.exists():
        return f"{source.label} (local)", None
    if source.path.is_absolute():  # config made every local path absolute; a hub id stays relative
        if persona.train_hint:
            return f"{persona.model} (not trained yet: {persona.train_hint})", f"{persona.model} is not trained yet"
        return f"MISSING: {source.path} does not exist", f"{source.path} does not exist"
    return f"{source.label} (hub id: downloads on first use)", None
