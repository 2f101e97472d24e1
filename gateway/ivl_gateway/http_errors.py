"""OpenAI-shaped error bodies for every error the HTTP API can answer: our ServingErrors, the framework's own
404/405 (unknown path, wrong method), 422 (a request it could not bind) and anything unexpected (500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ivl_proto.errors import ErrorCode, ServingError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivl_gateway.http_edge import request_id
from ivl_gateway.openai_response import error_body

log = logging.getLogger(__name__)

_BY_STATUS = {
    400: ErrorCode.INVALID_ARGUMENT, 401: ErrorCode.UNAUTHENTICATED, 404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED, 408: ErrorCode.REQUEST_TIMEOUT, 413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 422: ErrorCode.UNPROCESSABLE, 429: ErrorCode.RESOURCE_EXHAUSTED,
    503: ErrorCode.UNAVAILABLE, 504: ErrorCode.DEADLINE_EXCEEDED,
}


def error_response(error: ServingError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


def _http_error(request: Request, error: StarletteHTTPException) -> ServingError:
    code = _BY_STATUS.get(error.status_code, ErrorCode.INTERNAL if error.status_code >= 500 else ErrorCode.INVALID_ARGUMENT)
    if error.status_code == 404:
        message = f"there is no {request.url.path} on this server; the API is under /v1 (see /docs)"
    elif error.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    else:
        message = str(error.detail)
    return ServingError(code, message)


def install_error_handlers(app: FastAPI) -> None:
    async def serving_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServingError)
        return error_response(error)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        mapped = _http_error(request, error)
        return JSONResponse(error_body(mapped), status_code=error.status_code, headers=getattr(error, "headers", None))

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        mapped = ServingError(ErrorCode.UNPROCESSABLE, f"invalid request at '{where}': {first.get('msg', 'invalid')}",
                              param=where or None)
        return error_response(mapped)

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        rid = request_id(request.scope)
        log.exception("unexpected error in %s %s (request %s)", request.method, request.url.path, rid)
        return error_response(ServingError(ErrorCode.INTERNAL, f"internal error (request id {rid}); the gateway log "
                                                              "has the details"))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
