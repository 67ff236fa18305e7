"""The house's shape, from the code's own imports: no import circles anywhere, and dependencies that
point one way (ttt -> bots -> voice -> core; training -> core; core knows no platform)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "bots", "voice", "training", "ttt")
# What each top-level folder may import of the project (besides itself).
ALLOWED = {"core": set(), "voice": {"core"}, "training": {"core"}, "bots": {"core", "voice"},
           "ttt": {"core", "voice", "training", "bots"}}
# Platform libraries only their adapters may import.
PLATFORM_LIBRARIES = {"core": ("discord", "slack_bolt", "slack_sdk", "aiohttp.web", "praw"),
                      "voice": ("discord", "slack_bolt", "slack_sdk", "aiohttp.web")}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every module this file imports (at its top, inside functions, or for type checking alone)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    project, external = {}, {}
    for name, path in known.items():
        found = imports(path, name, known)
        project[name] = {m for m in found if m in known and m != name}
        external[name] = found - set(known)
    return project, external


def test_no_module_imports_itself_back_through_others():
    project, _ = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(project[name]):
            if state.get(child) == 1:
                circles.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child, path + [child])
        state[name] = 2

    for name in sorted(project):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_dependencies_point_one_way_and_core_knows_no_platform():
    project, external = graph()
    wrong = []
    for name, targets in project.items():
        top = name.split(".")[0]
        wrong += [f"{name} -> {t}" for t in targets if t.split(".")[0] not in ALLOWED[top] | {top}]
    for name, targets in external.items():
        banned = PLATFORM_LIBRARIES.get(name.split(".")[0], ())
        wrong += [f"{name} -> {t}" for t in targets if any(t == b or t.startswith(b + ".") for b in banned)]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_folders_hold_their_parts():
    known = modules()
    for name in ("bots.chat.view", "bots.chat.split", "bots.chat.edits", "bots.chat.ordering",
                 "bots.discord.adapter", "bots.discord.voice.speaking", "bots.discord.voice.listening",
                 "bots.discord.voice.playback", "bots.discord.voice.receive", "bots.slack.adapter",
                 "bots.web.server", "bots.web.chat", "bots.web.openai_api", "bots.web.speech_api",
                 "core.engine.generator", "core.engine.local", "core.stores.sqlite", "core.stores.postgres",
                 "core.config.schema", "core.config.loading", "voice.speak.tts", "voice.speak.factory",
                 "voice.speak.speech", "voice.listen.stt", "voice.listen.factory", "voice.listen.hearing",
                 "ttt.serve", "ttt.train_cli"):
        assert name in known, name
