"""`ttt voice add|list|remove` (registered voices) and `ttt say` (hear a reply in a voice).

Voices live under voice.voices_dir (default ./voices). Registering one validates its clips,
records the consent given and computes the configured engine's voice state once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.config.loading import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `voice` (add, list, remove) and `say` to the `ttt` parser."""
    voice = commands.add_parser("voice", help="register, list and remove the voices personas speak in")
    actions = voice.add_subparsers(dest="voice_command", required=True)
    p = actions.add_parser(
        "add", help="register a voice from reference clips, with the speaker's consent",
        description="Validate each clip (readable audio, 3-30 s, not silent; any sample rate or channels), store\n"
                    "them normalised with a manifest (consent, date, hashes) under voice.voices_dir, and compute\n"
                    "the configured engine's voice state once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="the voice's name (what a persona's `voice:` names)")
    p.add_argument("clips", nargs="+", type=Path, metavar="CLIP", help="reference recordings of the speaker")
    p.add_argument("--consent", required=True, help="who gave this voice, and that they agreed to its use")
    p.set_defaults(run=run_add)
    p = actions.add_parser("list", help="show the registered voices")
    p.set_defaults(run=run_list)
    p = actions.add_parser("remove", help="delete a registered voice, its clips and cached states")
    p.add_argument("name")
    p.set_defaults(run=run_remove)

    p = commands.add_parser("say", help="speak a text in a persona's or a registered voice into a WAV file")
    p.add_argument("text")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--persona", help="speak in this persona's voice (default: the default persona)")
    who.add_argument("--voice", help="speak in this registered voice")
    p.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    p.set_defaults(run=run_say)


def run_add(settings: Settings, args: argparse.Namespace) -> int:
    from voice.speak.tts import VoiceUnavailable
    from voice.speak.registry import VoiceError, VoiceRegistry

    if settings.config.voice.engine == "piper":
        from voice.speak.piper_engine import CANNOT_CLONE

        return _fail(CANNOT_CLONE)
    registry = VoiceRegistry(settings.config.voice.voices_dir)
    try:
        registry.validate(args.name, args.clips, args.consent)  # before the engine loads (it may download)
        engine = _load_engine(settings)
        started = time.monotonic()
        voice = registry.add(args.name, args.clips, args.consent, engine)
    except (VoiceError, VoiceUnavailable) as exc:
        return _fail(str(exc))
    print(f"registered voice {voice.name}: {len(voice.clips)} clip(s), {voice.seconds:.1f} s, in {voice.directory}")
    print(f"{engine.name} voice state computed in {time.monotonic() - started:.1f} s and cached")
    return 0


def run_list(settings: Settings, args: argparse.Namespace) -> int:
    from voice.speak.registry import VoiceError, VoiceRegistry

    registry = VoiceRegistry(settings.config.voice.voices_dir)
    names = registry.names()
    if not names:
        print(f"no voices registered in {registry.root} (add one: ttt voice add NAME CLIP... --consent TEXT)")
        return 0
    users = _personas_by_voice(settings)
    for name in names:
        try:
            voice = registry.get(name)
        except VoiceError as exc:
            print(f"{name:<16} DAMAGED: {exc}")
            continue
        used = f"  personas: {', '.join(users[name])}" if name in users else ""
        print(f"{name:<16} {len(voice.clips)} clip(s) {voice.seconds:5.1f} s  added {voice.created}{used}")
        print(f"{'':<16} consent: {voice.consent}")
    return 0


def run_remove(settings: Settings, args: argparse.Namespace) -> int:
    from voice.speak.registry import VoiceError, VoiceRegistry

    try:
        VoiceRegistry(settings.config.voice.voices_dir).remove(args.name)
    except VoiceError as exc:
        return _fail(str(exc))
    print(f"removed voice {args.name}")
    users = _personas_by_voice(settings).get(args.name)
    if users:
        print(f"note: persona(s) {', '.join(users)} still name it in the config")
    return 0


def run_say(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from voice.speak.tts import VoiceUnavailable
    from voice.speak.registry import VoiceError
    from voice.speak.to_file import speak_to_file
    from voice.speak.speakable import speakable

    cfg = settings.config
    persona = args.persona or (None if args.voice else cfg.service.default_persona)
    if persona is not None and persona not in cfg.personas:
        return _fail(f"no persona called {persona!r}; pick one of: {', '.join(sorted(cfg.personas))}")
    voice = args.voice if args.voice else cfg.personas[persona].voice
    if args.output.suffix.lower() != ".wav":
        return _fail(f"-o {args.output}: ttt say writes a WAV file; give a name that ends in .wav")
    if not speakable(args.text).strip():
        return _fail(f"nothing to say: {args.text!r} holds no words that are read aloud "
                     "(emoji, emoticons and markup are skipped)")
    _loading(settings)
    try:
        seconds = asyncio.run(speak_to_file(cfg.voice, args.text, voice, args.output))
    except (VoiceError, VoiceUnavailable) as exc:
        return _fail(str(exc))
    print(f"wrote {seconds:.1f} s of speech in {voice or 'the engine default voice'} to {args.output}")
    return 0


def _loading(settings: Settings) -> None:
    section = settings.config.voice
    print(f"loading the {section.engine} engine ({section.model or 'its default model'})...", flush=True)


def _load_engine(settings: Settings):
    from voice.speak.factory import load_tts

    _loading(settings)
    return load_tts(settings.config.voice)


def _personas_by_voice(settings: Settings) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for name, persona in settings.config.personas.items():
        if persona.voice:
            users.setdefault(persona.voice, []).append(name)
    return users


def _fail(message: str) -> int:
    print(f"ttt: {message}", file=sys.stderr)
    return 2
