"""When to start playing a reply: a jitter buffer sized from how the engine has been delivering.

The synthesis worker measures, per sentence, how the engine delivers its audio (`SentenceTiming`)
and keeps a smoothed `Pace`. Before a reply starts playing, `shortfall` replays that pace over
what is left to say (the rest of the sentence being synthesized, then each sentence already
waiting, with its length estimated from its text) against a player that would start now and
never stop, and says by how many seconds the audio would come late at worst. Playback starts once
that is not positive with a margin: as early as the engine allows, and without a gap after it.
An engine far ahead of real time starts at its first chunk; one near real time waits just long
enough to cover the next sentences' start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

# Played audio that comes later than predicted by less than this is not heard as a gap: a
# scheduling hiccup of a loaded machine, or a sentence a little longer to synthesize than estimated.
MARGIN_S = 0.06
SMOOTHING = 0.3  # weight of the newest sentence in the running averages


@dataclass(frozen=True)
class SentenceTiming:
    """How one sentence came out of the engine: chunk arrival times (seconds after it was started)
    and each chunk's audio length, for a sentence of `chars` characters."""

    chars: int
    arrivals: tuple[float, ...]
    durations: tuple[float, ...]

    @property
    def audio_s(self) -> float:
        return sum(self.durations)

    @property
    def own_lead_s(self) -> float:
        """How late, at worst, this sentence's later chunks came for a player that started at its first
        chunk (negative: that early at least). A sentence in one chunk: its whole length early."""
        late, played = -self.audio_s, self.durations[0]
        for arrival, duration in zip(self.arrivals[1:], self.durations[1:]):
            late = max(late, arrival - self.arrivals[0] - played)
            played += duration
        return late


@dataclass(frozen=True)
class Pace:
    """An engine's recent delivery: time to a sentence's first audio, whole-sentence real-time factor,
    how late a sentence's own chunks come after its first (`SentenceTiming.own_lead_s`), and seconds
    of audio per character of text."""

    first_audio_s: float
    rtf: float
    own_lead_s: float
    seconds_per_char: float

    def observe(self, timing: SentenceTiming) -> "Pace":
        """This pace with one more sentence averaged in."""
        return Pace(*(_smooth(old, new) for old, new in zip(
            (self.first_audio_s, self.rtf, self.own_lead_s, self.seconds_per_char), _measures(timing))))

    @classmethod
    def first(cls, timing: SentenceTiming) -> "Pace":
        return cls(*_measures(timing))

    def duration_s(self, chars: int) -> float:
        """The estimated audio length of a sentence of `chars` characters."""
        return chars * self.seconds_per_char


@dataclass(frozen=True)
class Progress:
    """The sentence being synthesized: its length in characters, seconds since it was started, when
    its first audio came (seconds after its start) and how many seconds of its audio are written."""

    chars: int
    elapsed_s: float
    first_audio_at_s: float
    written_s: float


def shortfall(pace: Pace, buffered_s: float, current: Progress | None, upcoming_chars: list[int]) -> float:
    """Seconds by which audio would come late, at worst, if playback started now and never paused;
    <= 0: it would not. `buffered_s` is the audio written and not played, `upcoming_chars` the
    lengths of the sentences waiting, in order. MARGIN_S is included."""
    late = float("-inf")
    clock, position = 0.0, buffered_s  # when the next sentence's synthesis starts; where its audio plays
    if current is not None:
        # The rest of this sentence: its chunks keep coming as they did for earlier sentences (the
        # time since its first audio, and what is buffered ahead of it, already count as lead)...
        ahead = buffered_s - current.written_s
        late = pace.own_lead_s - (current.elapsed_s - current.first_audio_at_s) - ahead
        # ...and it ends no sooner than the engine's pace says: what matters when that is slower than real time.
        total = max(current.written_s, pace.duration_s(current.chars))
        clock = max(0.0, pace.rtf * total - current.elapsed_s)
        position += total - current.written_s
        late = max(late, clock - position)
    for chars in upcoming_chars:
        duration = pace.duration_s(chars)
        # Its start-up: its first chunk, then the later ones (which may come early, but not before it).
        late = max(late, clock + pace.first_audio_s + max(pace.own_lead_s, 0.0) - position)
        clock += max(pace.rtf * duration, pace.first_audio_s)
        position += duration
        late = max(late, clock - position)  # its end
    return late + MARGIN_S


def _measures(timing: SentenceTiming) -> tuple[float, float, float, float]:
    audio = timing.audio_s
    return (timing.arrivals[0], timing.arrivals[-1] / audio, timing.own_lead_s, audio / max(timing.chars, 1))


def _smooth(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
