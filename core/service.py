"""ChatService: what every adapter calls with (conversation key, author, text).

It builds the context, picks the persona, asks the shared generator, keeps output safe, and
stores the answered turn before the adapter shows the final reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from core.config import Config, Decoding
from core.conversation import ConversationKey, ConversationStore, ConversationBusy, StoreUnavailable, Turn, current_session
from core.generator import Generation, GenerationFailed, GenerationStats, GenerationTimeout, GeneratorBusy
from core.metrics import Metrics
from core.personas import Persona, PersonaRegistry, PersonaUnavailable, UnknownPersona
from core.prompts import PromptTooLong, SystemPromptTooLong
from core.replies import ReplyUpdate, screened_reply

log = logging.getLogger(__name__)


class ChatError(Exception):
    """A request that ends without a model reply; `user_message` is what to tell the user."""

    outcome = "error"

    def __init__(self, user_message: str):
        super().__init__(user_message)
        self.user_message = user_message


class Busy(ChatError):
    """The generator cannot take or finish this in time: try again in a moment (HTTP: 503)."""

    outcome = "busy"


class TimedOut(Busy):
    """The reply ran past its deadline, which under load means the same as busy."""

    outcome = "timeout"


class InputRejected(ChatError):
    outcome = "rejected"


class TooLong(InputRejected):
    """The message (or a system prompt) does not fit the persona's context."""


class PersonaError(ChatError):
    outcome = "persona"


class ReplyFailed(ChatError):
    outcome = "error"


class MemoryUnavailable(ChatError):
    outcome = "store"


MEMORY_UNAVAILABLE = "I can't reach my memory right now; please try again in a moment."
BUSY = "I'm busy with a lot of conversations right now; try again in a moment."
CONVERSATION_BUSY = "I'm still answering an earlier message here; try again in a moment."


@dataclass(frozen=True)
class RateDecision:
    """Whether a person may send another message now; when not, whether to tell them (once a window)."""

    wait_s: float
    notify: bool = False

    @property
    def allowed(self) -> bool:
        return self.wait_s <= 0


@contextmanager
def _store_trouble(key: object) -> Iterator[None]:
    """Store failures as what the user is told: the memory is unreachable, or the conversation still busy."""
    try:
        yield
    except ConversationBusy:
        raise Busy(CONVERSATION_BUSY) from None
    except StoreUnavailable as exc:
        log.warning("no store for %s: %s", key, exc)
        raise MemoryUnavailable(MEMORY_UNAVAILABLE) from None


HELP = (
    "Talk to me by mentioning me or messaging me directly. Commands: "
    "`reset` (forget this conversation), `persona NAME` (switch personality), "
    "`personas` (list them), `forget-me` (delete everything you wrote to me), `help` (this text)."
)
FORGET_ME = "forget-me"


