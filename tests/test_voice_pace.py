"""When a spoken reply starts playing (voice/speak/pace.py): the start rule, replayed over engines' delivery
timelines (no clocks: the timelines are numbers), and a player that must never run dry."""

from __future__ import annotations

import pytest

from voice.speak.pace import MARGIN_S, Pace, Progress, SentenceTiming, shortfall

SPC = 0.05  # seconds of speech per character in these timelines


def deliveries(durations: list[float], first_chunk_s: float, startup_s: float, rtf: float,
               growth: float = 1.0) -> list[SentenceTiming]:
    """How an engine delivers sentences of `durations` one after another: each sentence's first chunk
    (`first_chunk_s` of audio) `startup_s` after it starts, every later chunk (each `growth` times the
    previous) taking `rtf` times its audio."""
    timings = []
    for duration in durations:
        arrivals, sizes, clock, size, left = [], [], startup_s, first_chunk_s, duration
        while left > 1e-9:
            size = min(size, left)
            if sizes:
                clock += rtf * size
            arrivals.append(clock)
            sizes.append(size)
            left -= size
            size *= growth
        timings.append(SentenceTiming(round(duration / SPC), tuple(arrivals), tuple(sizes)))
    return timings


def measured(timings: list[SentenceTiming]) -> Pace:
    pace = Pace.first(timings[0])
    for timing in timings[1:]:
        pace = pace.observe(timing)
    return pace


def play(pace: Pace, timings: list[SentenceTiming]) -> tuple[float, float, float]:
    """Replay a reply whose sentences are all known at once: the rule is asked at every chunk and at
    every sentence's end, as SpokenReply does. Returns (start, end of synthesis, worst lateness)."""
    start, clock, written = None, 0.0, 0.0
    arrivals = []  # (time, where that chunk's audio starts in the reply, its length)
    for i, timing in enumerate(timings):
        upcoming = [t.chars for t in timings[i + 1:]]
        for k, (arrival, size) in enumerate(zip(timing.arrivals, timing.durations)):
            arrivals.append((clock + arrival, written, size))
            written += size
            progress = Progress(timing.chars, arrival, timing.arrivals[0], sum(timing.durations[:k + 1]))
            if start is None and shortfall(pace, written, progress, upcoming) <= 0:
                start = clock + arrival
        clock += timing.arrivals[-1]
        if start is None and (not upcoming or shortfall(pace, written, None, upcoming) <= 0):
            start = clock
    late = max(at - (start + position) for at, position, _ in arrivals)
    return start, clock, late


def test_sentence_timing_measures_how_late_its_own_chunks_come():
    steady = SentenceTiming(20, (0.1, 0.2, 0.3), (0.2, 0.2, 0.2))
    assert steady.audio_s == pytest.approx(0.6)
    assert steady.own_lead_s == pytest.approx(-0.1)  # each chunk came 0.1 s before a player needed it
    bursty = SentenceTiming(20, (0.1, 0.4, 0.5), (0.2, 0.2, 0.2))
    assert bursty.own_lead_s == pytest.approx(0.1)  # the second chunk came 0.1 s after the first ran out
    assert SentenceTiming(20, (0.3,), (0.5,)).own_lead_s == pytest.approx(-0.5)

    pace = Pace.first(bursty)
    assert (pace.first_audio_s, pace.rtf, pace.seconds_per_char) == pytest.approx((0.1, 0.5 / 0.6, 0.03))
    assert pace.duration_s(100) == pytest.approx(3.0)
    smoothed = pace.observe(steady)
    assert pace.own_lead_s > smoothed.own_lead_s > steady.own_lead_s  # a running average


@pytest.mark.parametrize("name, first_chunk_s, startup_s, rtf, growth", [
    ("far ahead of real time, small chunks (pocket-like)", 0.08, 0.05, 0.17, 1.0),
    ("near real time, growing chunks (xtts on a CPU)", 0.2, 0.17, 0.7, 1.5),
    ("near real time, one chunk a sentence", 10.0, 0.4, 0.7, 1.0),
    ("slower than real time", 0.2, 0.2, 1.3, 1.0),
])
def test_playback_starts_early_and_never_runs_dry(name, first_chunk_s, startup_s, rtf, growth):
    pace = measured(deliveries([0.8, 1.4, 0.6], first_chunk_s, startup_s, rtf, growth))
    short_first = deliveries([0.15, 1.2, 0.5], first_chunk_s, startup_s, rtf, growth)
    assert play(pace, short_first)[2] <= 0, f"{name}: a short first sentence ran dry"
    reply = deliveries([1.0, 1.5, 0.7], first_chunk_s, startup_s, rtf, growth)
    start, synthesized, late = play(pace, reply)
    assert late <= 0, f"{name}: audio came {late:.3f} s after the player needed it"
    if rtf < 1 and first_chunk_s < 1:
        assert start < reply[0].arrivals[-1]  # before the first sentence is whole
        assert start / synthesized <= 0.3
    if rtf > 1:
        assert late <= -MARGIN_S / 2  # it waited for the shortfall of the whole reply


def test_a_short_buffer_waits_for_the_next_sentences_start_up():
    pace = Pace(first_audio_s=0.3, rtf=0.7, own_lead_s=-0.1, seconds_per_char=SPC)
    done = Progress(chars=4, elapsed_s=0.3, first_audio_at_s=0.3, written_s=0.2)  # a short first sentence, whole
    assert shortfall(pace, 0.2, done, [20]) > 0  # 0.2 s of audio cannot cover the next one's 0.3 s start-up
    assert shortfall(pace, 0.2, done, []) <= 0  # nothing known to follow: play it
    assert shortfall(pace, 0.3 + MARGIN_S + 0.01, None, [20]) <= 0
    longer = Progress(chars=40, elapsed_s=0.3, first_audio_at_s=0.3, written_s=0.2)  # 2 s expected
    assert shortfall(pace, 0.2, longer, [20]) <= 0  # its own rest covers the next start-up
