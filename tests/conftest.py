"""Shared fixtures: tiny trained models, a config that serves them, a ChatService on SQLite."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine threads spin against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from core.config.loading import Secrets, Settings
from core.config.schema import Config  # noqa: E402
from core.service import ChatService, open_service  # noqa: E402
from tiny import train_word_model  # noqa: E402


def _cached_model(fmt: str) -> Path:
    """Train once per version of tests/tiny.py and core/prompts.py (its labels); later test runs on this
    machine reuse the result."""
    here = Path(__file__).parent
    source = (here / "tiny.py").read_bytes() + (here.parent / "core" / "prompts.py").read_bytes()
    source += torch.__version__.encode()
    digest = hashlib.sha256(source + fmt.encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talk-to-transformers" / "test-models"
    target = root / f"words-{fmt}-{digest}"
    if not (target / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        train_word_model(partial, fmt)
        try:
            partial.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def word_model_dir() -> Path:
    """A tiny GPT-2 that plays the word game in the dialogpt format (greedy replies are exact)."""
    return _cached_model("dialogpt")


@pytest.fixture(scope="session")
def word_chat_model_dir() -> Path:
    """The same game in the chat format (ChatML template)."""
    return _cached_model("chat")


def make_config(tmp_path: Path, model_dir: Path, chat_model_dir: Path | None = None, **sections) -> Config:
    """A config serving the word model as persona `words` (default) and, if given, `wordchat`."""
    greedy = {"do_sample": False, "max_new_tokens": 16}
    personas = {
        "words": {"model": str(model_dir), "format": "dialogpt", "description": "plays the word game",
                  "max_context_tokens": 200, "decoding": greedy},
        "missing": {"model": str(tmp_path / "not-trained"), "format": "dialogpt",
                    "train_hint": "train it first: ttt train"},
    }
    if chat_model_dir is not None:
        personas["wordchat"] = {"model": str(chat_model_dir), "format": "chat", "description": "word game, chat format",
                                "max_context_tokens": 200, "decoding": greedy}
    raw = {
        "service": {"default_persona": "words"},
        "database": {"path": str(tmp_path / "conversations.sqlite3")},
        "generator": {"cache_dir": str(tmp_path / "cache")},
        "safety": {"on_offensive": "regenerate"},
        "personas": personas,
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.model_validate(raw)


def make_settings(config: Config, environ: dict[str, str] | None = None) -> Settings:
    return Settings(config, Secrets(environ or {}), None)


@pytest.fixture
async def service(tmp_path, word_model_dir, word_chat_model_dir) -> ChatService:
    svc = await open_service(make_config(tmp_path, word_model_dir, word_chat_model_dir))
    yield svc
    await svc.close()


@pytest.fixture(scope="session")
def real_voice():
    """The bundled Piper voice in the process's synthesis worker, loaded once for the test run."""
    from voice.speak.worker import acquire_worker
    from voice_real import PIPER

    worker = acquire_worker(PIPER)
    yield worker.engine
    worker.release()


@pytest.fixture(scope="session")
def real_ear():
    """The bundled Whisper tiny.en (faster-whisper) in the process's transcriber, loaded once for the test run."""
    from voice.listen.transcriber import acquire_transcriber
    from voice_real import WHISPER

    transcriber = acquire_transcriber(WHISPER)
    yield transcriber
    transcriber.release()


@pytest.fixture(scope="session")
def smart_turn():
    """Smart Turn v3.2, loaded once for the test run."""
    from voice.listen.smart_turn import acquire_smart_turn

    model = acquire_smart_turn()
    yield model
    model.release()
