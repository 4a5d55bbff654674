"""The gateway's one error type and the one place that turns exceptions into gRPC statuses.

Code anywhere in the server raises :class:`ServingError` with the status the client should see
and a message that says what was wrong (and which item). :func:`to_status` is the only mapping;
anything it does not recognise becomes INTERNAL with a generic message, and the trace goes to
the log, never to the client.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; see the server log"


class ServingError(Exception):
    """A failure with the gRPC status code the client should get.

    Args:
        code: the status code.
        message: safe to show the client: says what was wrong and, for batch items, which.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"

    @classmethod
    def invalid_argument(cls, message: str) -> "ServingError":
        """Bad input from the client: empty/oversized batch, corrupt image, unknown header."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> "ServingError":
        """A valid scale/precision/tower that this repository does not hold."""
        return cls(grpc.StatusCode.NOT_FOUND, message)

    @classmethod
    def unavailable(cls, message: str) -> "ServingError":
        """Triton or the endpoint is not ready; the client may retry."""
        return cls(grpc.StatusCode.UNAVAILABLE, message)

    @classmethod
    def deadline_exceeded(cls, message: str = "deadline exceeded") -> "ServingError":
        return cls(grpc.StatusCode.DEADLINE_EXCEEDED, message)

    @classmethod
    def resource_exhausted(cls, message: str) -> "ServingError":
        """Overloaded: Triton's queue is full."""
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @classmethod
    def failed_precondition(cls, message: str) -> "ServingError":
        """The repository lacks something the call needs (e.g. a fitted temperature)."""
        return cls(grpc.StatusCode.FAILED_PRECONDITION, message)


class PayloadTooLarge(ServingError):
    """A request body over the size limit: RESOURCE_EXHAUSTED over gRPC (as gRPC's own
    message-size check), 413 over HTTP."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


# gRPC status -> (HTTP status, OpenAI-style error type). The HTTP API's only mapping.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def to_http(exc: BaseException) -> tuple[int, dict]:
    """Map an exception to (HTTP status, OpenAI-style body ``{"error": {"message", "type",
    "code"}}``); ``code`` is the gRPC status name in lower case (``invalid_argument``). Goes
    through :func:`to_status`, so INTERNAL (500) keeps its generic message."""
    code, message = to_status(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    if isinstance(exc, PayloadTooLarge):
        status, kind = 413, "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "code": code.name.lower()}}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to the (code, message) the client sees.

    ServingError keeps its own; timeouts are DEADLINE_EXCEEDED; everything else is INTERNAL with
    a generic message, and its traceback is logged here.
    """
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.error("unexpected error while serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
