"""The HTTP API's admission, as two ASGI middlewares around the FastAPI app (no per-route code):

AccessLogMiddleware (outermost): a request id (the client's `X-Request-Id` when it is sane, else a new one;
echoed in the response), and one access-log line per request: method, path, status, bytes in/out,
duration, client, request id. A request whose client went away logs status 499.

EdgeMiddleware (inside CORS), in this order, each a clear error before any work of the next:
1. /metrics, /docs, /openapi.json: open, behind the API key, or 404 (`metrics_access`, `docs_access`).
2. POST/PUT/PATCH must be `Content-Type: application/json` (415): a cross-site `text/plain` form post
   (a CORS "simple request" that needs no preflight) never reaches a handler.
3. /v1/*: the per-client rate limit (429 + Retry-After), then the API key (401).
4. POST /v1/chat/completions: Content-Length over `max_request_bytes` (413), then the request-bytes budget
   (503 + Retry-After), then the body is read into ONE preallocated buffer (no list of chunks + join),
   handed to the route as `scope[BODY_KEY]`. A client that disconnects mid-upload is an INFO line.
   Read deadlines and the minimum body rate are enforced below, in http_guard (it sees the socket).
The budget is given back when the response ends.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.request_context import bound_request_id
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ivl_gateway.auth import ApiKeys
from ivl_gateway.edge_state import EdgeState
from ivl_gateway.http_guard import EDGE_STATUS_KEY
from ivl_gateway.openai_response import error_body
from ivl_gateway.rate_limit import RateLimited, client_identity
from ivl_gateway.request_budget import BudgetFull

access_log = logging.getLogger("ivl_gateway.access")
log = logging.getLogger(__name__)

BODY_KEY = "ivl.body"
REQUEST_ID_KEY = "ivl.request_id"
BODY_PATHS = frozenset({"/v1/chat/completions"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CHUNKED_STEP = 1 << 20  # a body without Content-Length takes budget in steps of 1 MiB
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def request_id(scope: Scope) -> str:
    return str(scope.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:24])


def take_body(scope: Scope) -> bytearray:
    """The request body the EdgeMiddleware read (removed from the scope, so that it can be freed early)."""
    body = scope.pop(BODY_KEY, None)
    if body is None:
        raise RuntimeError("no request body: the route must be listed in http_edge.BODY_PATHS")
    return body


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        offered = headers.get("x-request-id", "")
        rid = offered if _SANE_ID.fullmatch(offered) else uuid.uuid4().hex[:24]
        scope[REQUEST_ID_KEY] = rid
        state = {"status": 0, "sent": 0}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
            await send(message)

        with bound_request_id(rid):  # every log line of this request (this one too) and its downstream calls
            await self._logged(scope, receive, send_logged, headers, state, rid, start)

    async def _logged(self, scope: Scope, receive: Receive, send: Send, headers: Headers, state: dict[str, int],
                      rid: str, start: float) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if self.enabled:
                status = scope.get(EDGE_STATUS_KEY) or state["status"] or 499
                client = scope.get("client")
                access_log.info(
                    '%s %s %d in=%s out=%d %.1fms client=%s id=%s', scope["method"], scope["path"], status,
                    headers.get("content-length", "-"), state["sent"], (time.perf_counter() - start) * 1000,
                    client[0] if client else "-", rid,
                )


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, edges: EdgeState) -> None:
        self.app = app
        self.edges = edges
        self.settings = settings = edges.settings
        self.keys = edges.keys
        self.rate_limit = edges.rate_limit
        self.budget = edges.budget
        self.throttle = edges.throttle
        self._exposure = {
            "/metrics": settings.metrics_access,
            "/docs": settings.docs_access,
            "/docs/oauth2-redirect": settings.docs_access,
            "/openapi.json": settings.docs_access,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = [0]  # budget bytes this request holds (grows for a chunked body)
        try:
            try:
                receive = await self._admit(scope, receive, held)
            except ClientGone:
                return
            except ServingError as error:
                self.edges.refused("http", error)
                # The connection stays open: uvicorn discards the unread rest of a refused body (nothing is
                # buffered; http_guard still enforces the body rate), so the client reads this answer instead
                # of a reset. A client sending "Expect: 100-continue" never sends the body at all.
                await _send_error(scope, receive, send, error)
                return
            await self.app(scope, receive, send)
        finally:
            if held[0]:
                self.budget.give_back(held[0])

    async def _admit(self, scope: Scope, receive: Receive, held: list[int]) -> Receive:
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)
        exposure = self._exposure.get(path)
        if exposure == "off":
            raise ServingError(ErrorCode.NOT_FOUND, f"{path} is switched off on this gateway")
        if method in BODY_METHODS:
            _check_json(headers.get("content-type"))
        api = path.startswith("/v1/")
        if api or exposure == "api_key":
            key = ApiKeys.from_authorization(headers.get("authorization")) or headers.get("x-api-key")
            valid = self.keys.is_valid(key)
            if api and self.rate_limit.enabled:
                client = scope.get("client")
                self.rate_limit.check(client_identity(key, valid, client[0] if client else None))
            if exposure == "api_key" and not self.keys.enabled:
                raise ServingError(ErrorCode.UNAUTHENTICATED, f"{path} needs an API key and none is configured")
            if self.keys.enabled and not valid:
                self.keys.check(key)  # raises the clear 401 (missing vs wrong key)
        if method == "POST" and path in BODY_PATHS:
            scope[BODY_KEY] = await self._read_body(scope, receive, headers, held)
            return _after_body(receive)
        return receive

    async def _read_body(self, scope: Scope, receive: Receive, headers: Headers, held: list[int]) -> bytearray:
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise invalid(f"Content-Length {declared[:40]!r} is not a number of bytes")
            size = int(declared)
            if size > limit:
                raise _too_large(size, limit)
            if self.budget.counts(size):
                self.budget.take(size)
                held[0] = size
            buffer = bytearray(size)
        else:
            buffer = bytearray()
        view = memoryview(buffer) if declared is not None else None
        received = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self._client_gone(scope, received, declared)
                    raise ClientGone
                chunk = message.get("body", b"")
                end = received + len(chunk)
                if view is not None:
                    if end > len(buffer):
                        raise invalid(f"the request body is longer than its Content-Length ({declared})")
                    view[received:end] = chunk
                else:
                    if end > limit:
                        raise _too_large(end, limit)
                    if end > held[0] and self.budget.counts(end):
                        step = min(max(_CHUNKED_STEP, end - held[0]), limit - held[0])
                        self.budget.take(step)
                        held[0] += step
                    buffer += chunk
                received = end
                if not message.get("more_body", False):
                    break
        finally:
            if view is not None:
                view.release()
        if declared is not None and received != len(buffer):
            raise invalid(f"the request body ended after {received} of its {declared} bytes")
        return buffer

    def _client_gone(self, scope: Scope, received: int, declared: str | None) -> None:
        if scope.get(EDGE_STATUS_KEY):  # http_guard closed it (too slow) and logged why
            return
        client = scope.get("client")
        self.throttle.info(
            log, "upload-disconnect", "client %s went away during its upload (%d of %s bytes received)",
            client[0] if client else "-", received, declared or "?",
        )


def _after_body(receive: Receive) -> Receive:
    """The receive the app sees once the body is read: one empty body message, then the real receive (which
    reports the client's disconnect)."""
    delivered = False

    async def receive_rest() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return receive_rest


def _check_json(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ServingError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"this API accepts only 'Content-Type: application/json' request bodies, not "
            f"{content_type[:60]!r}" if content_type else
            "this API accepts only 'Content-Type: application/json' request bodies; the request has no "
            "Content-Type",
        )


def _too_large(size: int, limit: int) -> ServingError:
    return ServingError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"the request body is at least {size / 2**20:.1f} MiB; the limit is {limit / 2**20:.1f} MiB "
        "(max_request_bytes)",
    )


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ServingError) -> None:
    headers: dict[str, str] = {}
    if isinstance(error, RateLimited | BudgetFull):
        headers["retry-after"] = str(error.retry_after_s)
    response = JSONResponse(error_body(error), status_code=error.http_status, headers=headers)
    await response(scope, receive, send)


def install_edges(app: FastAPI, edges: EdgeState) -> None:
    """Add the middlewares (outermost last): EdgeMiddleware, CORS when an allow-list is set, access log."""
    settings = edges.settings
    app.add_middleware(EdgeMiddleware, edges=edges)  # type: ignore[arg-type]
    if settings.cors_allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,  # type: ignore[arg-type]
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
        )
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)  # type: ignore[arg-type]
