"""Triton errors map onto the statuses the gateway promises (no Triton needed)."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from clipserve.server.errors import INTERNAL_MESSAGE, ServingError, to_status
from clipserve.server.triton_client import _to_serving_error


def mapped(status: str, message: str = "boom") -> tuple[grpc.StatusCode, str]:
    exc = _to_serving_error(InferenceServerException(message, status=status), "m_fp32_image",
                            "triton:8001")
    return to_status(exc)


@pytest.mark.parametrize("status, message, code, fragment", [
    ("StatusCode.UNAVAILABLE", "failed to connect", grpc.StatusCode.UNAVAILABLE,
     "Triton at triton:8001 is unavailable"),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'm' is not ready",
     grpc.StatusCode.UNAVAILABLE, "endpoint m_fp32_image is not ready"),
    ("StatusCode.NOT_FOUND", "unknown model", grpc.StatusCode.UNAVAILABLE, "not loaded"),
    ("StatusCode.DEADLINE_EXCEEDED", "", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    ("StatusCode.RESOURCE_EXHAUSTED", "", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    ("StatusCode.CANCELLED", "", grpc.StatusCode.CANCELLED, "cancelled"),
])
def test_triton_statuses_map_to_ours(status, message, code, fragment):
    got_code, got_message = mapped(status, message)
    assert got_code is code
    assert fragment in got_message


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", None])
def test_other_triton_errors_are_internal_without_detail(status, caplog):
    code, message = mapped(status, "input 'pixels' shape mismatch")
    assert code is grpc.StatusCode.INTERNAL
    assert message == INTERNAL_MESSAGE
    assert "shape mismatch" in caplog.text  # the detail goes to the log


def test_to_status_keeps_serving_errors_and_maps_timeouts():
    assert to_status(ServingError.not_found("x")) == (grpc.StatusCode.NOT_FOUND, "x")
    assert to_status(TimeoutError())[0] is grpc.StatusCode.DEADLINE_EXCEEDED
