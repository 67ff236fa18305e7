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
import threading
from pathlib import Path

from core.config import ConfigError, PersonaConfig, Settings, check_can_serve, load_settings
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
        if args.command in ("serve", "chat"):
            check_can_serve(settings)
    except ConfigError as exc:
        print(f"ttt: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.config.service.log_level, settings.secrets)
    if args.command == "check":
        return asyncio.run(check(settings))
    if args.command == "serve":
        from bots.serve import serve

        return asyncio.run(serve(settings))
    if args.command == "chat":
        try:
            return asyncio.run(chat_loop(settings, args.persona, args.session or getpass.getuser()))
        except KeyboardInterrupt:  # Ctrl-C, even mid-reply: the reply is dropped, nothing half-stored
            print(file=sys.stderr)
            return 130
    return args.run(settings, args)


async def check(settings: Settings) -> int:
    """Print what `serve` would start and every problem that would stop it; non-zero when there is one."""
    from bots.serve import NO_ADAPTER, plan_adapters, unreachable
    from core.stores import check_database
    from core.metrics import Metrics
    from core.personas import PersonaRegistry

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
    registry = PersonaRegistry(cfg, Metrics())
    placement = registry.placement
    print(f"device: {placement.device}  dtype: {str(placement.dtype).removeprefix('torch.')}"
          f"{'  device_map: ' + placement.device_map if placement.device_map else ''}")
    print("adapters:")
    plans = plan_adapters(settings)
    problems += [] if any(plan.wanted for plan in plans) else [NO_ADAPTER]
    for plan in plans:
        problem = plan.problem if plan.wanted else None
        if plan.starts:
            problem = await unreachable(plan, settings)
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
    from core.models import ModelUnavailable, resolve_source

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


CLI_HELP = (
    "Type a message to talk. Commands: /reset (forget this conversation), /persona NAME (switch personality; "
    "/persona alone shows the current one), /personas (list them), /forget-me (delete everything you wrote, "
    "in every session), /help (this text), /quit or Ctrl-D (leave)."
)


async def chat_loop(settings: Settings, persona: str | None, session: str) -> int:
    """Read lines from stdin, answer each through the ChatService; /help lists commands."""
    from core.conversation import ConversationKey, StoreUnavailable, StoreUnusable
    from core.service import ChatError, open_service

    # Undecodable input becomes text the service refuses politely; unprintable output is escaped.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        service = await open_service(settings.config, dict(os.environ))
    except (StoreUnusable, StoreUnavailable) as exc:
        print(f"ttt: cannot start: {exc}", file=sys.stderr)
        return 2
    key = ConversationKey("cli", session)
    user = getpass.getuser()
    interactive = sys.stdin.isatty()
    lines = _stdin_lines()
    try:
        if persona:
            print(_plain(await service.command(key, "persona", persona)), flush=True)
        current = await service.persona_for(key)
        if interactive:
            print(f"Chatting with {current.name}. /help for commands, /quit or Ctrl-D to leave.", flush=True)
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = await lines.get()
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                command, _, argument = line[1:].partition(" ")
                if command in ("quit", "exit"):
                    break
                print(_plain(await service.command(key, command, argument, help_text=CLI_HELP, author_id=user)),
                      flush=True)
                continue
            current = await service.persona_for(key)
            try:
                updates = service.respond(key, user, line, adapter="cli", author_id=user)
                await _print_reply(updates, current.name, interactive)
            except ChatError as exc:
                print(f"{current.name}> {exc.user_message}", flush=True)
    finally:
        await service.close()
    return 0


def _plain(text: str) -> str:
    """A command's answer for a terminal: the platforms' bold markers (**name**) are not shown."""
    return text.replace("**", "")


def _stdin_lines() -> asyncio.Queue:
    """Lines of stdin as they come (None at the end), read by a daemon thread straight from the file
    descriptor: a pending read never holds up the exit (Ctrl-C at the prompt), and bytes that are
    not UTF-8 become lone surrogates, which the service refuses politely."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def read() -> None:
        pending = b""
        try:
            while chunk := os.read(sys.stdin.fileno(), 65536):
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    loop.call_soon_threadsafe(lines.put_nowait, raw.decode("utf-8", "surrogateescape"))
            if pending:
                loop.call_soon_threadsafe(lines.put_nowait, pending.decode("utf-8", "surrogateescape"))
            loop.call_soon_threadsafe(lines.put_nowait, None)
        except (OSError, RuntimeError):  # stdin closed, or the loop has: nobody is listening any more
            pass

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


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
