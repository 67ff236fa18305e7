"""Registered voices under `voice.voices_dir`: a voice is never improvised from an upload.

    voices/NAME/manifest.json      consent text, date, each clip's source, length and hashes
    voices/NAME/clip-1.wav ...     the clips, normalised (mono, 24 kHz, 16-bit, peak -1 dBFS)
    voices/NAME/states/ENGINE-KEY.safetensors
                                   the engine's voice state, KEY = hash(engine, model, clip content):
                                   another model or a changed clip gets a state of its own
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config.schema import VOICE_NAME
from voice.speak.clips import CLIP_RATE, Clip, ClipError, load_clip, read_wav, write_wav
from voice.speak.tts import TextToSpeech, VoiceState, VoiceUnavailable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATES = "states"
MAX_CONSENT_CHARS = 2000


class VoiceError(ValueError):
    """A voice that cannot be registered, found or removed; the message says why."""


@dataclass(frozen=True)
class ClipRecord:
    file: str  # stored, normalised clip
    sha256: str  # of the stored file
    source: str  # the file name it was registered from
    source_sha256: str
    seconds: float
    source_rate: int
    source_channels: int


@dataclass(frozen=True)
class RegisteredVoice:
    name: str
    directory: Path
    consent: str
    created: str  # ISO 8601, UTC
    clips: tuple[ClipRecord, ...]

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.clips)

    def clip_paths(self) -> list[Path]:
        return [self.directory / c.file for c in self.clips]


class VoiceRegistry:
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        """The registered voices (not what an interrupted `add` or `remove` left behind)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if VOICE_NAME.fullmatch(p.name) and (p / MANIFEST).is_file())

    def get(self, name: str) -> RegisteredVoice:
        manifest = self.root / name / MANIFEST
        if not VOICE_NAME.fullmatch(name) or not manifest.is_file():
            raise self._unknown(name)
        try:
            data = json.loads(manifest.read_text())
            return RegisteredVoice(
                data["name"], manifest.parent, data["consent"], data["created"],
                tuple(ClipRecord(**clip) for clip in data["clips"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise VoiceError(f"voice {name!r}: {manifest} is damaged ({type(exc).__name__}: {exc}); "
                             f"`ttt voice remove {name}` and add it again") from None

    def add(self, name: str, clips: list[Path], consent: str, engine: TextToSpeech | None = None) -> RegisteredVoice:
        """Validate and store the clips with the consent; with an engine, compute its voice state too.
        Nothing is stored unless all of it succeeds."""
        loaded = self.validate(name, clips, consent)
        consent = consent.strip()
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".adding-{name}-"))
        try:
            records = []
            for i, (path, clip) in enumerate(loaded, start=1):
                stored = staging / f"clip-{i}.wav"
                write_wav(stored, clip.samples, CLIP_RATE)
                records.append(ClipRecord(
                    stored.name, _sha256(stored), path.name, _sha256(path), round(clip.seconds, 3),
                    clip.source_rate, clip.source_channels,
                ))
            created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
            manifest = {"name": name, "consent": consent, "created": created, "clips": [asdict(r) for r in records]}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            voice = RegisteredVoice(name, staging, consent, created, tuple(records))
            if engine is not None:
                self.state(voice, engine)
            staging.rename(self.root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(name)

    def validate(self, name: str, clips: list[Path], consent: str) -> list[tuple[Path, Clip]]:
        """Check a voice before anything is loaded or stored: its name, the consent and every clip
        (all problems at once); the clips, read and normalised. Raises VoiceError."""
        consent = consent.strip()
        if not VOICE_NAME.fullmatch(name):
            raise VoiceError(
                f"voice name {name!r}: use 1-64 letters, digits, '-' or '_' (starting with a letter or digit)"
            )
        if (self.root / name).exists():
            raise VoiceError(
                f"a voice called {name!r} is already registered; remove it first (`ttt voice remove {name}`)"
            )
        if not consent:
            raise VoiceError("--consent is required: say who gave their voice and that they agreed to its use")
        if len(consent) > MAX_CONSENT_CHARS:
            raise VoiceError(f"--consent is {len(consent)} characters long; keep it under {MAX_CONSENT_CHARS}")
        if not clips:
            raise VoiceError("give at least one reference clip")
        loaded, problems, seen = [], [], {}
        for path in clips:
            try:
                clip = load_clip(path)
            except ClipError as exc:
                problems.append(str(exc))
                continue
            first = seen.setdefault(_sha256(path), path)
            if first is not path:  # the same recording twice would only weigh it double in the cloning
                problems.append(f"{path}: the same recording as {first}")
            loaded.append((path, clip))
        if problems:
            raise VoiceError("cannot register {!r}:\n  {}".format(name, "\n  ".join(problems)))
        return loaded

    def remove(self, name: str) -> None:
        """Delete a voice, its clips and cached states (a damaged one too)."""
        if name not in self.names():
            raise self._unknown(name)
        # Renamed first, so that a half-deleted voice is never mistaken for a registered one.
        doomed = Path(tempfile.mkdtemp(dir=self.root, prefix=f".removing-{name}-"))
        (self.root / name).rename(doomed / name)
        shutil.rmtree(doomed)

    def _unknown(self, name: str) -> VoiceError:
        known = ", ".join(self.names()) or "none yet"
        return VoiceError(f"no voice called {name!r} is registered (registered: {known}); add it with `ttt voice add`")

    def state_path(self, voice: RegisteredVoice, engine: TextToSpeech) -> Path:
        """Where this engine's state of `voice` is cached, keyed by engine, model and clip content."""
        digest = hashlib.sha256(f"{engine.name}\0{engine.model_id}\0".encode())
        for path in voice.clip_paths():
            digest.update(_sha256(path).encode())
        return voice.directory / STATES / f"{engine.name}-{digest.hexdigest()[:20]}.safetensors"

    def state(self, voice: RegisteredVoice, engine: TextToSpeech) -> VoiceState:
        """The engine's voice state: from the cache, or cloned from the clips (and cached)."""
        path = self.state_path(voice, engine)
        if path.is_file():
            return engine.load_state(path)
        changed = [c.file for c in voice.clips if _sha256(voice.directory / c.file) != c.sha256]
        if changed:
            log.warning("voice %s: clip(s) %s changed since registration", voice.name, ", ".join(changed))
        log.info("voice %s: computing the %s voice state from %d clip(s)", voice.name, engine.name, len(voice.clips))
        state = engine.clone([read_wav(p, CLIP_RATE) for p in voice.clip_paths()], CLIP_RATE)
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        engine.save_state(state, partial)
        partial.replace(path)
        return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class VoiceStates:
    """The state each registered voice is synthesized with, computed or read once and kept (the
    synthesis worker's thread is its only user)."""

    def __init__(self, registry: VoiceRegistry):
        self.registry = registry
        self._states: dict[str, tuple[Path, VoiceState]] = {}  # voice name -> (cache file, state)

    def get(self, voice: str | None, engine: TextToSpeech) -> VoiceState:
        """The state to synthesize `voice` with (None, or an engine that cannot clone: the engine's
        default voice); raises VoiceUnavailable or VoiceError."""
        if voice is None or not engine.clones:
            state = engine.default_state()
            if state is None:
                raise VoiceUnavailable(
                    f"this {engine.name} model has no default voice: give the persona a registered voice"
                )
            return state
        registered = self.registry.get(voice)
        path = self.registry.state_path(registered, engine)
        cached = self._states.get(voice)
        if cached is None or cached[0] != path:  # first use, or the clips or the model changed
            cached = self._states[voice] = (path, self.registry.state(registered, engine))
        return cached[1]
