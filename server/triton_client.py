"""The :class:`~clipserve.server.backend.Backend` on a Triton server, via ``tritonclient.grpc.aio``.

The only module that imports tritonclient. Every call carries a client timeout (the
caller's remaining deadline), so a stalled Triton costs a call its deadline, never a hang. The
channel reconnects with a short capped backoff: while Triton is down, calls fail fast with
UNAVAILABLE, and when it returns the channel finds it within a couple of seconds without a
restart of the gateway.
"""

from __future__ import annotations


import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from clipserve.endpoints import EMBEDDING_OUTPUT

from .errors import ServingError


_MAX_MESSAGE_BYTES = 2**31 - 1  # as tritonclient's own default: batches are large
# grpc's defaults back off up to 120 s between reconnects, so a gateway would stay UNAVAILABLE
# for up to two minutes after Triton came back. Cap at 2 s.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A host name with several addresses (Kubernetes: a headless Service over the Triton pods)
    # gets calls spread over all of them, not pinned to the first one's connection.
    ("grpc.lb_policy_name", "round_robin"),
]


def _status(exc: InferenceServerException) -> grpc.StatusCode | None:
    name = (exc.status() or "").rsplit(".", 1)[-1]  # "StatusCode.UNAVAILABLE"
    return grpc.StatusCode.__members__.get(name)


def _to_serving_error(exc: InferenceServerException, model: str, url: str) -> Exception:
    code = _status(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        if "not ready" in (exc.message() or "") or "unknown model" in (exc.message() or ""):
            return ServingError.unavailable(f"endpoint {model} is not ready in Triton")
        return ServingError.unavailable(f"Triton at {url} is unavailable")
    if code is grpc.StatusCode.NOT_FOUND:
        # Present in the repository but not loaded (yet) by this Triton.
        return ServingError.unavailable(f"endpoint {model} is not loaded in Triton")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServingError.deadline_exceeded(f"deadline exceeded waiting for {model}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServingError.resource_exhausted(f"endpoint {model} is overloaded; retry later")
    if code is grpc.StatusCode.CANCELLED:
        return ServingError(grpc.StatusCode.CANCELLED, "cancelled")
    # Anything else (a shape/dtype Triton rejects, a backend crash) is our bug, not the
    # client's: not a ServingError, so errors.to_status logs it and answers INTERNAL.
    return RuntimeError(f"Triton call to {model} failed: {exc.status()} {exc.message()}")


class TritonBackend:
    """Talks gRPC to one Triton server.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
    """

    def __init__(self, url: str):
        self.url = url
        self._client = triton_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def embed(self, model: str, input_name: str, batch: np.ndarray,
                    timeout_s: float) -> np.ndarray:
        """See :meth:`Backend.embed`."""
        infer_input = triton_aio.InferInput(input_name, list(batch.shape),
                                            np_to_triton_dtype(batch.dtype))
        infer_input.set_data_from_numpy(batch)
        output = triton_aio.InferRequestedOutput(EMBEDDING_OUTPUT)
        try:
            result = await self._client.infer(model, [infer_input], outputs=[output],
                                              client_timeout=max(timeout_s, 1e-3))
        except InferenceServerException as exc:
            raise _to_serving_error(exc, model, self.url) from None
        embedding = result.as_numpy(EMBEDDING_OUTPUT)
        if embedding is None or embedding.shape[0] != batch.shape[0]:
            raise RuntimeError(f"Triton model {model} returned "
                               f"{None if embedding is None else embedding.shape} for a batch "
                               f"of {batch.shape[0]}")
        return embedding

    async def server_ready(self, timeout_s: float) -> bool:
        """See :meth:`Backend.server_ready`."""
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def ready_models(self, timeout_s: float) -> frozenset[str]:
        """See :meth:`Backend.ready_models`."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException:
            return frozenset()
        return frozenset(m.name for m in index.models if m.state == "READY")

    async def close(self) -> None:
        await self._client.close()
