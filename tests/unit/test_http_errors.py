"""The one gRPC-status -> HTTP mapping of the HTTP API (server/errors.py)."""

import asyncio

import grpc
import pytest

from clipserve.server.errors import INTERNAL_MESSAGE, PayloadTooLarge, ServingError, to_http


@pytest.mark.parametrize("code, status, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    (grpc.StatusCode.ALREADY_EXISTS, 409, "conflict_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
])
def test_serving_errors_map_to_http_with_openai_bodies(code, status, kind):
    got_status, body = to_http(ServingError(code, "what was wrong"))
    assert got_status == status
    assert body == {"error": {"message": "what was wrong", "type": kind,
                              "code": code.name.lower()}}


def test_too_large_is_413_and_timeouts_504():
    assert to_http(PayloadTooLarge("body is 9 bytes; at most 8"))[0] == 413
    assert to_http(asyncio.TimeoutError())[0] == 504


def test_unexpected_errors_are_500_with_the_generic_message():
    status, body = to_http(RuntimeError("secret internals"))
    assert status == 500 and body["error"]["message"] == INTERNAL_MESSAGE
    assert "secret" not in str(body)
