"""When to play a reply's audio: a jitter buffer sized from how the engine delivers, here and now.

The synthesis worker measures, per sentence, how the engine delivers its audio (`SentenceTiming`)
and keeps a `Pace`: a slower delivery is taken over at once (the engine shares the machine's cores
with the model writing the reply, the listening path and whatever else runs there), a faster one is
averaged in. Before each sentence's audio is played, `shortfall` replays that pace over what is left
to say (the rest of the sentence being synthesized, then each sentence already waiting, with its
length estimated from its text) against a player that would go on from now without a pause, and
says by how many seconds the audio would come late at worst; the sentence being synthesized counts
at the pace it has been coming at so far when that is slower. Its audio is played once that is not
positive with a margin: as early as the engine allows, and without a gap after it. An engine far
ahead of real time starts at its first chunk; one near real time waits just long enough to cover
the next sentences' start-up; one slower than real time waits for what the known text needs, and a
sentence that comes later than a gapless start allowed is played whole, after a pause, never in
fragments.
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
    def chunk_rtf(self) -> float | None:
        """Seconds of synthesis per second of audio after the first chunk (None: a sentence in one chunk)."""
        if len(self.arrivals) < 2:
            return None
        return (self.arrivals[-1] - self.arrivals[0]) / max(sum(self.durations[1:]), 1e-9)

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
    how late a sentence's own chunks come after its first (`SentenceTiming.own_lead_s`), seconds of
    audio per character of text, and the real-time factor of the chunks after the first."""

    first_audio_s: float
    rtf: float
    own_lead_s: float
    seconds_per_char: float
    chunk_rtf: float = 0.0  # 0: not measured (each sentence came in one chunk)

    def observe(self, timing: SentenceTiming) -> "Pace":
        """This pace with one more sentence in: what came slower is taken over at once (the engine fell
        behind), what came faster is averaged in."""
        new = _measures(timing)
        old = (self.first_audio_s, self.rtf, self.own_lead_s, self.seconds_per_char, self.chunk_rtf)
        return Pace(*(_follow(a, b) for a, b in zip(old[:3], new[:3])), _smooth(old[3], new[3]),
                    _follow(old[4], new[4]))

    @classmethod
    def first(cls, timing: SentenceTiming) -> "Pace":
        return cls(*_measures(timing))

    def slowed(self, factor: float) -> "Pace":
        """This pace, with synthesis `factor` times slower (a sentence coming slower than measured)."""
        if factor <= 1.0:
            return self
        return Pace(self.first_audio_s * factor, self.rtf * factor, self.own_lead_s, self.seconds_per_char,
                    self.chunk_rtf * factor)

    def duration_s(self, chars: int) -> float:
        """The estimated audio length of a sentence of `chars` characters."""
        return chars * self.seconds_per_char


@dataclass(frozen=True)
class Progress:
    """The sentence being synthesized: its length in characters, seconds since it was started, when
    its first audio came (seconds after its start), how many seconds of its audio are written, and
    how long its first chunk was."""

    chars: int
    elapsed_s: float
    first_audio_at_s: float
    written_s: float
    first_chunk_s: float = 0.0

    @property
    def chunk_rtf(self) -> float | None:
        """The real-time factor of its chunks after the first, so far (None: one chunk so far)."""
        later = self.written_s - self.first_chunk_s
        return (self.elapsed_s - self.first_audio_at_s) / later if later > 1e-9 else None


def shortfall(pace: Pace, buffered_s: float, current: Progress | None, upcoming_chars: list[int]) -> float:
    """Seconds by which audio would come late, at worst, if playback started now and never paused;
    <= 0: it would not. `buffered_s` is the audio written and not played, `upcoming_chars` the
    lengths of the sentences waiting, in order. MARGIN_S is included."""
    if current is not None:  # the engine fell behind: it counts now, not from the next sentence on
        pace = pace.slowed(_slowdown(pace, current))
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


def _slowdown(pace: Pace, current: Progress) -> float:
    """How many times slower than `pace` the sentence being synthesized comes: by its later chunks' rate
    once it has some, else by its first chunk's start-up."""
    if current.chunk_rtf is not None and pace.chunk_rtf > 0:
        return current.chunk_rtf / pace.chunk_rtf
    return current.first_audio_at_s / pace.first_audio_s if pace.first_audio_s > 0 else 1.0


def _measures(timing: SentenceTiming) -> tuple[float, float, float, float, float]:
    audio = timing.audio_s
    rtf = timing.arrivals[-1] / audio
    return (timing.arrivals[0], rtf, timing.own_lead_s, audio / max(timing.chars, 1),
            rtf if timing.chunk_rtf is None else timing.chunk_rtf)


def _smooth(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new


def _follow(old: float, new: float) -> float:
    """Slower (larger) at once, faster smoothly."""
    return new if new > old else _smooth(old, new)
