"""The configuration's schema: every section of config.yaml, with its defaults and rules.

Validated by pydantic before anything starts (core/config/loading.py reads the file and the
`TTT_*` overrides into it); each field says what it holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_SWITCH_WORDS = {"true": "on", "yes": "on", "false": "off", "no": "off"}


def _switch_word(value: Any) -> Any:
    # YAML 1.1 reads a bare `on`/`off` (and yes/no) in config.yaml as a boolean; a `TTT_*` override
    # stays text, so the same words (in any case) must mean the same there.
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        word = value.strip().lower()
        return _SWITCH_WORDS.get(word, word)
    return value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_word)]
"""An adapter switch: `auto` (decided by the tokens that are set), `on` or `off`."""

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device_name(value: Any) -> Any:
    if isinstance(value, str) and _DEVICE.fullmatch(value.strip().lower()):
        return value.strip().lower()
    raise ValueError("auto, cpu, cuda or cuda:N (N: the GPU's index)")


Device = Annotated[str, BeforeValidator(_device_name)]
"""Where a model runs: `auto` (a GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`."""


class Decoding(Section):
    """How a persona samples its replies."""

    max_new_tokens: int = Field(64, ge=1, le=4096)
    do_sample: bool = True
    temperature: float = Field(0.8, gt=0, le=5)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1.0, le=3.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=16)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's random generators accept

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop


class Endpoint(Section):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp server, Ollama) that runs the model."""

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = Field(120, gt=0)


class PersonaConfig(Section):
    description: str = ""
    model: str = Field(..., description="hub id, local directory, .gguf file or package://pkg/file.gguf")
    gguf_file: str | None = None
    adapter: str | None = Field(None, description="directory of a LoRA adapter served on `model`")
    format: Literal["dialogpt", "chat"] = "chat"
    system_prompt: str = ""
    max_context_tokens: int = Field(1024, ge=16)
    decoding: Decoding = Field(default_factory=Decoding)
    voice: str | None = Field(None, description="a voice registered with `ttt voice add` (voice.voices_dir)")
    endpoint: Endpoint | None = None
    train_hint: str | None = None

    @field_validator("voice")
    @classmethod
    def _voice_named(cls, voice: str | None) -> str | None:
        if voice is not None and not VOICE_NAME.fullmatch(voice):
            raise ValueError(f"voice {voice!r} must be the name of a registered voice (letters, digits, '-', '_')")
        return voice

    @model_validator(mode="after")
    def _adapter_needs_local_model(self) -> "PersonaConfig":
        if self.adapter and self.endpoint:
            raise ValueError("a LoRA `adapter` is served on a local `model`, not on an `endpoint`")
        return self


class ServiceSection(Section):
    default_persona: str = "smol"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_input_chars: int = Field(2000, ge=1)
    max_attachment_kb: int = Field(64, ge=1, description="largest text file read into a conversation, in KiB")


class LimitsSection(Section):
    """Daily token budgets the host sets (0: none): the ceiling, which a server's own settings can only lower.
    A day is UTC."""

    tokens_per_person_per_day: int = Field(0, ge=0, description="tokens generated for one person in one server")
    tokens_per_server_per_day: int = Field(0, ge=0, description="tokens generated for everyone in one server")


class DatabaseSection(Section):
    """Where conversations are kept: a SQLite file (default), or PostgreSQL for several replicas.

    The PostgreSQL password comes only from the environment (TTT_DATABASE_PASSWORD, else libpq's
    PGPASSWORD or ~/.pgpass), never from the URL.
    """

    path: Path = Path("data/conversations.sqlite3")
    url: str | None = Field(None, description="postgresql://USER@HOST:PORT/DB selects PostgreSQL instead of `path`")
    pool_size: int = Field(10, ge=1, description="PostgreSQL connections for reads and writes, per replica")
    lock_pool_size: int = Field(32, ge=1, description="PostgreSQL connections holding conversation locks: "
                                                      "replies in progress at once, per replica")
    timeout_s: float = Field(5, gt=0, description="connecting or one statement; past it the store is unavailable")
    lock_wait_s: float = Field(180, gt=0, description="longest wait for a conversation's earlier reply to finish")

    @model_validator(mode="before")
    @classmethod
    def _no_password_in_url(cls, data: Any) -> Any:
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str) and _has_password(url):
            # The error quotes its input: show the URL without the password.
            data["url"] = _without_password(url)
            raise ValueError("database.url must not contain a password: set TTT_DATABASE_PASSWORD (or PGPASSWORD)")
        return data

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ValueError("a postgresql://USER@HOST:PORT/DATABASE URL (or no url: SQLite at `path`)")
        return url


def _has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or "password" in parse_qs(parts.query)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class ConversationSection(Section):
    max_turns: int = Field(40, ge=1)
    idle_minutes: float = Field(60, gt=0)
    retention_days: float = Field(90, ge=0, description="turns older than this are deleted; 0 keeps them")


class GeneratorSection(Section):
    device: Device = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device_map: Literal["auto"] | None = None
    max_batch_size: int = Field(32, ge=1)
    max_queue: int = Field(128, ge=1)
    request_timeout_s: float = Field(120, gt=0)
    cache_dir: Path | None = Field(None, description="where dequantized GGUF weights are cached")
    cpu_dtype: Literal["float32", "bfloat16", "int8", "int4"] = Field(
        "float32",
        description="CPU weights when dtype is auto: bfloat16 (where the CPU has it), int8 or int4 (linear layers)",
    )
    prefix_cache_mb: int | None = Field(
        None, ge=0, description="memory for reusable conversation prefixes; null: a default for the device; 0: off"
    )


class SafetySection(Section):
    offensive_threshold: float = Field(0.8, gt=0, le=1)
    on_offensive: Literal["regenerate", "fallback", "allow"] = "regenerate"
    fallback_reply: str = "Let's talk about something else."


class WebSection(Section):
    enabled: Switch = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_tokens_limit: int = Field(512, ge=1)
    max_messages: int = Field(100, ge=1, description="messages in one /v1/chat/completions request")
    max_request_kb: int = Field(1024, ge=1, description="largest request body, in KiB")
    idle_timeout_s: float = Field(10, gt=0, le=600, description="a connection that has not sent a whole request "
                                                              "(headers and body) within this long is closed")

    @property
    def loopback_only(self) -> bool:
        """Bound to this machine only; anything else requires TTT_API_KEY."""
        return self.host in ("127.0.0.1", "localhost", "::1")


class DiscordSection(Section):
    enabled: Switch = "auto"
    api_base_url: str | None = None
    command_guilds: list[int] = Field(default_factory=list)
    allowed_guilds: list[int] = Field(default_factory=list)
    blocked_guilds: list[int] = Field(default_factory=list)
    allowed_channels: list[int] = Field(default_factory=list)
    blocked_channels: list[int] = Field(default_factory=list)
    allowed_roles: list[int] = Field(default_factory=list)
    blocked_roles: list[int] = Field(default_factory=list)
    allowed_users: list[int] = Field(default_factory=list)
    blocked_users: list[int] = Field(default_factory=list)
    persona_switch_roles: list[int] = Field(default_factory=list)
    persona_switch: Literal["everyone", "admins", "roles"] = "everyone"
    dms: bool = True
    auto_thread: bool = False
    stream_edit_interval_s: float = Field(1.0, ge=0)
    rate_limit_per_minute: int = Field(6, ge=0)
    shard_count: int | None = Field(None, ge=1)
    shard_ids: list[int] | None = Field(None, min_length=1, description="the shards this process runs")

    @field_validator("shard_ids")
    @classmethod
    def _shards_of_the_count(cls, shard_ids: list[int] | None, info) -> list[int] | None:
        if shard_ids is None:
            return None
        count = info.data.get("shard_count")
        if count is None:
            raise ValueError("shard_ids needs shard_count (the number of shards across every process)")
        outside = [i for i in shard_ids if not 0 <= i < count]
        if outside:
            raise ValueError(f"shard ids from 0 to {count - 1} (shard_count is {count}); not {outside}")
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError("each shard id once")
        return shard_ids


class SlackSection(Section):
    enabled: Switch = "auto"
    mode: Literal["socket", "http"] = "socket"
    api_base_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=0, le=65535)
    http_path: str = "/slack/events"
    slash_command: str = "/ttt"
    allowed_channels: list[str] = Field(default_factory=list)
    allowed_users: list[str] = Field(default_factory=list)
    persona_switch: Literal["everyone", "admins", "users"] = "everyone"
    persona_switch_users: list[str] = Field(default_factory=list)
    thread_followups: bool = True
    stream_edit_interval_s: float = Field(1.0, ge=0)
    rate_limit_per_minute: int = Field(6, ge=0)


class RedditSection(Section):
    oauth_url: str = "https://oauth.reddit.com"
    reddit_url: str = "https://www.reddit.com"
    user_agent: str = "talk-to-transformers/0.1 (persona training scraper)"


class TrainingSection(Section):
    data_dir: Path = Path("data/training")
    personalities_dir: Path = Path("personalities")
    base_model: str = "microsoft/DialoGPT-medium"


VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class ListenSection(Section):
    """Spoken conversation: the bot listens in the voice channel, transcribes each person's
    turns and answers them aloud."""

    enabled: bool = False
    silence_ms: int = Field(800, ge=100, le=10_000, description="silence that ends a turn at the latest")
    turn_model: Literal["smart-turn", "silence"] | None = Field(
        None, description="smart-turn: after a short pause Smart Turn v3.2 judges whether the turn is complete "
                          "(silence_ms stays the cap); silence: only silence_ms ends a turn; null: smart-turn when "
                          "its model is installed, else silence")
    min_speech_ms: int = Field(300, ge=0, le=10_000, description="shorter speech is not a turn (a cough, a click)")
    max_turn_s: float = Field(20.0, gt=0, le=30, description="a longer turn is cut here (Whisper hears 30 s at most)")
    barge_in: bool = Field(True, description="someone taking the turn while the bot talks stops it")
    barge_in_min_ms: int = Field(400, ge=0, le=10_000,
                                 description="this much speech over the bot takes the turn (so do two transcribed "
                                             "words that are not a backchannel such as 'mhm' or 'yeah')")
    engine: Literal["transformers", "faster-whisper"] = "faster-whisper"
    model: str | None = Field(None, description="transformers: a hub id or a local directory in transformers "
                                                "format; faster-whisper: a size, hub id or CTranslate2 directory; "
                                                "null: the engine's default (faster-whisper: the bundled Whisper "
                                                "tiny.en; transformers: openai/whisper-base.en from the Hub)")
    language: str | None = Field("en", description="the language spoken (null: Whisper detects it)")
    device: Device = "auto"
    echo_text: bool = Field(True, description="post each transcript and its answer in the linked text channel")


class VoiceSection(Section):
    """Spoken replies: the text-to-speech engine, registered voices, Discord voice channels."""

    enabled: bool = False
    engine: Literal["pocket", "xtts", "piper"] = "pocket"
    model: str | None = Field(
        None, description="pocket: a variant name or a pocket-tts YAML config; xtts: a Coqui model name or a "
                          "checkpoint directory (config.json, model.pth, vocab.json); piper: a Piper voice's .onnx "
                          "file, its .onnx.json beside it; null: the engine's default (piper: the bundled "
                          "en_US-joe-medium)",
    )
    language: str = Field("en", description="language of the replies (xtts synthesis, reading numbers)")
    device: Device = "auto"
    voices_dir: Path = Path("voices")
    require_registered: bool = False
    max_queue: int = Field(8, ge=1, description="replies being spoken or waiting, process-wide; more are text only")
    idle_leave_s: float = Field(60, gt=0)
    allowed_roles: list[int] = Field(default_factory=list)
    listen: ListenSection = Field(default_factory=ListenSection)


class Config(Section):
    service: ServiceSection = Field(default_factory=ServiceSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    conversation: ConversationSection = Field(default_factory=ConversationSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    safety: SafetySection = Field(default_factory=SafetySection)
    personas: dict[str, PersonaConfig] = Field(default_factory=dict)
    web: WebSection = Field(default_factory=WebSection)
    discord: DiscordSection = Field(default_factory=DiscordSection)
    slack: SlackSection = Field(default_factory=SlackSection)
    reddit: RedditSection = Field(default_factory=RedditSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    voice: VoiceSection = Field(default_factory=VoiceSection)

    @field_validator("personas")
    @classmethod
    def _personas_named(cls, personas: dict[str, PersonaConfig]) -> dict[str, PersonaConfig]:
        for name in personas:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"persona name {name!r} must be letters, digits, '-' or '_'")
        return personas
