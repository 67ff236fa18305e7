"""The `ttt` command: serve, chat, check, and the training recipe."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from core.config import ConfigError, Settings, load_settings
from core.logs import setup_logging

log = logging.getLogger("ttt")

# Modules that add their own subcommands (`add_commands(subparsers)`; each sets `run(settings, args)`).
SUBCOMMAND_MODULES = ("training.cli", "ttt.voice_cli", "ttt.db_cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttt", description="talk-to-transformers: chat personas for Discord, Slack and the web")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.yaml, else the shipped one)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override service.log_level")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run every configured adapter (the web chat when no platform is set)")
    chat = commands.add_parser("chat", help="chat in the terminal through the same service")
    chat.add_argument("--persona", help="persona for this conversation (remembered)")
    chat.add_argument("--session", default=None, help="conversation name (default: your user name)")
    commands.add_parser("check", help="validate the config and show what would start")
    for module in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_commands(commands)
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ttt: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.config.service.log_level, settings.secrets)
    if args.command == "check":
        return check(settings)
    if args.command == "serve":
        from bots.serve import serve

        return asyncio.run(serve(settings))
    if args.command == "chat":
        return asyncio.run(chat_loop(settings, args.persona, args.session or getpass.getuser()))
    return args.run(settings, args)


def check(settings: Settings) -> int:
    """Print what `serve` would start; non-zero when something wanted cannot start."""
    from bots.serve import plan_adapters
    from core.models import ModelUnavailable, resolve_source
    from core.personas import PersonaRegistry
    from core.metrics import Metrics

    cfg = settings.config
    print(f"config: {settings.source or '(built-in defaults)'}")
    print(f"database: {cfg.database.path}")
    registry = PersonaRegistry(cfg, Metrics())
    placement = registry.placement
    print(f"device: {placement.device}  dtype: {str(placement.dtype).removeprefix('torch.')}"
          f"{'  device_map: ' + placement.device_map if placement.device_map else ''}")
    print("adapters:")
    ok = True
    for plan in plan_adapters(settings):
        state = "starts" if plan.starts else ("CANNOT START: " + plan.problem if plan.wanted else "off")
        ok &= not (plan.wanted and plan.problem)
        print(f"  {plan.name:<8} {state}")
    print("personas:")
    for name, persona in cfg.personas.items():
        mark = "*" if name == cfg.service.default_persona else " "
        if persona.endpoint:
            where = f"served by {persona.endpoint.base_url} as {persona.endpoint.model}"
        else:
            try:
                source = resolve_source(persona.model, persona.gguf_file)
                local = Path(source.model).exists()
                where = f"{source.label} ({'local' if local else 'hub id'})"
                if not local and persona.train_hint:
                    where = f"{persona.model} (not trained yet: {persona.train_hint})"
            except ModelUnavailable as exc:
                where = f"UNAVAILABLE: {exc}"
        print(f" {mark}{name:<12} {persona.format:<8} {where}")
    from voice.check import check_voice  # voice: engine, licence, registered voices, each persona's voice

    voice = check_voice(cfg)
    print("\n".join(voice.lines))
    ok &= voice.ok
    return 0 if ok else 2


async def chat_loop(settings: Settings, persona: str | None, session: str) -> int:
    """Read lines from stdin, answer each through the ChatService; /help lists commands."""
    from core.conversation import ConversationKey
    from core.service import ChatError, open_service

    service = await open_service(settings.config, dict(os.environ))
    key = ConversationKey("cli", session)
    interactive = sys.stdin.isatty()
    try:
        if persona:
            print(await service.command(key, "persona", persona), flush=True)
        current = await service.persona_for(key)
        if interactive:
            print(f"Chatting with {current.name}. /help for commands, /quit or Ctrl-D to leave.", flush=True)
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                command, _, argument = line[1:].partition(" ")
                if command in ("quit", "exit"):
                    break
                print(await service.command(key, command, argument), flush=True)
                continue
            current = await service.persona_for(key)
            try:
                await _print_reply(service.respond(key, session, line, adapter="cli"), current.name, interactive)
            except ChatError as exc:
                print(f"{current.name}> {exc.user_message}", flush=True)
    finally:
        await service.close()
    return 0


async def _print_reply(updates, name: str, interactive: bool) -> None:
    shown = ""
    if interactive:
        print(f"{name}> ", end="", flush=True)
    async for update in updates:
        if not interactive:
            if update.final:
                print(f"{name}> {update.text}", flush=True)
            continue
        if update.text.startswith(shown):
            print(update.text[len(shown):], end="", flush=True)
        else:
            print(f"\n{name}> {update.text}", end="", flush=True)
        shown = update.text
    if interactive:
        print(flush=True)
