"""Configuration: validation messages name the key, overrides, paths, secrets stay secret."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, Secrets, load_settings
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
