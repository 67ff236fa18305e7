"""Slash commands: /reset, /persona [name], /personas, /forget-me, /help.

Each is about the channel or thread it is used in (a thread inherits its channel's persona),
except /forget-me, which is about the person. Refusals, errors and what concerns only the caller
are ephemeral (only the caller sees them); what changes the channel's conversation (a reset, a
persona switch) is said in the open.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import discord
from discord import app_commands

from core.commands import PERSONA, RESET, HelpStyle, SwitchPolicy, help_text
from core.config.schema import DiscordSection
from core.conversation import ConversationKey
from core.errors import ChatError
from core.service import ChatService

log = logging.getLogger(__name__)

HELP = help_text(HelpStyle(
    "Mention me, reply to one of my messages or message me directly to chat.",
    notes={RESET: "forgets this channel's conversation",
           PERSONA: "shows or switches who I am here (a channel's persona carries into its threads)"},
))
APOLOGY = "Sorry, something went wrong with that command. Please try again."


def conversation_key(channel: discord.abc.Snowflake) -> ConversationKey:
    """A Discord conversation: a channel, a thread (which inherits its channel's persona) or a DM."""
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    return ConversationKey("discord", str(channel.id), parent=str(parent) if parent else None)


def refusing(refusal: Callable[..., str | None]) -> Callable[..., Awaitable[bool]]:
    """`refused(interaction, access=True)`: whether `refusal` refuses the interaction, after telling
    the caller why (only they see it)."""

    async def refused(interaction: discord.Interaction, *, access: bool = True) -> bool:
        reason = refusal(interaction, access=access)
        if reason:
            await interaction.response.send_message(reason, ephemeral=True)
        return reason is not None

    return refused


def add_commands(
    tree: app_commands.CommandTree,
    service: ChatService,
    config: DiscordSection,
    refusal: Callable[..., str | None],
) -> None:
    """Register the chat commands on `tree`; `refusal(interaction, access=True)` says why an
    interaction may not be served (`access=False`: regardless of the access lists)."""

    refused = refusing(refusal)
    policy = switch_policy(config)

    def here(interaction: discord.Interaction) -> ConversationKey:
        return conversation_key(interaction.channel or discord.Object(interaction.channel_id))

    @tree.command(name="reset", description="Forget this channel's conversation with me")
    async def reset(interaction: discord.Interaction) -> None:
        if await refused(interaction):
            return
        await interaction.response.defer()  # waits for a reply in progress here: may pass the 3 s
        await interaction.followup.send(await service.command(here(interaction), "reset"))

    async def persona_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        current = current.strip().lower()
        return [
            app_commands.Choice(name=f"{p.name}: {p.description}"[:100], value=p.name)
            for p in service.persona_list()
            if current in p.name.lower()
        ][:25]

    @tree.command(name="persona", description="Show or switch who I am in this channel")
    @app_commands.describe(name="the persona to switch to (leave out to see the current one)")
    @app_commands.autocomplete(name=persona_choices)
    async def persona(interaction: discord.Interaction, name: str | None = None) -> None:
        if await refused(interaction):
            return
        key = here(interaction)
        if not name:
            await interaction.response.send_message(await service.command(key, "persona"), ephemeral=True)
            return
        if not may_switch_persona(interaction, policy):
            await interaction.response.send_message(policy.refusal(), ephemeral=True)
            return
        try:
            chosen = await service.set_persona(key, name)
        except ChatError as exc:  # an unknown or unavailable persona, or the store is unreachable
            await interaction.response.send_message(exc.user_message, ephemeral=True)
            return
        await interaction.response.send_message(f"Switched to **{chosen.name}**: {chosen.description}")

    @tree.command(name="personas", description="List who I can be")
    async def personas(interaction: discord.Interaction) -> None:
        if await refused(interaction):
            return
        text = await service.command(here(interaction), "personas")
        await interaction.response.send_message(text, ephemeral=True)

    @tree.command(name="forget-me", description="Delete everything you wrote to me, in every conversation")
    async def forget_me(interaction: discord.Interaction) -> None:
        if await refused(interaction, access=False):  # anyone may have their words deleted
            return
        await interaction.response.defer(ephemeral=True)
        text = await service.command(here(interaction), "forget-me", author_id=str(interaction.user.id))
        await interaction.followup.send(text, ephemeral=True)

    @tree.command(name="help", description="How to talk to me")
    async def help_(interaction: discord.Interaction) -> None:
        if await refused(interaction):
            return
        await interaction.response.send_message(HELP, ephemeral=True)

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("slash command failed in channel %s", interaction.channel_id, exc_info=error)
        if interaction.is_expired():
            return
        if interaction.response.is_done():
            await interaction.followup.send(APOLOGY, ephemeral=True)
        else:
            await interaction.response.send_message(APOLOGY, ephemeral=True)


def switch_policy(config: DiscordSection) -> SwitchPolicy:
    """`persona_switch` as core's policy: `roles` lists the roles of `persona_switch_roles`."""
    rule = "listed" if config.persona_switch == "roles" else config.persona_switch
    return SwitchPolicy(rule, config.persona_switch_roles, admins="admins (Manage Server)",
                        listed_as="members with a persona-switching role")


def may_switch_persona(interaction: discord.Interaction, policy: SwitchPolicy) -> bool:
    """Admins (Manage Server) may always switch; others as the policy says. DMs: anyone."""
    permissions = interaction.permissions
    return policy.allows(admin=permissions.administrator or permissions.manage_guild,
                         holds={role.id for role in getattr(interaction.user, "roles", ())},
                         private=interaction.guild is None)


async def sync_commands(tree: app_commands.CommandTree, guild_ids: list[int]) -> None:
    """Publish the commands to these guilds (at once) or, with none, globally (Discord may take a while)."""
    targets = [discord.Object(guild_id) for guild_id in guild_ids] or [None]
    for guild in targets:
        if guild is not None:
            tree.copy_global_to(guild=guild)
        try:
            await tree.sync(guild=guild)
        except discord.HTTPException as exc:
            log.error(
                "could not register slash commands %s (%s): was the bot invited with the "
                "applications.commands scope?", f"in guild {guild.id}" if guild else "globally", exc,
            )
