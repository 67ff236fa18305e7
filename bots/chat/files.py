"""Fetching the files attached to a message, for core/files.py to read into the conversation.

Only the files that core would read are fetched, over async HTTP, and each body is read up to the
size limit and no further: a file larger than it said it was is dropped, never read to its end.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import aiohttp

from core.files import AttachedFile, decode, not_text, quoted, too_large, unread_because

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Download:
    """A file attached to a message, and where to fetch it (`headers`: what the platform wants, such
    as Slack's bot token)."""

    file: AttachedFile
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


async def read_files(downloads: Sequence[Download], max_bytes: int) -> tuple[list[str], list[str]]:
    """(the quoted blocks of the files read, notes for the person about the others)."""
    blocks: list[str] = []
    notes: list[str] = []
    wanted = []
    for download in downloads:
        note = unread_because(download.file, max_bytes)
        if note:
            notes.append(note)
        else:
            wanted.append(download)
    if not wanted:
        return blocks, notes
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)) as session:
        for download in wanted:
            file = download.file
            try:
                data = await _fetch(session, download, max_bytes)
            except _TooLarge:  # it said it was smaller
                notes.append(too_large(file, max_bytes))
                continue
            if data is None:
                notes.append(f"I couldn't fetch {file.name}; please try again.")
            elif (text := decode(file, data)) is None:
                notes.append(not_text(file))
            else:
                blocks.append(quoted(file, text))
    return blocks, notes


class _TooLarge(Exception):
    pass


async def _fetch(session: aiohttp.ClientSession, download: Download, max_bytes: int) -> bytes | None:
    """The file's bytes; None when it could not be fetched; raises _TooLarge past `max_bytes` (the
    rest is never read). The URL is not logged: a platform's may be signed."""
    name = download.file.name
    try:
        # No redirects: a platform's token goes to its own file server only (Slack redirects a request
        # it refuses to its sign-in page, which must not be read as the file).
        async with session.get(download.url, headers=dict(download.headers), allow_redirects=False) as response:
            if response.status != 200:
                log.warning("could not fetch the attached file %r: HTTP %d", name, response.status)
                return None
            if response.content_length is not None and response.content_length > max_bytes:
                raise _TooLarge
            data = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise _TooLarge
            return bytes(data)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("could not fetch the attached file %r: %s", name, exc or type(exc).__name__)
        return None
