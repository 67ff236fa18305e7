"""HTTP errors of the web adapter, in OpenAI's JSON shape: {"error": {message, type, param, code}}.

Every 4xx/5xx the web adapter answers (the page's API, /v1, and what aiohttp refuses before any
handler runs) uses this shape; `chat_error` maps the ChatService's refusals onto it.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from core.errors import Busy, ChatError, InputRejected, MemoryUnavailable, OverBudget, PersonaError, TooLong

RETRY_AFTER_S = 1
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)  # how long a request body may take to arrive


class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, outcome: str = "rejected"):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.outcome = outcome

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        response = web.json_response(self.body(), status=self.status, headers=headers)
        if self.status == 408:  # the rest of a body that stalled must not be read as the next request
            response.force_close()
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unknown_model(name: str, known: list[str], param: str = "model") -> ApiError:
    return ApiError(404, f"There is no persona called {name!r}. Try one of: {', '.join(known)}.",
                    param=param, code="model_not_found")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="model_unavailable", outcome="persona")


async def read_json(request: web.Request) -> object:
    """The request body as JSON, or a 4xx that says what is wrong with it.

    Only `application/json` is read: a page on another site can send text/plain or a form across
    origins without asking, but not JSON.
    """
    if request.content_type != "application/json":
        raise ApiError(415, f"Send the body as JSON with 'Content-Type: application/json' "
                            f"(got {request.content_type!r}).", code="unsupported_media_type")
    wait_s = request.app[BODY_TIMEOUT_S]
    try:
        async with asyncio.timeout(wait_s):  # a body that trickles in must not hold the connection
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {wait_s:g} s.", code="request_timeout") from None
    if not raw.strip():
        raise bad_request("The request body is empty: send a JSON object.", code="invalid_json")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None


def chat_error(exc: ChatError, param: str | None = None) -> ApiError:
    """The HTTP answer to a ChatService refusal (it has counted and logged it already)."""
    if isinstance(exc, TooLong):
        return ApiError(400, exc.user_message, param=param, code="context_length_exceeded", outcome=exc.outcome)
    if isinstance(exc, InputRejected):
        return ApiError(400, exc.user_message, param=param, code="invalid_message", outcome=exc.outcome)
    if isinstance(exc, Busy):
        return ApiError(503, exc.user_message, type="server_error", code="busy", outcome=exc.outcome)
    if isinstance(exc, PersonaError):
        return unavailable(exc.user_message)
    if isinstance(exc, OverBudget):
        return ApiError(429, exc.user_message, type="rate_limit_error", code="budget_spent", outcome=exc.outcome)
    if isinstance(exc, MemoryUnavailable):
        return ApiError(503, exc.user_message, type="server_error", code="store_unavailable", outcome=exc.outcome)
    return ApiError(500, exc.user_message, type="server_error", code="reply_failed", outcome=exc.outcome)
