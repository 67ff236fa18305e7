"""The web adapter: a chat page, an OpenAI-compatible API, health and metrics, on one aiohttp server.

    /                      the chat page (static files under bots/static/, no build step)
    /api/...               the page's API (bots/web_chat.py)
    /v1/...                the OpenAI-compatible API (bots/openai_api.py; speech: bots/speech_api.py)
    /healthz               liveness and readiness (JSON)
    /metrics               Prometheus text format

When TTT_API_KEY is set (required to bind beyond loopback), /api, /v1 and /metrics need
`Authorization: Bearer <key>`. The page itself and /healthz stay open: the page holds no data
and asks for the key when the API answers 401.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bots.openai_api import ApiError, OpenAIRoutes
from bots.web_chat import ChatPageRoutes
from core.config import Config, Settings
from core.metrics import Metrics
from core.personas import PersonaUnavailable, UnknownPersona
from core.service import ChatService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROTECTED = ("/api/", "/v1/")
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
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        runner = web.AppRunner(self.app, shutdown_timeout=self._shutdown_timeout)
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


def build_app(service: ChatService, config: Config, api_key: str | None) -> web.Application:
    app = web.Application(middlewares=[_errors, _require_key(api_key)])
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/healthz", _health(service))
    app.router.add_get("/metrics", _metrics(service.metrics))
    ChatPageRoutes(service, config).add_to(app)
    OpenAIRoutes(service, config).add_to(app)
    if config.voice.enabled:  # imported only then: it needs the voice extra
        from bots.speech_api import SpeechRoutes

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
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 413:
            message = "The request body is too large."
        return ApiError(exc.status, message, type=kind).response()
    except ConnectionError:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return ApiError(500, "Something went wrong on the server; try again.", type="server_error").response()


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
    """200 while the default persona can answer; 503 once its model failed to load (or cannot)."""

    async def handle(request: web.Request) -> web.Response:
        personas = service.personas
        problem = None
        try:
            personas.check(personas.get(personas.default))
        except (PersonaUnavailable, UnknownPersona) as exc:
            problem = str(exc)
        adapters = adapter_states(service.metrics)
        body = {
            "status": "ok" if problem is None and all(adapters.values()) else "degraded",
            # Ready: the default model is loaded and every adapter is connected.
            "ready": problem is None and all(adapters.values()) and personas.is_loaded(personas.get(personas.default)),
            "default_persona": personas.default,
            "models": personas.loaded(),
            "adapters": adapters,
        }
        if problem:
            body["problem"] = problem
        return web.json_response(body, status=503 if problem else 200)

    return handle
