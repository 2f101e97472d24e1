"""One error table for the whole stack: ErrorCode -> gRPC status and HTTP status.

Services raise ServingError(code, message); the gRPC layer aborts with the mapped status and the
HTTP layer answers with the mapped status code. Messages are written for a person to act on,
e.g. "image is 30000x30000 = 900.0 MP; the limit is 80.0 MP".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    # The gateway's public edges (HTTP/gRPC admission).
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a POST that is not application/json
    REQUEST_TIMEOUT = "request_timeout"  # the client sent its request too slowly
    OVERLOADED = "overloaded"  # the gateway holds as many request bytes as it may; retry shortly
    METHOD_NOT_ALLOWED = "method_not_allowed"  # an HTTP method a path does not take
    UNPROCESSABLE = "unprocessable_entity"  # a request the HTTP framework could not bind to its route


@dataclass(frozen=True)
class ErrorMapping:
    grpc_status: grpc.StatusCode
    http_status: int
    openai_type: str


ERROR_TABLE: dict[ErrorCode, ErrorMapping] = {
    ErrorCode.INVALID_ARGUMENT: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: ErrorMapping(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    ErrorCode.NOT_FOUND: ErrorMapping(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    ErrorCode.RESOURCE_EXHAUSTED: ErrorMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    ErrorCode.FAILED_PRECONDITION: ErrorMapping(grpc.StatusCode.FAILED_PRECONDITION, 409, "invalid_request_error"),
    ErrorCode.UNAVAILABLE: ErrorMapping(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ErrorCode.DEADLINE_EXCEEDED: ErrorMapping(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    ErrorCode.CANCELLED: ErrorMapping(grpc.StatusCode.CANCELLED, 499, "cancelled"),
    ErrorCode.INTERNAL: ErrorMapping(grpc.StatusCode.INTERNAL, 500, "server_error"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, 415, "invalid_request_error"),
    ErrorCode.REQUEST_TIMEOUT: ErrorMapping(grpc.StatusCode.DEADLINE_EXCEEDED, 408, "timeout"),
    ErrorCode.OVERLOADED: ErrorMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "service_unavailable"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorMapping(grpc.StatusCode.UNIMPLEMENTED, 405, "invalid_request_error"),
    ErrorCode.UNPROCESSABLE: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, 422, "invalid_request_error"),
}

_BY_GRPC_STATUS: dict[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED: ErrorCode.CANCELLED,
}


# Trailing-metadata key carrying the ErrorCode next to the gRPC status (map_errors sets it): codes that
# share a gRPC status (INVALID_ARGUMENT vs PAYLOAD_TOO_LARGE) keep their difference across a hop.
ERROR_CODE_METADATA_KEY = "ivl-error-code"


class ServingError(Exception):
    """An error with a code from the table and a message a person can act on."""

    def __init__(self, code: ErrorCode, message: str, *, param: str | None = None, api_code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault (OpenAI's error.param), when one is
        self.api_code = api_code  # OpenAI's error.code where it has its own (e.g. model_not_found); else code.value

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return ERROR_TABLE[self.code].grpc_status

    @property
    def http_status(self) -> int:
        return ERROR_TABLE[self.code].http_status

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid(message: str, param: str | None = None) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def from_grpc_error(error: grpc.RpcError, service: str) -> ServingError:
    """Turn a downstream call's failure into a ServingError that names the service."""
    status = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    code = _refined_code(error, status) or _BY_GRPC_STATUS.get(status, ErrorCode.INTERNAL)
    if code is ErrorCode.UNAVAILABLE:
        return ServingError(code, f"the {service} service is unavailable: {details}")
    if code is ErrorCode.DEADLINE_EXCEEDED:
        return ServingError(code, f"the {service} service did not answer in time: {details}")
    if code is ErrorCode.INTERNAL:
        return ServingError(code, f"the {service} service failed ({status.name}): {details}")
    return ServingError(code, details or status.name)


def _refined_code(error: grpc.RpcError, status: grpc.StatusCode) -> ErrorCode | None:
    """The ErrorCode the server put in trailing metadata, if it agrees with the gRPC status."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # a call without metadata: fall back to the status
        return None
    for key, value in metadata or ():
        if key == ERROR_CODE_METADATA_KEY:
            try:
                code = ErrorCode(value)
            except ValueError:
                return None
            return code if ERROR_TABLE[code].grpc_status == status else None
    return None
