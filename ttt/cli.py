"""The `ttt` command: serve (serve.py), chat (chat.py), check (check.py), and the subcommands of
voice (voice_cli.py), the database (db_cli.py) and the training recipe (train_cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from core.config.loading import ConfigError, check_can_serve, load_settings
from core.logs import setup_logging

log = logging.getLogger("ttt")

# Modules that add their own subcommands (`add_commands(subparsers)`; each sets `run(settings, args)`).
SUBCOMMAND_MODULES = ("ttt.train_cli", "ttt.voice_cli", "ttt.db_cli")


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
        from ttt.check import check

        return asyncio.run(check(settings))
    if args.command == "serve":
        from ttt.serve import serve

        return asyncio.run(serve(settings))
    if args.command == "chat":
        from ttt.chat import chat_loop

        try:
            return asyncio.run(chat_loop(settings, args.persona, args.session or getpass.getuser()))
        except KeyboardInterrupt:  # Ctrl-C, even mid-reply: the reply is dropped, nothing half-stored
            print(file=sys.stderr)
            return 130
    return args.run(settings, args)
