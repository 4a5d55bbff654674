"""Where calls go: the clipserve gateway, a Triton server directly, or an HTTP peer.

A target turns a :class:`~clipserve.loadtest.workload.Call` into one request and reports which
endpoint served it and with what status; it never raises for a failed call. Every call carries
a timeout, so a stalled server costs a call its timeout, never a hang. Targets only ever
connect to the address they are given.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Protocol

import grpc
import numpy as np

from .stats import OK
from .workload import Call

ENDPOINT_HEADER = "x-clip-endpoint"


class Target(Protocol):
    """Anything the runner can drive."""

    async def send(self, call: Call) -> tuple[str, str]:
        """Send one call; returns (endpoint that served it or "", status code name)."""

    async def close(self) -> None:
        """Release connections."""


def check_address(address: str) -> str:
    """Validate ``host:port`` (no scheme); returns it unchanged.

    Raises:
        ValueError: not host:port with a numeric port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or "://" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target must be HOST:PORT (no scheme), got {address!r}")
    return address


class GatewayTarget:
    """The clipserve gateway over gRPC (``clipserve.v1``).

    Args:
        address: ``host:port`` of the gateway.
        timeout_s: deadline of every call.
        api_key: sent as ``authorization: Bearer KEY`` on every call when not empty.
        tls: connect with TLS (server certificate checked against ``ca_file``, or the system's
            roots without one).
        ca_file: PEM file of the CA that signed the server's certificate.

    Raises:
        ValueError: a bad address or an unreadable ``ca_file``.
    """

    def __init__(self, address: str, timeout_s: float = 30.0, api_key: str = "",
                 tls: bool = False, ca_file: str = ""):
        from clipserve.server.v1 import clipserve_pb2 as pb
        from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

        self._pb = pb
        self.address = check_address(address)
        self.timeout_s = timeout_s
        self._auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls or ca_file:
            try:
                roots = open(ca_file, "rb").read() if ca_file else None
            except OSError as exc:
                raise ValueError(f"cannot read CA file {ca_file}: {exc}") from None
            self._channel = grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        embed = pb_grpc.EmbeddingServiceStub(self._channel)
        classify = pb_grpc.ClassificationServiceStub(self._channel)
        self._methods = {"image": embed.EmbedImages, "text": embed.EmbedTexts,
                         "classify": classify.Classify}

    def _request(self, call: Call):
        pb = self._pb
        if call.kind == "text":
            return pb.EmbedTextsRequest(texts=call.texts)
        if call.kind == "classify":
            return pb.ClassifyRequest(images=call.images)
        return pb.EmbedImagesRequest(images=call.images)

    async def send(self, call: Call) -> tuple[str, str]:
        rpc = self._methods[call.kind](self._request(call), metadata=call.metadata + self._auth,
                                       timeout=self.timeout_s)
        try:
            response = await rpc
        except grpc.RpcError as exc:
            return await _endpoint_of(rpc), exc.code().name
        except asyncio.CancelledError:
            rpc.cancel()
            raise
        endpoint = await _endpoint_of(rpc)
        return endpoint or response.endpoint.name, OK

    async def close(self) -> None:
        await self._channel.close()


async def _endpoint_of(rpc) -> str:
    try:
        metadata = await rpc.initial_metadata()
    except Exception:  # a call that failed before any metadata: no endpoint
        return ""
    for key, value in metadata or ():
        if key == ENDPOINT_HEADER:
            return value
    return ""


