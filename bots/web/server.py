"""The web adapter: a chat page, an OpenAI-compatible API, health and metrics, on one aiohttp server.

    /                      the chat page (static files under bots/static/, no build step)
    /api/...               the page's API (bots/web/chat.py)
    /v1/...                the OpenAI-compatible API (bots/web/openai_api.py; speech: bots/web/speech_api.py)
    /healthz               liveness and readiness (JSON)
    /metrics               Prometheus text format

When TTT_API_KEY is set (required to bind beyond loopback), /api, /v1 and /metrics need
`Authorization: Bearer <key>`. The page itself and /healthz stay open: the page holds no data
and asks for the key when the API answers 401.

Other web pages must not drive the server through the operator's browser: on loopback only
loopback Host names are answered (DNS rebinding), state-changing requests from a foreign Origin
are refused, and JSON endpoints take only `application/json` (which a cross-site form or a
"simple" fetch cannot send without a CORS preflight, which is never granted).
"""

from __future__ import annotations

import hmac
import logging
import re
from http import HTTPStatus
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from bots.web.openai_api import OpenAIRoutes
from bots.web.chat import ChatPageRoutes
from bots.web.errors import BODY_TIMEOUT_S, ApiError
from core.config.loading import Settings
from core.config.schema import Config
from core.metrics import Metrics
from core.personas import PersonaUnavailable, UnknownPersona
from core.service import ChatService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROTECTED = ("/api/", "/v1/")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
_QUOTED_DATA = re.compile(r"(?::\s*|\s+)(?:bytearray\()?b?['\"].*$", re.DOTALL)  # aiohttp's repr of request bytes
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_adapter(service: ChatService, settings: Settings) -> "WebAdapter":
    return WebAdapter(service, settings)


