"""Service metrics in Prometheus form, one registry per running service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4, 8)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ttt_requests", "Chat requests by adapter, persona and outcome", ["adapter", "persona", "outcome"], registry=r
        )
        self.reply_latency = Histogram(
            "ttt_reply_latency_seconds", "Time from message to full reply", ["adapter", "persona"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_token = Histogram(
            "ttt_time_to_first_token_seconds", "Time from submission to the first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("ttt_generator_queue_depth", "Requests waiting to join a batch", ["engine"], registry=r)
        self.active_requests = Gauge("ttt_generator_active", "Requests decoding now", ["engine"], registry=r)
        self.batch_size = Histogram(
            "ttt_generator_batch_size", "Rows in the batch after each join", ["engine"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.generated_tokens = Counter("ttt_generated_tokens", "Tokens generated", ["engine"], registry=r)
        self.expected_wait = Gauge(
            "ttt_generator_expected_wait_seconds", "Estimated wait before a request arriving now starts decoding",
            ["engine"], registry=r,
        )
        self.generator_refused = Counter(
            "ttt_generator_refused", "Requests refused at once (queue_full, deadline, closing)", ["engine", "reason"],
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "ttt_prefix_cache_hits", "Prompts that reused cached keys/values", ["engine"], registry=r
        )
        self.prefix_cache_misses = Counter(
            "ttt_prefix_cache_misses", "Prompts prefilled from scratch", ["engine"], registry=r
        )
        self.prefix_cache_reused_tokens = Counter(
            "ttt_prefix_cache_reused_tokens", "Prompt tokens not prefilled thanks to the prefix cache", ["engine"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "ttt_prefix_cache_bytes", "Memory held by the prefix cache", ["engine"], registry=r
        )
        self.tokens_generated = Counter(
            "ttt_tokens_generated", "Tokens generated for replies (regenerated ones too)", ["adapter", "persona"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "ttt_budget_refusals", "Messages refused because today's token budget is spent (budget: person, server)",
            ["adapter", "budget"], registry=r,
        )
        self.tokens_per_second = Gauge(
            "ttt_reply_tokens_per_second", "Decode speed of the latest reply", ["persona"], registry=r
        )
        self.adapter_up = Gauge("ttt_adapter_up", "1 when an adapter is connected", ["adapter"], registry=r)
        self.model_loaded = Gauge("ttt_model_loaded", "1 loaded, 0 failed to load", ["model"], registry=r)

        # ---- voice (voice/, bots/discord/voice/speaking.py, bots/web/speech_api.py) ----
        self.voice_synthesis = Histogram(
            "ttt_voice_synthesis_seconds", "Time to synthesize one sentence", ["engine"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.voice_rtf = Histogram(
            "ttt_voice_real_time_factor", "Synthesis time divided by the length of the audio made, per sentence",
            ["engine"], buckets=RTF_BUCKETS, registry=r,
        )
        self.voice_first_audio = Histogram(
            "ttt_voice_time_to_first_audio_seconds", "Time from the start of a reply to its first audio out",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.voice_queue_depth = Gauge("ttt_voice_queue_depth", "Replies being spoken or waiting to be", registry=r)
        self.voice_connections = Gauge("ttt_voice_connections", "Discord voice channels the bot is in", registry=r)
        self.voice_audio = Counter("ttt_voice_audio_seconds", "Seconds of speech synthesized", ["adapter"], registry=r)
        self.voice_replies = Counter(
            "ttt_voice_replies", "Spoken replies by adapter and outcome", ["adapter", "outcome"], registry=r
        )
        self.voice_slow_replies = Counter(
            "ttt_voice_slow_replies", "Replies played as whole sentences with pauses: the engine ran slower than "
            "real time", ["engine"], registry=r,
        )

        # ---- listening (voice/listen/, bots/discord/voice/listening.py) ----
        self.voice_turns = Counter(
            "ttt_voice_turns", "Spoken turns heard, by outcome (answered, empty, ignored, failed, backchannel)", ["outcome"],
            registry=r,
        )
        self.voice_transcription = Histogram(
            "ttt_voice_transcription_seconds", "Time to transcribe one batch of spoken turns", ["engine"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.voice_turn_to_first_audio = Histogram(
            "ttt_voice_turn_to_first_audio_seconds",
            "Time from the end of a spoken turn to the first audio of its answer",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
