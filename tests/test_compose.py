"""compose.yaml (no Docker engine here): parsed, and each replica's environment validated as config."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from core.config.loading import load_settings

REPO = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, as if every required secret were set."""
    return VARIABLE.sub(lambda m: m[3] if m[2] == "-" else f"{m[1].lower()}-value", value)


def scaling_out_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Scaling out")
    return readme[start:readme.index("\n## ", start + 1)]


@pytest.mark.timeout(30)
def test_compose_runs_vllm_postgres_and_two_replicas_as_the_readme_says(tmp_path, monkeypatch):
    text = (REPO / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    readme = scaling_out_section()
    assert set(services) == {"vllm", "postgres", "ttt-1", "ttt-2"}
    for name in services:
        assert f"`{name}`" in readme
    for variable in {m[1] for m in VARIABLE.finditer(text)}:
        assert f"`{variable}`" in readme, f"{variable} is not documented in README 'Scaling out'"

    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    served = vllm["command"][vllm["command"].index("--served-model-name") + 1]
    postgres = services["postgres"]["environment"]

    monkeypatch.chdir(tmp_path)
    shards = []
    for name in ("ttt-1", "ttt-2"):
        replica = services[name]
        assert replica["build"] == "." and {"postgres", "vllm"} <= set(replica["depends_on"])
        environ = {key: interpolate(str(value)) for key, value in replica["environment"].items()}
        settings = load_settings(REPO / "config.yaml", environ=environ)  # the image's config + this environment
        cfg = settings.config
        url = urlsplit(cfg.database.url)
        assert (url.hostname, url.username, url.path) == ("postgres", postgres["POSTGRES_USER"],
                                                          "/" + postgres["POSTGRES_DB"])
        assert settings.secrets.get("TTT_DATABASE_PASSWORD") == interpolate(postgres["POSTGRES_PASSWORD"])
        endpoint = cfg.personas[cfg.service.default_persona].endpoint
        assert urlsplit(endpoint.base_url).hostname == "vllm" and endpoint.model == served
        assert cfg.web.enabled == "on" and settings.secrets.has("TTT_API_KEY")
        shards.append((cfg.discord.shard_count, tuple(cfg.discord.shard_ids)))
    assert shards == [(2, (0,)), (2, (1,))]
