"""Conversations that communities already wrote, imported as `ttt scrape` writes a subreddit:
DiscordChatExporter JSON (discord.py), a Slack workspace export (slack.py), JSON Lines (jsonl.py).
Each reader turns its format into messages (messages.py); importer.py cuts them into conversations,
pseudonymises them and writes them."""

from __future__ import annotations

from pathlib import Path

from training.imports import discord, jsonl, slack
from training.imports.importer import (DEFAULT_SILENCE_MINUTES, ImportSummary, dataset_name, read_record,
                                       save_import)
from training.imports.messages import Export, ExportError

SOURCES = ("discord", "slack", "jsonl")

__all__ = ["DEFAULT_SILENCE_MINUTES", "SOURCES", "Export", "ExportError", "ImportSummary", "dataset_name",
           "read_export", "read_record", "save_import"]


def read_export(source: str, paths: list[Path]) -> Export:
    """Read an export: discord takes one or more channel files; slack one workspace export (a folder
    or .zip); jsonl one file."""
    if source == "discord":
        return discord.read(paths)
    if len(paths) != 1:
        raise ExportError(f"ttt import {source} takes one {'workspace export' if source == 'slack' else 'file'}")
    if source == "slack":
        return slack.read(paths[0])
    if source == "jsonl":
        return jsonl.read(paths[0])
    raise ExportError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