class ChatService:
    def __init__(self, config: Config, store: ConversationStore, personas: PersonaRegistry, metrics: Metrics):
        self.config = config
        self.store = store
        self.personas = personas
        self.metrics = metrics

    # ---- replies ---------------------------------------------------------------------------

    def respond(
        self, key: ConversationKey, author: str, text: str, *, adapter: str, author_id: str | None = None,
        persona: str | None = None,
    ) -> AsyncIterator[ReplyUpdate]:
        """Reply updates for one message; raises ChatError subclasses with a user-facing message.

        `author` is the name the model reads; `author_id` the platform's id of that person, stored
        with their turn so that "forget me" can find it.
        """
        return self._respond(key, author, author_id, text, adapter, persona)

    async def reply(
        self, key: ConversationKey, author: str, text: str, *, adapter: str, author_id: str | None = None,
        persona: str | None = None,
    ) -> str:
        """The final reply text, once stored."""
        final = ""
        async for update in self.respond(key, author, text, adapter=adapter, author_id=author_id, persona=persona):
            final = update.text
        return final

    async def _respond(self, key, author, author_id, text, adapter, persona_name) -> AsyncIterator[ReplyUpdate]:
        started = time.monotonic()
        label = persona_name or "?"
        try:
            text = self.validate(text)
            async with self.store.lock(key):
                persona = await self.persona_for(key, persona_name)
                label = persona.name
                cfg = self.config.conversation
                history = current_session(
                    await self.store.recent_turns(key, cfg.max_turns), cfg.idle_minutes * 60
                )
                final = None
                async for update in self._screened(persona, history + [Turn("user", author, text)], key=key):
                    if update.final:
                        final = update
                    else:
                        yield update
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
        try:
            async for update in self._screened(persona, turns, key=key, system_prompt=system_prompt,
                                               decoding=decoding, retractable=retractable):
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

    def record_refusal(self, adapter: str, persona: str, outcome: str, *, key: object = "-") -> None:
        """Count and log a request that got no reply (adapters call it for refusals of their own)."""
        self.metrics.requests.labels(adapter, persona, outcome).inc()
        log.info("no reply key=%s persona=%s outcome=%s", key, persona, outcome)

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

    def validate(self, text: str) -> str:
        """The message as the service takes it (stripped); raises InputRejected (nothing counted or stored)."""
        text = (text or "").strip()
        if not text:
            raise InputRejected("I didn't catch any words there. Say something after the mention!")
        limit = self.config.service.max_input_chars
        if len(text) > limit:
            raise InputRejected(f"That message is a bit long for me: please keep it under {limit} characters.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: JSON "\ud800", or undecodable bytes read from a terminal
            raise InputRejected("That message holds something that is not text I can read.") from None
        return text

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
        self, persona: Persona, turns: list[Turn], *, key: object, system_prompt: str | None = None,
        decoding: Decoding | None = None, retractable: bool = True,
    ) -> AsyncIterator[ReplyUpdate]:
        async def generate(decoding: Decoding) -> Generation:
            return await self.generate(persona, turns, system_prompt=system_prompt, decoding=decoding)

        replies = screened_reply(generate, self.config.safety, turns[-1].text, decoding or persona.config.decoding,
                                 retractable=retractable, label=f"key={key} persona={persona.name}")
        try:
            async for update in replies:
                yield update
        except GenerationTimeout:
            log.warning("generation timed out key=%s persona=%s", key, persona.name)
            raise TimedOut(BUSY) from None
        except GenerationFailed:
            log.exception("generation failed key=%s persona=%s", key, persona.name)
            raise ReplyFailed("Sorry, something went wrong while I was thinking. Please try again.") from None
        finally:
            await replies.aclose()

    # ---- shared commands -------------------------------------------------------------------

    async def persona_for(self, key: ConversationKey, override: str | None = None) -> Persona:
        """`override` if given (it must exist), else the persona chosen for the conversation, else the
        one chosen for its parent scope (a thread inherits its channel's), else the default."""
        if override is not None:
            try:
                return self.personas.get(override)
            except UnknownPersona as exc:
                raise PersonaError(str(exc)) from None
        for scope in (key, key.parent_key):
            chosen = await self.store.persona(scope) if scope is not None else None
            if chosen in self.personas.personas:
                return self.personas.get(chosen)
        return self.personas.get(self.personas.default)

    async def set_persona(self, key: ConversationKey, name: str) -> Persona:
        """Switch this conversation's persona; raises PersonaError for an unknown name, MemoryUnavailable
        without the store."""
        persona = await self.persona_for(key, name.strip())
        try:
            self.personas.check(persona)
        except PersonaUnavailable as exc:
            raise PersonaError(str(exc)) from None
        with _store_trouble(key):
            await self.store.set_persona(key, persona.name)
        return persona

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns; raises MemoryUnavailable (or Busy) when the store cannot."""
        with _store_trouble(key):
            async with self.store.lock(key):
                await self.store.reset(key)

    async def check_rate(self, platform: str, author_id: str, per_minute: int) -> RateDecision:
        """Count a message from this person (0 = no limit); when over the limit, `notify` is True only
        for the first refusal in the window, so a flood gets one notice, not one per message."""
        if per_minute <= 0:
            return RateDecision(0.0)
        wait = await self.store.count_event(f"rate:{platform}", author_id, per_minute, 60.0)
        if wait <= 0:
            return RateDecision(0.0)
        notify = await self.store.claim(f"rate-notice:{platform}", author_id, wait)
        return RateDecision(wait, notify)

    async def forget_person(self, platform: str, author_id: str) -> int:
        """Delete everything this person wrote on this platform (and the replies to it); turns deleted.
        Raises MemoryUnavailable without the store."""
        with _store_trouble(platform):
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

    async def command(
        self, key: ConversationKey, command: str, argument: str = "", *, help_text: str | None = None,
        author_id: str | None = None,
    ) -> str:
        """Run a shared command (reset, persona, personas, forget-me, help) and say what happened
        (also when the store cannot be reached).

        `help_text` is the calling platform's own help (naming its real commands); `author_id`
        is who asked (needed by forget-me).
        """
        try:
            with _store_trouble(key):
                return await self._command(key, command, argument, help_text, author_id)
        except ChatError as exc:
            return exc.user_message

    async def _command(self, key: ConversationKey, command: str, argument: str, help_text: str | None,
                       author_id: str | None) -> str:
        command = command.strip().lower().lstrip("/!")
        argument = argument.strip()
        if command == FORGET_ME:
            if not author_id:
                return "I can't tell who you are here, so there is nothing of yours I could forget."
            deleted = await self.forget_person(key.platform, author_id)
            return f"Done: I've deleted everything you wrote to me here ({deleted} message(s), with my replies)."
        if command == "reset":
            await self.reset(key)
            return "Done: I've forgotten this conversation. Fresh start!"
        if command == "persona":
            if not argument:
                current = await self.persona_for(key)
                return f"I'm currently **{current.name}**: {current.description}"
            try:
                persona = await self.set_persona(key, argument)
            except PersonaError as exc:
                return exc.user_message
            return f"Switched to **{persona.name}**: {persona.description}"
        if command == "personas":
            current = await self.persona_for(key)
            lines = [
                f"- **{p.name}**{' (current)' if p.name == current.name else ''}: {p.description}"
                for p in self.persona_list()
            ]
            return "Personas:\n" + "\n".join(lines)
        return help_text or HELP

    async def close(self) -> None:
        await self.personas.close()
        await self.store.close()


async def open_service(config: Config, environ: dict[str, str] | None = None) -> ChatService:
    """A ChatService on the configured store (SQLite, or PostgreSQL at database.url), with its own metrics."""
    from core.stores import open_store

    metrics = Metrics()
    store = await open_store(config.database, metrics, environ)
    return ChatService(config, store, PersonaRegistry(config, metrics, environ), metrics)
