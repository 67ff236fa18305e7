"""`ttt chat`: a conversation in the terminal, through the same service as every platform."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
import threading

from core.commands import FORGET_ME, PERSONA, HelpStyle, help_text
from core.config.loading import Settings
from core.replies import ReplyUpdate, relay


CLI_HELP = help_text(HelpStyle(
    "Type a message to talk.", written="/{}",
    notes={PERSONA: "shows or switches who I am ({persona} NAME switches)",
           FORGET_ME: "deletes everything you wrote, in every session"},
    extra=("/quit or Ctrl-D leaves",),
))


async def chat_loop(settings: Settings, persona: str | None, session: str) -> int:
    """Read lines from stdin, answer each through the ChatService; /help lists commands."""
    from core.conversation import ConversationKey, StoreUnavailable, StoreUnusable
    from core.devices import configured_device_problems
    from core.errors import ChatError
    from core.service import open_service

    # Undecodable input becomes text the service refuses politely; unprintable output is escaped.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    for problem in configured_device_problems(settings.config):
        print(f"ttt: cannot start: {problem}", file=sys.stderr)
        return 2
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
    """The reply as it grows (interactive), else only the final text."""
    shown = ""

    async def show(update: ReplyUpdate) -> None:
        nonlocal shown
        if not interactive:
            if update.final:
                print(f"{name}> {update.text}", flush=True)
        elif update.text.startswith(shown):
            print(update.text[len(shown):], end="", flush=True)
        else:  # a draft the screen replaced: start the line again
            print(f"\n{name}> {update.text}", end="", flush=True)
        shown = update.text

    if interactive:
        print(f"{name}> ", end="", flush=True)
    await relay(updates, show)
    if interactive:
        print(flush=True)
