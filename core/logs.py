"""Logging set-up that never lets a secret through, tracebacks included."""

from __future__ import annotations

import logging

from core.config.loading import Secrets


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then replaces every secret's value with `***`."""

    def __init__(self, fmt: str, secrets: Secrets):
        super().__init__(fmt)
        self._values = [v for v in (secrets.get(n) for n in secrets.names()) if v and len(v) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for value in self._values:
            text = text.replace(value, "***")
        return text


def setup_logging(level: str, secrets: Secrets) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for noisy in ("discord.gateway", "discord.client", "slack_bolt", "aiohttp.access", "httpx"):
        logging.getLogger(noisy).setLevel(quiet)
