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


def timeline(timings: list[SentenceTiming], pace: Pace) -> tuple[list[tuple[float, float, bool]], int]:
    """Replay a reply as SpokenReply plays it, each sentence's audio held until the rule lets it through:
    the worker synthesizes the sentences one after another (all known from the start) and measures each
    into its pace; playback starts the first time the rule allows, at a chunk or at a sentence's end; from
    then on a sentence is let through when the rule allows or once it is whole, and the player plays what
    was let through, in order, pausing when it has nothing. Returns each chunk's (when it plays, how long
    the player waited before it, whether it starts a sentence) and the number of sentences held whole
    while playing."""
    played_chunks: list[tuple[float, float, float, bool]] = []  # (start, length, wait before it, first of sentence)
    starts, let_through, clock, playing_from, held_whole = [], [], 0.0, None, 0

    def played(at: float) -> float:
        return sum(min(max(at - start, 0.0), length) for start, length, _, _ in played_chunks)

    def schedule(i: int) -> None:
        for k, (arrival, length) in enumerate(zip(timings[i].arrivals, timings[i].durations)):
            ready = max(starts[i] + arrival, let_through[i], playing_from)
            end_before = played_chunks[-1][0] + played_chunks[-1][1] if played_chunks else None
            start = ready if end_before is None else max(ready, end_before)
            played_chunks.append((start, length, 0.0 if end_before is None else start - end_before, k == 0))

    for i, timing in enumerate(timings):
        starts.append(clock)
        upcoming = [t.chars for t in timings[i + 1:]]
        before = sum(t.audio_s for t in timings[:i])
        through = None
        for k, arrival in enumerate(timing.arrivals):
            at = clock + arrival
            written = sum(timing.durations[:k + 1])
            progress = Progress(timing.chars, arrival, timing.arrivals[0], written, timing.durations[0])
            if shortfall(pace, before + written - played(at), progress, upcoming) <= 0:
                through = at
                break
        end = clock + timing.arrivals[-1]
        pace = pace.observe(timing)  # the worker measures the sentence before its end is looked at
        if playing_from is None:
            if through is not None:
                playing_from = through
            elif not upcoming or shortfall(pace, before + timing.audio_s, None, upcoming) <= 0:
                playing_from = end
            let_through.append(end if through is None else through)
            if playing_from is not None:
                for j in range(i + 1):
                    schedule(j)
        else:
            held_whole += through is None and len(timing.arrivals) > 1
            let_through.append(end if through is None else through)
            schedule(i)
        clock = end
    return [(start, wait, first) for start, _, wait, first in played_chunks], held_whole


@pytest.mark.parametrize("name, measured_rtf, now_rtf", [
    ("steadily slower than real time", 1.6, 1.6),
    ("measured idle, slower than real time by the time the reply comes (a neighbour's load)", 0.6, 1.5),
])
def test_an_engine_slower_than_real_time_starts_late_enough_to_be_gapless(name, measured_rtf, now_rtf):
    pace = measured(deliveries([0.8, 1.4, 0.6], 0.2, 0.37, measured_rtf, 1.5))
    chunks, held_whole = timeline(deliveries([1.0, 1.5, 0.7, 1.2], 0.2, 0.37, now_rtf, 1.5), pace)
    worst = max(gap for _, gap, _ in chunks)
    assert worst <= MARGIN_S / 2, f"{name}: a gap of {worst:.3f} s"
    start = chunks[0][0]
    assert start > 0.37 + 0.2  # it waited: more than the first chunk


def test_an_engine_that_falls_behind_mid_reply_plays_whole_sentences_never_fragments():
    """Measured at 0.6, it starts as early as that allows; then a neighbour's load makes it 1.5 times
    slower than real time from the second sentence on: later sentences pause before they play, whole."""
    pace = measured(deliveries([0.8, 1.4, 0.6], 0.2, 0.17, 0.6, 1.5))
    reply = deliveries([1.2], 0.2, 0.17, 0.6, 1.5) + deliveries([1.5, 0.7, 1.2], 0.2, 0.4, 1.5, 1.5)
    chunks, held_whole = timeline(reply, pace)
    inside = [gap for _, gap, first in chunks if not first]
    assert max(inside) <= MARGIN_S / 2  # no sentence is cut into fragments
    assert held_whole >= 1  # the pauses fall between sentences, and that is said (SpokenReply logs it)
    assert chunks[0][0] < reply[0].arrivals[-1]  # it started before the first sentence was whole


def test_a_slower_delivery_is_taken_over_at_once_a_faster_one_averaged_in():
    fast = deliveries([1.0], 0.2, 0.17, 0.6, 1.5)[0]
    slow = deliveries([1.0], 0.2, 0.4, 1.5, 1.5)[0]
    pace = Pace.first(fast).observe(slow)
    assert pace.rtf == pytest.approx(Pace.first(slow).rtf) and pace.chunk_rtf == pytest.approx(1.5)
    back = pace.observe(fast)
    assert Pace.first(fast).rtf < back.rtf < pace.rtf  # the machine got quieter: it follows, smoothly
    # Within a sentence, chunks coming slower than measured count at once, before the sentence ends.
    progress = Progress(chars=30, elapsed_s=1.0, first_audio_at_s=0.2, written_s=0.6, first_chunk_s=0.2)
    assert progress.chunk_rtf == pytest.approx(2.0)
    assert shortfall(Pace.first(fast), 0.6, progress, [20]) > shortfall(
        Pace.first(fast), 0.6, Progress(30, 0.44, 0.2, 0.6, 0.2), [20])
