"""Loading the configuration: config.yaml, `TTT_*` environment overrides and secrets.

Errors name the key path, the value found and what was expected. Secrets only ever come from the
environment (or a .env file) and are never shown.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from core.config.schema import Config

ENV_PREFIX = "TTT_"
SECRET_NAMES = (
    "DISCORD_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
    "SLACK_SIGNING_SECRET",
    "REDDIT_CLIENT_ID",
    "REDDIT_CLIENT_SECRET",
    "REDDIT_USERNAME",
    "REDDIT_PASSWORD",
    "TTT_API_KEY",
    "TTT_DATABASE_PASSWORD",
    "PGPASSWORD",
    "HF_TOKEN",  # read by huggingface_hub itself (gated voice weights); listed so logs redact it
)



class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the config."""



class Secrets:
    """Tokens from the environment; `repr` never shows a value."""

    def __init__(self, environ: dict[str, str]):
        self._values = {name: SecretStr(environ[name]) for name in SECRET_NAMES if environ.get(name)}

    def get(self, name: str) -> str | None:
        value = self._values.get(name)
        return value.get_secret_value() if value else None

    def names(self) -> list[str]:
        return sorted(self._values)

    def has(self, *names: str) -> bool:
        return all(name in self._values for name in names)

    def __repr__(self) -> str:
        return f"Secrets(set={sorted(self._values)})"


class Settings:
    """A validated Config plus the secrets and the file it came from."""

    def __init__(self, config: Config, secrets: Secrets, source: Path | None):
        self.config = config
        self.secrets = secrets
        self.source = source


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read config (a file or the shipped default), apply `TTT_*` overrides, validate."""
    if environ is None:
        _load_dotenv()
        environ = dict(os.environ)
    source = Path(path) if path else _default_config_path()
    raw: dict[str, Any] = {}
    if source is not None:
        if not source.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            raw = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    _apply_env_overrides(raw, environ)
    where = str(source) if source else "config"
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None
    if config.personas and config.service.default_persona not in config.personas:
        raise ConfigError(
            f"{where}: service.default_persona: got {config.service.default_persona!r}; "
            f"expected one of the personas: {', '.join(sorted(config.personas))}"
        )
    _resolve_paths(config)
    return Settings(config, Secrets(environ), source)


def check_can_serve(settings: Settings) -> None:
    """Raise ConfigError unless the config can answer messages (serve, chat): it needs its default persona.

    Training commands need no personas, so `load_settings` alone does not insist.
    """
    config = settings.config
    if config.service.default_persona not in config.personas:
        where = str(settings.source) if settings.source else "config"
        raise ConfigError(
            f"{where}: service.default_persona: got {config.service.default_persona!r}; expected one of the "
            "personas, but no `personas:` section is configured (the shipped config.yaml has examples)"
        )


def _default_config_path() -> Path | None:
    local = Path("config.yaml")
    if local.is_file():
        return local
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _load_dotenv() -> None:
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> None:
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name or name in SECRET_NAMES:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = _env_value(value, _annotation_at(path))


def _annotation_at(path: list[str]) -> Any:
    """The type the schema expects at a key path (None where the path is not in it)."""
    annotation: Any = Config
    for part in path:
        annotation = _without_none(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    return annotation


def _env_value(value: str, annotation: Any) -> Any:
    """An override as the schema wants it: lists and mappings are parsed from YAML's flow style;
    scalars stay text for pydantic to convert by the field's type, so an enum's `off` or a string's
    `123` is never turned into a bool or a number. Empty means null where null is allowed."""
    if value == "":
        return None if _allows_none(annotation) else value
    target = _without_none(annotation)
    container = typing.get_origin(target) in (list, dict) or (
        isinstance(target, type) and issubclass(target, BaseModel)
    )
    if not container:
        return value
    try:
        # BaseLoader keeps every scalar as text: pydantic then converts each item by its own type.
        return yaml.load(value, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return value


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in _union_args(annotation)


def _without_none(annotation: Any) -> Any:
    args = [arg for arg in _union_args(annotation) if arg is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _describe(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: {exc.error_count()} problem(s):"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: got {error.get('input')!r}; expected: {msg}")
    return "\n".join(lines)


def _resolve_paths(config: Config) -> None:
    cwd = Path.cwd()
    config.database.path = _absolute(config.database.path, cwd)
    config.training.data_dir = _absolute(config.training.data_dir, cwd)
    config.training.personalities_dir = _absolute(config.training.personalities_dir, cwd)
    if config.generator.cache_dir is not None:
        config.generator.cache_dir = _absolute(config.generator.cache_dir, cwd)
    config.voice.voices_dir = _absolute(config.voice.voices_dir, cwd)
    model = config.voice.model
    if model and "://" not in model and (model.startswith(("./", "../", "~")) or model.endswith((".yaml", ".yml"))):
        config.voice.model = str(_absolute(Path(config.voice.model), cwd))
    for persona in config.personas.values():
        for field in ("model", "adapter"):
            value = getattr(persona, field)
            if value and (value.startswith(("./", "../", "~")) or value.endswith(".gguf")) and "://" not in value:
                setattr(persona, field, str(_absolute(Path(value), cwd)))


def _absolute(path: Path, cwd: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (cwd / path)
