"""ChatService: what every adapter calls with (conversation key, author, text).

It builds the context, picks the persona, keeps within the rate limits and token budgets (the
host's and the server's own), asks the shared generator, keeps output safe, counts the tokens
made, and stores the answered turn before the adapter shows the final reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from core import admission, commands
from core.admission import Admission, Message, RateDecision
from core.budgets import Spending
from core.config.schema import Config, Decoding
from core.conversation import ConversationBusy, ConversationKey, ConversationStore, StoreUnavailable, Turn, current_session
from core.files import with_files
from core.errors import (
    BUSY, CONVERSATION_BUSY, MEMORY_UNAVAILABLE, TIMED_OUT, Busy, ChatError, InputRejected, MemoryUnavailable,
    OverBudget, PersonaError, ReplyFailed, TimedOut, TooLong, store_trouble,
)
from core.engine.generator import Generation, GenerationFailed, GenerationTimeout, GeneratorBusy
from core.metrics import Metrics
from core.personas import Persona, PersonaRegistry, PersonaUnavailable, UnknownPersona
from core.prompts import PromptTooLong, SystemPromptTooLong
from core.replies import ReplyUpdate, screened_reply
from core.servers import ServerSettings, Servers
from core.stores import open_store

log = logging.getLogger(__name__)

NOT_KNOWN = "I can't tell who you are here, so there is "
TAKING_PART = "taking-part"  # conversations a replica took up, until the first reply is stored
TAKING_PART_FOR_S = 86400.0


class ChatService:
    def __init__(self, config: Config, store: ConversationStore, personas: PersonaRegistry, metrics: Metrics):
        self.config = config
        self.store = store
        self.personas = personas
        self.metrics = metrics
        self.servers = Servers(config, store)

    # ---- replies ---------------------------------------------------------------------------

    def respond(
        self, key: ConversationKey, author: str, message: str | Message, *, adapter: str,
        author_id: str | None = None, persona: str | None = None,
    ) -> AsyncIterator[ReplyUpdate]:
        """Reply updates for one message; raises ChatError subclasses with a user-facing message.

        `message` is raw text (checked here) or a Message the service took already (`admit`).
        `author` is the name the model reads; `author_id` the platform's id of that person, stored
        with their turn so that "forget me" can find it, and whose daily token budget it spends
        (a spent budget raises OverBudget before anything reaches the generator).
        """
        return self._respond(key, author, author_id, message, adapter, persona)

    async def reply(
        self, key: ConversationKey, author: str, text: str | Message, *, adapter: str, author_id: str | None = None,
        persona: str | None = None,
    ) -> str:
        """The final reply text, once stored."""
        final = ""
        async for update in self.respond(key, author, text, adapter=adapter, author_id=author_id, persona=persona):
            final = update.text
        return final

    async def _respond(self, key, author, author_id, message, adapter, persona_name) -> AsyncIterator[ReplyUpdate]:
        started = time.monotonic()
        label = persona_name or "?"
        try:
            text = (message if isinstance(message, Message) else self.validate(message)).text
            async with self.store.lock(key):
                settings = await self.servers.settings(key)
                persona = await self.persona_for(key, persona_name, settings=settings)
                label = persona.name
                budget = await self.servers.budget(key, author_id, settings)
                if budget.spent:
                    self.metrics.budget_refusals.labels(adapter, budget.spent).inc()
                    raise OverBudget(budget.notice())
                cfg = self.config.conversation
                history = current_session(
                    await self.store.recent_turns(key, cfg.max_turns), cfg.idle_minutes * 60
                )
                final = None
                spending = Spending(budget.remaining)
                try:
                    async for update in self._screened(persona, history + [Turn("user", author, text)], key=key,
                                                       system_prompt=_system_prompt(persona, settings),
                                                       spending=spending):
                        if update.final:
                            final = update
                        else:
                            yield update
                finally:
                    await self._count_tokens(adapter, persona.name, spending.tokens, key, author_id)
                await self.store.add_turns(
                    key,
                    [
                        Turn("user", author, text, persona=persona.name, author_id=author_id),
                        Turn("bot", persona.name, final.text, persona=persona.name),
                    ],
                )
        except ConversationBusy:
            log.warning("no reply key=%s: an earlier reply held the conversation past the lock wait", key)
            self.metrics.requests.labels(adapter, label, Busy.outcome).inc()
            raise Busy(CONVERSATION_BUSY) from None
        except StoreUnavailable as exc:
            # Nothing unstored is ever shown: without the store there is no final reply.
            log.warning("no reply key=%s: the store is unavailable: %s", key, exc)
            self.metrics.requests.labels(adapter, label, MemoryUnavailable.outcome).inc()
            raise MemoryUnavailable(MEMORY_UNAVAILABLE) from None
        except ChatError as exc:
            self.record_refusal(adapter, label, exc.outcome, key=key)
            raise
        self._record_reply(adapter, label, key, started, final)
        yield final

    def complete(
        self, persona: Persona, turns: list[Turn], *, adapter: str, system_prompt: str | None = None,
        decoding: Decoding | None = None, retractable: bool = True,
    ) -> AsyncIterator[ReplyUpdate]:
        """A reply to `turns` that nothing stores (a stateless API), screened, counted and logged like
        every reply; raises ChatError subclasses. `retractable` is False for a reader that cannot
        take shown text back (a stream): a reply that fails the screen after part of it was shown
        then ends there, `cut`, instead of being replaced."""
        return self._complete(persona, turns, adapter, system_prompt, decoding, retractable)

    async def _complete(self, persona, turns, adapter, system_prompt, decoding, retractable):
        started = time.monotonic()
        key = f"{adapter}:-"
        finished = False
        spending = Spending()
        try:
            async for update in self._screened(persona, turns, key=key, system_prompt=system_prompt,
                                               decoding=decoding, retractable=retractable, spending=spending):
                if update.final:
                    self._record_reply(adapter, persona.name, key, started, update)
                    finished = True
                yield update
        except ChatError as exc:
            self.record_refusal(adapter, persona.name, exc.outcome, key=key)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:  # the reader went away
                self.record_refusal(adapter, persona.name, "cancelled", key=key)
            raise
        finally:
            await self._count_tokens(adapter, persona.name, spending.tokens)

    def record_refusal(self, adapter: str, persona: str, outcome: str, *, key: object = "-") -> None:
        """Count and log a request that got no reply (adapters call it for refusals of their own)."""
        self.metrics.requests.labels(adapter, persona, outcome).inc()
        log.info("no reply key=%s persona=%s outcome=%s", key, persona, outcome)

    async def _count_tokens(self, adapter: str, persona: str, tokens: int, key: ConversationKey | None = None,
                            author_id: str | None = None) -> None:
        """Count the tokens a reply made: in the metrics and, for a conversation, against today's
        budgets of its author and server (a count the store cannot take is logged, not raised)."""
        if not tokens:
            return
        self.metrics.tokens_generated.labels(adapter, persona).inc(tokens)
        if key is None:
            return
        try:
            await self.servers.count_tokens(key, author_id, tokens)
        except StoreUnavailable as exc:
            log.warning("%d token(s) of a reply key=%s not counted, the store is unavailable: %s", tokens, key, exc)

    def _record_reply(self, adapter: str, persona: str, key: object, started: float, final: ReplyUpdate) -> None:
        latency = time.monotonic() - started
        stats = final.stats
        self.metrics.requests.labels(adapter, persona, "cut" if final.cut else "ok").inc()
        self.metrics.reply_latency.labels(adapter, persona).observe(latency)
        if stats.total_s > 0 and stats.new_tokens:
            self.metrics.tokens_per_second.labels(persona).set(stats.new_tokens / stats.total_s)
        log.info(
            "reply key=%s persona=%s queue_wait=%.3fs latency=%.2fs tokens=%d",
            key, persona, stats.queue_wait_s, latency, stats.new_tokens,
        )
        log.debug("reply key=%s text=%r", key, final.text)

    # ---- admission -------------------------------------------------------------------------

    def validate(self, text: str | None, *, files: int = 0) -> Message:
        """The message as the service takes it (stripped; its words may be empty when it brings
        `files`); raises InputRejected (nothing counted or stored)."""
        return admission.validate(text, self.config.service.max_input_chars, files=files)

    async def check_rate(self, platform: str, author_id: str, per_minute: int, *, server: str = "",
                         server_per_minute: int = 0) -> RateDecision:
        """Count a message from this person (0 = no limit; `server_per_minute`: their server's own, counted
        per server); when over a limit, `notify` is True only for the first refusal in the window, so a
        flood gets one notice, not one per message."""
        return await admission.check_rate(self.store, platform, author_id, per_minute, server=server,
                                          server_per_minute=server_per_minute)

    async def admit(self, text: str | None, *, key: ConversationKey, author_id: str, files: int = 0,
                    where: object = "-") -> Admission:
        """Whether to answer this message of this person in this conversation now (see
        core/admission.py; `files`: how many files it brings); a refusal is counted and logged here."""
        platform = key.platform
        try:
            message = self.validate(text, files=files)
            settings = await self.servers.settings(key)
            rate = await self.check_rate(platform, author_id, self.servers.host_limits(platform).rate_limit,
                                         server=key.server_id, server_per_minute=settings.own.rate_limit)
            budget = await self.servers.budget(key, author_id, settings) if rate.allowed else None
            spent_first = budget is not None and budget.spent and await self.servers.first_refusal_today(key, author_id)
        except InputRejected as exc:  # refused words do not count against the rate limit
            self.record_refusal(platform, "?", exc.outcome, key=where)
            return Admission(notice=exc.user_message)
        except StoreUnavailable as exc:
            log.warning("%s: no rate or budget check, the store is unavailable: %s", where, exc)
            self.record_refusal(platform, "?", MemoryUnavailable.outcome, key=where)
            return Admission(notice=MEMORY_UNAVAILABLE)
        if not rate.allowed:
            self.record_refusal(platform, "?", "rate_limited", key=where)
            return Admission(slow_down=rate.wait_s if rate.notify else None)
        if budget.spent:
            self.record_refusal(platform, "?", OverBudget.outcome, key=where)
            self.metrics.budget_refusals.labels(platform, budget.spent).inc()
            return Admission(private_notice=budget.notice() if spent_first else None)
        return Admission(message)

    def attach(self, message: Message, blocks: list[str]) -> Message:
        """The message with the files read for it (quoted blocks from core/files.py) after its words."""
        return with_files(message, blocks)

    @property
    def max_attachment_bytes(self) -> int:
        return self.config.service.max_attachment_kb * 1024

    async def generate(
        self, persona: Persona, turns: list[Turn], *, system_prompt: str | None = None, decoding: Decoding | None = None
    ) -> Generation:
        """Submit `turns` (nothing is stored) to the persona's shared engine; raises ChatError subclasses.

        `system_prompt` and `decoding` override the persona's; the prompt is trimmed to leave room
        for `decoding.max_new_tokens`.
        """
        try:
            engine = await self.personas.engine(persona)
        except PersonaUnavailable as exc:
            raise PersonaError(str(exc)) from None
        decoding = decoding or persona.config.decoding
        system = persona.config.system_prompt if system_prompt is None else system_prompt
        budget = max(16, persona.config.max_context_tokens - decoding.max_new_tokens)
        try:
            prompt = await asyncio.to_thread(engine.prepare, persona.config.format, turns, system, budget)
        except SystemPromptTooLong as exc:
            if system_prompt is None:  # the persona's own: the operator's to fix, not the user's
                log.error("persona %s cannot reply: %s", persona.name, exc)
                raise PersonaError(f"Persona {persona.name!r} is misconfigured: {exc} (in config.yaml).") from None
            raise TooLong(f"That is too long for {persona.name}: {exc}.") from None
        except PromptTooLong as exc:
            raise TooLong(f"That is too long for {persona.name}: {exc}.") from None
        try:
            return engine.submit(
                prompt, decoding, timeout=self.config.generator.request_timeout_s, adapter=persona.config.adapter
            )
        except GeneratorBusy:
            raise Busy(BUSY) from None
        except GenerationFailed as exc:
            log.warning("request rejected by the generator persona=%s: %s", persona.name, exc)
            raise ReplyFailed("Sorry, I couldn't come up with a reply to that.") from None

    async def _screened(
        self, persona: Persona, turns: list[Turn], *, key: object, spending: Spending,
        system_prompt: str | None = None, decoding: Decoding | None = None, retractable: bool = True,
    ) -> AsyncIterator[ReplyUpdate]:
        async def generate(decoding: Decoding) -> Generation:
            generation = await self.generate(persona, turns, system_prompt=system_prompt,
                                             decoding=spending.capped(decoding))
            spending.add(generation)
            return generation

        replies = screened_reply(generate, self.config.safety, turns[-1].text, decoding or persona.config.decoding,
                                 retractable=retractable, label=f"key={key} persona={persona.name}")
        try:
            async for update in replies:
                yield update
        except GenerationTimeout:
            log.warning("generation timed out key=%s persona=%s", key, persona.name)
            raise TimedOut(TIMED_OUT) from None
        except GenerationFailed:
            log.exception("generation failed key=%s persona=%s", key, persona.name)
            raise ReplyFailed("Sorry, something went wrong while I was thinking. Please try again.") from None
        finally:
            await replies.aclose()

    # ---- shared commands -------------------------------------------------------------------

    async def persona_for(self, key: ConversationKey, override: str | None = None, *,
                          settings: ServerSettings | None = None) -> Persona:
        """`override` if given (it must exist), else the persona chosen for the conversation, else the
        one chosen for its parent scope (a thread inherits its channel's), else its server's
        (`/server persona`; `settings` if the caller has them), else the host's default."""
        if override is not None:
            try:
                return self.personas.get(override)
            except UnknownPersona as exc:
                raise PersonaError(str(exc)) from None
        for scope in (key, key.parent_key):
            chosen = await self.store.persona(scope) if scope is not None else None
            if chosen in self.personas.personas:
                return self.personas.get(chosen)
        settings = settings or await self.servers.settings(key)
        return self.personas.get(settings.persona if settings.persona in self.personas.personas
                                 else self.personas.default)

    async def set_persona(self, key: ConversationKey, name: str) -> Persona:
        """Switch this conversation's persona; raises PersonaError for an unknown name, MemoryUnavailable
        without the store."""
        persona = self._available(name)
        with store_trouble(key):
            await self.store.set_persona(key, persona.name)
        return persona

    def _available(self, name: str) -> Persona:
        """The persona called `name`, if it exists and can be served; raises PersonaError."""
        try:
            persona = self.personas.get(name.strip())
            self.personas.check(persona)
        except (UnknownPersona, PersonaUnavailable) as exc:
            raise PersonaError(str(exc)) from None
        return persona

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns; raises MemoryUnavailable (or Busy) when the store cannot."""
        with store_trouble(key):
            async with self.store.lock(key):
                await self.store.reset(key)

    async def forget_person(self, platform: str, author_id: str) -> int:
        """Delete everything this person wrote on this platform (and the replies to it); turns deleted.
        Raises MemoryUnavailable without the store."""
        with store_trouble(platform):
            deleted = await self.store.forget_author(platform, author_id)
        log.info("forgot a person on %s: %d turn(s) deleted", platform, deleted)
        return deleted

    async def delete_expired(self) -> int:
        """Delete turns older than `conversation.retention_days` (0 keeps them); turns deleted."""
        days = self.config.conversation.retention_days
        if not days:
            return 0
        deleted = await self.store.delete_before(time.time() - days * 86400)
        if deleted:
            log.info("retention: deleted %d turn(s) older than %g day(s)", deleted, days)
        return deleted

    def persona_list(self) -> list[Persona]:
        return list(self.personas.personas.values())

    # ---- what adapters may ask of the store, through the service ------------------------------

    async def history(self, key: ConversationKey) -> list[Turn]:
        """The conversation's current session (what the persona remembers); raises MemoryUnavailable."""
        cfg = self.config.conversation
        with store_trouble(key):
            return current_session(await self.store.recent_turns(key, cfg.max_turns), cfg.idle_minutes * 60)

    async def take_part(self, key: ConversationKey) -> None:
        """The bot takes part in this conversation from now on (a thread it was mentioned in): every
        replica knows at once, before the first reply is stored. Raises StoreUnavailable."""
        await self.store.claim(TAKING_PART, str(key), TAKING_PART_FOR_S)

    async def took_part(self, key: ConversationKey) -> bool:
        """Whether the bot takes part in this conversation: its turns are stored (that survives restarts),
        or a replica has taken it up and is answering. Raises StoreUnavailable."""
        if await self.store.recent_turns(key, 1):
            return True
        # A claim that lasts no time only tests whether a live one is there; it leaves nothing behind.
        return not await self.store.claim(TAKING_PART, str(key), 0)

    async def first_delivery(self, namespace: str, ident: str, ttl_s: float) -> bool:
        """True the first time (across replicas) an event is seen within `ttl_s`: platforms retry
        deliveries. Raises StoreUnavailable."""
        return await self.store.claim(namespace, ident, ttl_s)

    async def preferences(self, namespace: str) -> dict[str, str]:
        """People's standing choices in `namespace` (ident -> value); raises StoreUnavailable."""
        return await self.store.preferences(namespace)

    async def set_preference(self, namespace: str, ident: str, value: str | None) -> None:
        """Keep (or with None, drop) a person's choice; raises StoreUnavailable."""
        await self.store.set_preference(namespace, ident, value)

    async def database_health(self) -> dict:
        """The store's own report: {"backend", "ok", ...}."""
        return await self.store.health()

    async def command(
        self, key: ConversationKey, command: str, argument: str = "", *, help_text: str | None = None,
        author_id: str | None = None, admin: bool = False,
    ) -> str:
        """Run a shared command (reset, persona, personas, forget-me, usage, server, help) and say what
        happened (also when the store cannot be reached).

        `help_text` is the calling platform's own help (naming its real commands); `author_id`
        is who asked (needed by forget-me and usage); `admin` whether the platform counts them as
        an admin of the conversation's server (needed by server).
        """
        try:
            with store_trouble(key):
                return await self._command(key, command, argument, help_text, author_id, admin)
        except ChatError as exc:
            return exc.user_message

    async def _command(self, key: ConversationKey, command: str, argument: str, help_text: str | None,
                       author_id: str | None, admin: bool) -> str:
        command = command.strip().lower().lstrip("/!")
        argument = argument.strip()
        if command == commands.FORGET_ME:
            if not author_id:
                return NOT_KNOWN + "nothing of yours I could forget."
            deleted = await self.forget_person(key.platform, author_id)
            return f"Done: I've deleted everything you wrote to me here ({deleted} message(s), with my replies)."
        if command == commands.USAGE:
            if not author_id:
                return NOT_KNOWN + "no usage of yours to show."
            return (await self.servers.budget(key, author_id, counted=True)).report()
        if command == commands.SERVER:
            return await self.servers.command(key, argument, admin=admin, author_id=author_id,
                                              persona_named=lambda name: self._available(name).name,
                                              default_persona=self.personas.default)
        if command == commands.RESET:
            await self.reset(key)
            return "Done: I've forgotten this conversation. Fresh start!"
        if command == commands.PERSONA:
            if not argument:
                current = await self.persona_for(key)
                return f"I'm currently **{current.name}**: {current.description}"
            try:
                persona = await self.set_persona(key, argument)
            except PersonaError as exc:
                return exc.user_message
            return f"Switched to **{persona.name}**: {persona.description}"
        if command == commands.PERSONAS:
            current = await self.persona_for(key)
            lines = [
                f"- **{p.name}**{' (current)' if p.name == current.name else ''}: {p.description}"
                for p in self.persona_list()
            ]
            return "Personas:\n" + "\n".join(lines)
        return help_text or commands.help_text()

    async def close(self) -> None:
        await self.personas.close()
        await self.store.close()


def _system_prompt(persona: Persona, settings: ServerSettings) -> str | None:
    """The persona's system prompt with the server's prompt after it (chat-format personas only);
    None: the persona's own, unchanged."""
    if persona.config.format != "chat" or not settings.prompt:
        return None
    return "\n\n".join(part for part in (persona.config.system_prompt, settings.prompt) if part)


async def open_service(config: Config, environ: dict[str, str] | None = None) -> ChatService:
    """A ChatService on the configured store (SQLite, or PostgreSQL at database.url), with its own metrics."""
    metrics = Metrics()
    store = await open_store(config.database, metrics, environ)
    return ChatService(config, store, PersonaRegistry(config, metrics, environ), metrics)