class HttpGatewayTarget:
    """The clipserve gateway's OpenAI-compatible HTTP API (``--http-port``): the same calls as
    :class:`GatewayTarget`, as ``POST /v1/embeddings`` (images as data URIs) and
    ``/v1/classify``, with the call's routing metadata as headers. Needs ``aiohttp`` (the
    ``loadtest`` extra). Statuses are reported as the gRPC code names the error bodies carry,
    so the two front ends' tables compare.

    Args: as :class:`GatewayTarget`.
    """

    def __init__(self, address: str, timeout_s: float = 30.0, api_key: str = "",
                 tls: bool = False, ca_file: str = ""):
        self.address = check_address(address)
        self.timeout_s = timeout_s
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._scheme = "https" if tls or ca_file else "http"
        self._ca_file = ca_file
        self._session = None
        self._uris: dict[bytes, str] = {}

    def _uri(self, data: bytes) -> str:
        if data not in self._uris:
            self._uris[data] = "data:image/png;base64," + base64.b64encode(data).decode()
        return self._uris[data]

    async def send(self, call: Call) -> tuple[str, str]:
        import aiohttp

        if self._session is None:
            ssl_context = None
            if self._scheme == "https":
                import ssl

                ssl_context = ssl.create_default_context(cafile=self._ca_file or None)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context))
        if call.kind == "classify":
            path, body = "/v1/classify", {"input": [self._uri(d) for d in call.images]}
        else:
            path = "/v1/embeddings"
            body = {"input": list(call.texts) if call.kind == "text"
                    else [self._uri(d) for d in call.images], "encoding_format": "base64"}
        headers = {**self._headers, **dict(call.metadata),
                   "x-clip-timeout": str(self.timeout_s)}
        try:
            async with self._session.post(f"{self._scheme}://{self.address}{path}", json=body,
                                          headers=headers) as response:
                payload = await response.read()
                endpoint = response.headers.get(ENDPOINT_HEADER, "")
                if response.status != 200:
                    try:
                        return endpoint, json.loads(payload)["error"]["code"].upper()
                    except (ValueError, KeyError, TypeError):
                        return endpoint, f"HTTP_{response.status}"
        except asyncio.TimeoutError:
            return "", "DEADLINE_EXCEEDED"
        except aiohttp.ClientError:
            return "", "UNAVAILABLE"
        return endpoint, OK

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TritonTarget:
    """One Triton model directly, through ``tritonclient.grpc.aio``: what a client without the
    gateway would do. Images are decoded and resized once, up front, as such a client would
    send ready pixels (uint8 NHWC); text calls are not supported.

    Args:
        url: Triton's gRPC ``host:port``.
        model: Triton model name (an image endpoint).
        image_size: the model's input side.
        timeout_s: deadline of every call.
    """

    def __init__(self, url: str, model: str, image_size: int, timeout_s: float = 30.0):
        import tritonclient.grpc.aio as triton_aio

        self._aio = triton_aio
        self.url = check_address(url)
        self.model = model
        self.image_size = image_size
        self.timeout_s = timeout_s
        self._client = triton_aio.InferenceServerClient(url)
        self._pixels: dict[bytes, np.ndarray] = {}

    def _batch(self, images: tuple[bytes, ...]) -> np.ndarray:
        from clipserve.server.images import preprocess

        for data in images:
            if data not in self._pixels:
                self._pixels[data] = preprocess(data, self.image_size, max_bytes=1 << 26,
                                                max_pixels=1 << 28)
        return np.stack([self._pixels[d] for d in images])

    async def send(self, call: Call) -> tuple[str, str]:
        from tritonclient.utils import InferenceServerException

        if call.kind != "image":
            raise ValueError("TritonTarget sends image calls only")
        batch = self._batch(call.images)
        infer_input = self._aio.InferInput("pixels", list(batch.shape), "UINT8")
        infer_input.set_data_from_numpy(batch)
        try:
            await self._client.infer(self.model, [infer_input],
                                     outputs=[self._aio.InferRequestedOutput("embedding")],
                                     client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            return self.model, (exc.status() or "UNKNOWN").rsplit(".", 1)[-1]
        return self.model, OK

    async def close(self) -> None:
        await self._client.close()


class InfinityTarget:
    """An infinity-emb server's OpenAI-style ``POST /embeddings`` with ``modality: image``
    (images as base64 data URIs) or text. Needs ``aiohttp`` (the ``loadtest`` extra).

    Args:
        address: ``host:port`` of the server.
        model: the served model id.
        timeout_s: deadline of every call.
        endpoint: the name reported for calls it serves.
    """

    def __init__(self, address: str, model: str, timeout_s: float = 30.0,
                 endpoint: str | None = None):
        self.address = check_address(address)
        self.model = model
        self.timeout_s = timeout_s
        self.endpoint = endpoint or f"infinity:{model}"
        self._session = None
        self._uris: dict[bytes, str] = {}

    def _uri(self, data: bytes) -> str:
        if data not in self._uris:
            self._uris[data] = "data:image/png;base64," + base64.b64encode(data).decode()
        return self._uris[data]

    async def send(self, call: Call) -> tuple[str, str]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0))
        if call.kind == "text":
            body = {"model": self.model, "input": list(call.texts)}
        elif call.kind == "image":
            body = {"model": self.model, "input": [self._uri(d) for d in call.images],
                    "modality": "image"}
        else:
            raise ValueError("InfinityTarget sends image and text calls only")
        try:
            async with self._session.post(f"http://{self.address}/embeddings",
                                          json=body) as response:
                await response.read()
                if response.status != 200:
                    return "", f"HTTP_{response.status}"
        except asyncio.TimeoutError:
            return "", "DEADLINE_EXCEEDED"
        except aiohttp.ClientError:
            return "", "UNAVAILABLE"
        return self.endpoint, OK

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
