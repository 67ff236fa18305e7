"""Slash commands: /reset, /persona [name], /personas, /forget-me, /usage, /help, and /server (its
admins: persona, prompt, rate-limit, budget, show).

Each is about the channel or thread it is used in (a thread inherits its channel's persona),
except /forget-me, which is about the person, /usage, about the person in this server, and
/server, about the server. Refusals, errors and what concerns only the caller are ephemeral (only
the caller sees them); what changes the channel's conversation (a reset, a persona switch) is said
in the open. What each /server word means is core's (core/servers.py): here it is only spelled
as Discord's options.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import discord
from discord import app_commands

from core.commands import PERSONA, RESET, SERVER, USAGE, HelpStyle, SwitchPolicy, help_text
from core.config.schema import DiscordSection
from core.conversation import ConversationKey
from core.errors import ChatError
from core.service import ChatService

log = logging.getLogger(__name__)

HELP = help_text(HelpStyle(
    "Mention me, reply to one of my messages or message me directly to chat.",
    notes={RESET: "forgets this channel's conversation",
           PERSONA: "shows or switches who I am here (a channel's persona carries into its threads)"},
    servers=True,
))
APOLOGY = "Sorry, something went wrong with that command. Please try again."


def conversation_key(channel: discord.abc.Snowflake, guild_id: int | None) -> ConversationKey:
    """A Discord conversation: a channel, a thread (which inherits its channel's persona) or a DM
    (no guild: outside any server)."""
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    return ConversationKey("discord", str(channel.id), parent=str(parent) if parent else None,
                           server=str(guild_id) if guild_id else None)


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
        return conversation_key(interaction.channel or discord.Object(interaction.channel_id), interaction.guild_id)

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

    @tree.command(name=USAGE, description="How many tokens you and this server used today")
    async def usage(interaction: discord.Interaction) -> None:
        if await refused(interaction):
            return
        text = await service.command(here(interaction), USAGE, author_id=str(interaction.user.id))
        await interaction.response.send_message(text, ephemeral=True)

    @tree.command(name="help", description="How to talk to me")
    async def help_(interaction: discord.Interaction) -> None:
        if await refused(interaction):
            return
        await interaction.response.send_message(HELP, ephemeral=True)

    tree.add_command(server_commands(service, refused, persona_choices, here))

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("slash command failed in channel %s", interaction.channel_id, exc_info=error)
        if interaction.is_expired():
            return
        if interaction.response.is_done():
            await interaction.followup.send(APOLOGY, ephemeral=True)
        else:
            await interaction.response.send_message(APOLOGY, ephemeral=True)


def server_commands(service: ChatService, refused: Callable[..., Awaitable[bool]], persona_choices,
                    here: Callable[[discord.Interaction], ConversationKey]) -> app_commands.Group:
    """/server: this server's settings, for members with Manage Server (Discord shows it only to
    them; the service checks again). Every answer is ephemeral."""
    group = app_commands.Group(name=SERVER, description="This server's settings (Manage Server)", guild_only=True,
                               default_permissions=discord.Permissions(manage_guild=True))

    async def run(interaction: discord.Interaction, words: str) -> None:
        if await refused(interaction):
            return
        text = await service.command(here(interaction), SERVER, words, author_id=str(interaction.user.id),
                                     admin=is_admin(interaction))
        await interaction.response.send_message(text, ephemeral=True)

    @group.command(name="persona", description="Who this server's channels that have not chosen one answer as")
    @app_commands.describe(name="a persona, or clear for the host's default")
    @app_commands.autocomplete(name=persona_choices)
    async def persona(interaction: discord.Interaction, name: str) -> None:
        await run(interaction, f"persona {name}")

    @group.command(name="prompt", description="An extra instruction for this server's conversations")
    @app_commands.describe(text="the instruction (chat-format personas follow it), or clear to remove it")
    async def prompt(interaction: discord.Interaction, text: str) -> None:
        await run(interaction, f"prompt {text}")

    @group.command(name="rate-limit", description="Messages per person per minute here (within the host's)")
    @app_commands.describe(messages="messages per person per minute; 0: the host's limit")
    async def rate_limit(interaction: discord.Interaction, messages: int) -> None:
        await run(interaction, f"rate-limit {messages}")

    @group.command(name="budget", description="Tokens a day here, per person or for the server (within the host's)")
    @app_commands.describe(who="person: each person's budget; server: everyone's together",
                           tokens="tokens a day; 0: the host's limit")
    @app_commands.choices(who=[app_commands.Choice(name="person", value="person"),
                               app_commands.Choice(name="server", value="server")])
    async def budget(interaction: discord.Interaction, who: app_commands.Choice[str], tokens: int) -> None:
        await run(interaction, f"budget {who.value} {tokens}")

    @group.command(name="show", description="This server's settings")
    async def show(interaction: discord.Interaction) -> None:
        await run(interaction, "show")

    return group


def switch_policy(config: DiscordSection) -> SwitchPolicy:
    """`persona_switch` as core's policy: `roles` lists the roles of `persona_switch_roles`."""
    rule = "listed" if config.persona_switch == "roles" else config.persona_switch
    return SwitchPolicy(rule, config.persona_switch_roles, admins="admins (Manage Server)",
                        listed_as="members with a persona-switching role")


def may_switch_persona(interaction: discord.Interaction, policy: SwitchPolicy) -> bool:
    """Admins (Manage Server) may always switch; others as the policy says. DMs: anyone."""
    roles = {role.id for role in getattr(interaction.user, "roles", ())}
    return policy.allows(admin=is_admin(interaction), holds=roles, private=interaction.guild is None)


def is_admin(interaction: discord.Interaction) -> bool:
    """An admin of the server it is used in: Manage Server (or Administrator)."""
    permissions = interaction.permissions
    return interaction.guild_id is not None and (permissions.administrator or permissions.manage_guild)


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