class WebAdapter:
    """Serves the web chat and the APIs; `port` is the bound port once started."""

    name = "web"

    def __init__(self, service: ChatService, settings: Settings):
        cfg = settings.config.web
        api_key = settings.secrets.get("TTT_API_KEY")
        if not cfg.loopback_only and not api_key:
            raise ValueError(f"web.host is {cfg.host}: binding beyond this machine needs TTT_API_KEY set")
        self.service = service
        self.host = cfg.host
        self.port = cfg.port
        self.app = build_app(service, settings.config, api_key)
        self._shutdown_timeout = settings.config.generator.request_timeout_s
        self._idle_timeout = cfg.idle_timeout_s
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # aiohttp's keep-alive timer runs from the connection's start until a whole request has come,
        # and again between requests: a connection that sends nothing, or half a request, is closed;
        # after a refused request, the rest of its body is read (and dropped) for as long at most.
        runner = _Runner(self.app, shutdown_timeout=self._shutdown_timeout, keepalive_timeout=self._idle_timeout,
                         lingering_time=self._idle_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self.service.metrics.adapter_up.labels(self.name).set(1)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        log.info("web chat on http://%s:%d/ (OpenAI-compatible API under /v1)", shown, self.port)

    async def stop(self) -> None:
        """Stop listening, let replies in flight finish (up to the request timeout), then close."""
        self.service.metrics.adapter_up.labels(self.name).set(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (oversized headers, a broken request line) itself,
    before any middleware runs: this gives those answers the API's JSON error shape too."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: no error response can follow")
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = ApiError(status, "Something went wrong on the server; try again.", type="server_error")
        else:
            reason = _unreadable_reason(exc, message or HTTPStatus(status).phrase)
            log.info("refused an unreadable request from %s: %s", request.remote, reason)
            error = ApiError(status, f"The request could not be read: {reason}.")
        response = error.response()
        response.force_close()
        return response


def _unreadable_reason(exc: BaseException | None, message: str) -> str:
    """Why aiohttp could not parse a request, without the bytes it quotes: they may hold a
    credential (an oversized Authorization header) and must not be echoed or logged."""
    if isinstance(exc, LineTooLong):
        return f"a header or the request line is longer than {exc.args[1]} bytes"
    return _QUOTED_DATA.sub("", message).strip().rstrip(".") or "malformed request"


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same server; only the request handlers it makes differ
        return server


def build_app(service: ChatService, config: Config, api_key: str | None) -> web.Application:
    app = web.Application(
        middlewares=[_errors, _loopback_hosts(config.web.loopback_only), _same_origin, _require_key(api_key)],
        client_max_size=config.web.max_request_kb * 1024,
    )
    app[BODY_TIMEOUT_S] = config.web.idle_timeout_s
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/healthz", _health(service))
    app.router.add_get("/metrics", _metrics(service.metrics))
    ChatPageRoutes(service, config).add_to(app)
    OpenAIRoutes(service, config).add_to(app)
    if config.voice.enabled:  # imported only then: it needs the voice extra
        from bots.web.speech_api import SpeechRoutes

        SpeechRoutes(service, config).add_to(app)
    return app


def _is_api(path: str) -> bool:
    return path.startswith(PROTECTED)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """API errors as JSON in OpenAI's shape, whatever raised them; the server keeps serving."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400 or not _is_api(request.path):
            raise
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        message, code = f"{exc.reason}: {request.method} {request.path}", None
        if exc.status == 413:
            message, code = f"The request body is too large: {exc.text.rstrip('.')}.", "request_too_large"
        return ApiError(exc.status, message, type=kind, code=code).response()
    except ConnectionError:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return ApiError(500, "Something went wrong on the server; try again.", type="server_error").response()


def _host_name(host: str) -> str:
    """The name in a Host header, lower case, without its port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if ":" in host else host


def _loopback_hosts(loopback_only: bool):
    """Bound to loopback, answer only requests addressed to a loopback name: a foreign name means a
    page elsewhere resolved its own domain to 127.0.0.1 (DNS rebinding) to read this server."""

    @web.middleware
    async def loopback_hosts(request: web.Request, handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            raise ApiError(403, f"This server answers only requests addressed to localhost, not {host!r}.",
                           code="host_not_allowed")
        return await handler(request)

    return loopback_hosts


@web.middleware
async def _same_origin(request: web.Request, handler) -> web.StreamResponse:
    """Refuse state-changing requests that a page of another origin sent through the user's browser."""
    origin = request.headers.get("Origin")
    if request.method in STATE_CHANGING and origin is not None:
        authority = origin.partition("://")[2].lower()
        if not authority or authority != request.headers.get("Host", "").strip().lower():
            raise ApiError(403, f"Requests from other sites are refused (Origin {origin!r}).", code="cross_origin")
    return await handler(request)


def _require_key(api_key: str | None):
    expected = api_key.encode() if api_key else None

    @web.middleware
    async def require_key(request: web.Request, handler) -> web.StreamResponse:
        if expected is not None and (_is_api(request.path) or request.path == "/metrics"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token.strip().encode("utf-8", "replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                raise ApiError(401, "A valid API key is required: send 'Authorization: Bearer <TTT_API_KEY>'.",
                               code="invalid_api_key")
        return await handler(request)

    return require_key


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


def _metrics(metrics: Metrics):
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def adapter_states(metrics: Metrics) -> dict[str, bool]:
    """Each adapter that has reported, and whether it is up now."""
    states: dict[str, bool] = {}
    for family in metrics.adapter_up.collect():
        for sample in family.samples:
            states[sample.labels["adapter"]] = sample.value == 1
    return states


def _health(service: ChatService):
    """200 while the default persona can answer; 503 once its model failed to load (or cannot).
    The database's state is reported with the rest."""

    async def handle(request: web.Request) -> web.Response:
        personas = service.personas
        problem = None
        try:
            personas.check(personas.get(personas.default))
        except (PersonaUnavailable, UnknownPersona) as exc:
            problem = str(exc)
        adapters = adapter_states(service.metrics)
        # A lost database keeps the process alive (200): the store reconnects by itself, so a
        # restart would not help; it is reported, and the replica is not ready meanwhile.
        database = await service.database_health()
        healthy = problem is None and all(adapters.values()) and database["ok"]
        body = {
            "status": "ok" if healthy else "degraded",
            # Ready: the default model is loaded, every adapter is connected, the database answers.
            "ready": healthy and personas.is_loaded(personas.get(personas.default)),
            "default_persona": personas.default,
            "models": personas.loaded(),
            "adapters": adapters,
            "database": database,
        }
        if problem:
            body["problem"] = problem
        return web.json_response(body, status=503 if problem else 200)

    return handle
