"""Configuration: validation messages name the key, overrides, paths, secrets stay secret."""

from __future__ import annotations

import copy
import logging
import os
import typing
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pydantic import BaseModel

from core.config.loading import ConfigError, Secrets, _without_none, check_can_serve, load_settings
from core.config.schema import Config, Endpoint
from core.logs import RedactingFormatter

REPO = Path(__file__).resolve().parent.parent
TOKEN = "MTIzNDU2Nzg5.secret-discord-token-value"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


PERSONA = {"p": {"model": "some/hub-id", "format": "dialogpt"}}


@pytest.mark.timeout(30)
def test_shipped_config_is_valid(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "config.yaml", environ={})
    cfg = settings.config
    assert cfg.service.default_persona == "smol"
    assert {"smol", "dialogpt", "berkeley"} <= set(cfg.personas)
    assert cfg.personas["dialogpt"].decoding.no_repeat_ngram_size == 3
    assert cfg.database.path == tmp_path / "data/conversations.sqlite3"  # relative to the working directory
    assert cfg.personas["berkeley"].model == str(tmp_path / "personalities/berkeley")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "data, expected",
    [
        ({"web": {"port": "eighty"}, "personas": PERSONA, "service": {"default_persona": "p"}},
         ["web.port", "'eighty'", "integer"]),
        ({"web": {"prot": 1}, "personas": PERSONA, "service": {"default_persona": "p"}}, ["web.prot", "unknown key"]),
        ({"personas": {"p": {"format": "dialogpt"}}, "service": {"default_persona": "p"}},
         ["personas.p.model", "missing"]),
        ({"personas": {"p": {"model": "x", "format": "gpt"}}, "service": {"default_persona": "p"}},
         ["personas.p.format", "'gpt'", "'dialogpt' or 'chat'"]),
        ({"personas": PERSONA, "service": {"default_persona": "nobody"}},
         ["service.default_persona", "'nobody'", "p"]),
        ({"personas": {"p": {"model": "x", "decoding": {"top_p": 3}}}, "service": {"default_persona": "p"}},
         ["personas.p.decoding.top_p", "3", "less than or equal to 1"]),
        ({"generator": {"device": "gpu"}, "personas": PERSONA, "service": {"default_persona": "p"}},
         ["generator.device", "'gpu'", "auto, cpu, cuda or cuda:N"]),
    ],
)
def test_errors_name_key_value_and_expectation(tmp_path, data, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, data), environ={})
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.timeout(30)
def test_environment_overrides_any_key(tmp_path):
    path = write(tmp_path, {"personas": PERSONA, "service": {"default_persona": "p"}})
    env = {
        "TTT_WEB__PORT": "9123",
        "TTT_DISCORD__API_BASE_URL": "http://127.0.0.1:1/api/v10",
        "TTT_PERSONAS__P__DECODING__TEMPERATURE": "0.5",
        "TTT_DISCORD__ALLOWED_GUILDS": "[1, 2]",
    }
    cfg = load_settings(path, environ=env).config
    assert cfg.web.port == 9123
    assert cfg.discord.api_base_url == "http://127.0.0.1:1/api/v10"
    assert cfg.personas["p"].decoding.temperature == 0.5
    assert cfg.discord.allowed_guilds == [1, 2]
    with pytest.raises(ConfigError, match="web.port"):
        load_settings(path, environ={"TTT_WEB__PORT": "not-a-port"})


