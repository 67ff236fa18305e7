"""The voice slash commands: /join /leave /skip, and /listen on|off|ignore-me when the bot listens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

import discord
from discord import app_commands

from bots.discord.commands import refusing
from bots.discord.voice.speaking import DiscordSpeaking

if TYPE_CHECKING:  # it needs the listen extra
    from bots.discord.voice.listening import DiscordListening


def add_voice_commands(tree: app_commands.CommandTree, voice: DiscordSpeaking,
                       refusal: Callable[..., str | None]) -> None:
    """/join, /leave and /skip on `tree`; `refusal` says why an interaction may not be served."""

    refused = refusing(refusal)

    @tree.command(name="join", description="Join your voice channel and speak my replies there")
    async def join(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.join(interaction)

    @tree.command(name="leave", description="Leave the voice channel")
    async def leave(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.leave(interaction)

    @tree.command(name="skip", description="Stop what I'm saying right now")
    async def skip(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await voice.skip(interaction)

    if voice.listening is not None:
        add_listen_commands(tree, voice.listening, refused)


def add_listen_commands(tree: app_commands.CommandTree, listening: "DiscordListening",
                        refused: Callable[[discord.Interaction], Awaitable[bool]]) -> None:
    """/listen on|off (admins) and /listen ignore-me."""
    group = app_commands.Group(name="listen", description="Whether I listen in the voice channel")

    @group.command(name="on", description="Listen and answer in the voice channel (admins)")
    async def listen_on(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await listening.switch(interaction, True)

    @group.command(name="off", description="Stop listening in the voice channel; only speak replies (admins)")
    async def listen_off(interaction: discord.Interaction) -> None:
        if not await refused(interaction):
            await listening.switch(interaction, False)

    @group.command(name="ignore-me", description="Don't listen to me in voice channels")
    @app_commands.describe(ignore="False: listen to me again")
    async def ignore_me(interaction: discord.Interaction, ignore: bool = True) -> None:
        await listening.ignore_me(interaction, ignore)

    tree.add_command(group)