@pytest.mark.timeout(30)
def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("web: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


@pytest.mark.timeout(30)
def test_secrets_come_from_environment_and_never_show(tmp_path):
    secrets = Secrets({"DISCORD_TOKEN": TOKEN, "TTT_WEB__PORT": "1"})
    assert secrets.get("DISCORD_TOKEN") == TOKEN and secrets.has("DISCORD_TOKEN")
    assert TOKEN not in repr(secrets)
    # A secret in the config file is not a config key.
    path = write(tmp_path, {"discord": {"token": TOKEN}, "personas": PERSONA, "service": {"default_persona": "p"}})
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "discord.token" in str(info.value)
    # Log lines and tracebacks are redacted.
    formatter = RedactingFormatter("%(message)s", secrets)
    try:
        raise RuntimeError(f"login failed with {TOKEN}")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token=%s", (TOKEN,), sys.exc_info())
    text = formatter.format(record)
    assert TOKEN not in text and "***" in text


@pytest.mark.timeout(60)
def test_ttt_check_reports_and_never_prints_secrets(tmp_path):
    env = {**os.environ, "DISCORD_TOKEN": TOKEN, "SLACK_BOT_TOKEN": "xoxb-secret-slack-value"}
    run = subprocess.run(
        [sys.executable, "-m", "ttt", "--config", str(REPO / "config.yaml"), "check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    out = run.stdout + run.stderr
    assert TOKEN not in out and "xoxb-secret-slack-value" not in out
    assert "discord" in out and "personas:" in out and "smol" in out and "device: cpu" in out
    assert "SLACK_APP_TOKEN" in out  # slack is wanted (bot token set) but cannot start without the app token
    assert run.returncode == 2

    bad = write(tmp_path, {"web": {"port": -1}, "personas": PERSONA, "service": {"default_persona": "p"}})
    run = subprocess.run(
        [sys.executable, "-m", "ttt", "--config", str(bad), "check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "web.port" in run.stderr and "Traceback" not in run.stderr and TOKEN not in run.stderr


# ---- every key through its TTT_* override, generated from the schema ----------------------------

BASE = {
    "service": {"default_persona": "p"},
    "personas": {"p": {"model": "some/hub-id", "format": "dialogpt"},
                 "e": {"model": "served", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}},
}
TRICKY_TEXT = ["off", "123", "yes", "p", "cuda:1"]  # YAML would read the first three as a bool, a number, a bool


def _leaves(model: type[BaseModel], path: tuple[str, ...]):
    """(key path, annotation, default) of every scalar or list setting under `model`."""
    for name, field in model.model_fields.items():
        here = path + (name,)
        inner = _without_none(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            # An endpoint is tried on the persona that has one; everything else on the plain one.
            yield from _leaves(inner, here[:-2] + ("e", name) if inner is Endpoint else here)
        elif typing.get_origin(inner) is dict:
            yield from _leaves(typing.get_args(inner)[1], here + ("p",))
        else:
            yield here, field.annotation, field.get_default(call_default_factory=True)


def _candidates(annotation, default) -> list[tuple[str, object]]:
    """(text for the environment, the value it means) for values of this type."""
    inner = _without_none(annotation)
    pairs: list[tuple[str, object]] = [("", None)] if type(None) in typing.get_args(annotation) else []
    if typing.get_origin(inner) is typing.Literal:
        return pairs + [(value, value) for value in typing.get_args(inner)]
    if inner is bool:
        return pairs + [("on", True), ("off", False), ("yes", True), ("no", False), ("true", True), ("false", False)]
    if inner in (int, float):
        numbers = [(default or 0) + 1, 2, 3, 1, (default or 0) * 0.5, 0]
        return pairs + [(str(inner(n)), inner(n)) for n in numbers if inner(n) == n and n != default]
    if inner in (str, Path):
        return pairs + [(text, text) for text in TRICKY_TEXT]
    if typing.get_origin(inner) is list:
        items = [1, 2] if typing.get_args(inner)[0] is int else ["C1", "off"]
        return pairs + [("[" + ", ".join(map(str, items)) + "]", items)]
    raise AssertionError(f"no test values for {annotation}")


def _with(data: dict, path: tuple[str, ...], value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


@pytest.mark.timeout(60)
def test_every_setting_works_through_its_environment_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = write(tmp_path, BASE)
    (tmp_path / "ref").mkdir()
    checked = []
    for path, annotation, default in _leaves(Config, ()):
        accepted = 0
        for text, value in _candidates(annotation, default):
            try:  # the same value written in config.yaml is the reference
                expected = load_settings(write(tmp_path / "ref", _with(BASE, path, value)), environ={}).config
            except ConfigError:
                continue  # not a valid value for this key (out of range, unknown persona, ...)
            name = "TTT_" + "__".join(part.upper() for part in path)
            got = load_settings(base, environ={name: text}).config
            assert got.model_dump() == expected.model_dump(), (name, text)
            accepted += 1
        assert accepted, f"no value of {'.'.join(path)} could be tested"
        checked.append(".".join(path))
    assert {"web.enabled", "discord.persona_switch", "personas.p.decoding.stop", "personas.e.endpoint.timeout_s",
            "discord.allowed_guilds", "database.path", "generator.device_map"} <= set(checked)
    assert load_settings(base, environ={"TTT_WEB__ENABLED": "off"}).config.web.enabled == "off"
    assert load_settings(base, environ={"TTT_WEB__HOST": "123"}).config.web.host == "123"


@pytest.mark.timeout(30)
def test_empty_config_names_the_missing_default_persona(tmp_path):
    empty = tmp_path / "config.yaml"
    empty.write_text("")
    settings = load_settings(empty, environ={})  # training commands need no personas
    with pytest.raises(ConfigError) as info:
        check_can_serve(settings)
    assert "service.default_persona" in str(info.value) and "'smol'" in str(info.value)
    assert str(empty) in str(info.value)


@pytest.mark.timeout(30)
def test_on_and_off_written_plainly_in_config_yaml_mean_on_and_off(tmp_path):
    # YAML 1.1 reads a bare on/off (yes/no) as a boolean: `enabled: off` must still mean "off".
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for written, meant in (("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on"), ("auto", "auto"),
                           ("true", "on"), ("False", "off"), ("OFF", "off")):
        path = tmp_path / "config.yaml"
        path.write_text(f"web:\n  enabled: {written}\ndiscord:\n  enabled: {written}\nslack:\n  enabled: {written}\n")
        cfg = load_settings(path, environ={}).config
        assert (cfg.web.enabled, cfg.discord.enabled, cfg.slack.enabled) == (meant, meant, meant), written
        # The same word through the environment means the same (an override is read as text).
        environ = {f"TTT_{section}__ENABLED": written for section in ("WEB", "DISCORD", "SLACK")}
        cfg = load_settings(empty, environ=environ).config
        assert (cfg.web.enabled, cfg.discord.enabled, cfg.slack.enabled) == (meant, meant, meant), written
    with pytest.raises(ConfigError, match="web.enabled"):
        load_settings(path, environ={"TTT_WEB__ENABLED": "maybe"})
