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
    """Triton directly, through ``tritonclient.grpc.aio``: what a client without the gateway
    would do, for image, text and classify calls.

    Images: with ``decode_per_call`` the client decodes and resizes every call's encoded
    images itself, through the gateway's own :class:`~clipserve.server.images.ImageDecoder`
    (small calls inline, others one thread-pool job, the same reduced-scale JPEG decode), so
    a comparison with the gateway charges both sides the same decode; without it each
    distinct image is decoded once and its pixels reused (a client that already holds
    pixels). Texts: tokenized per call with ``tokenizer`` and sent to ``text_model``.
    Classify: the image embeddings scored against the label set (``labels`` x ``prompts``,
    embedded once through ``text_model``, prompt-averaged) with a softmax at
    ``temperature``, as the gateway scores them.

    Args:
        url: Triton's gRPC ``host:port``.
        model: Triton model name of the image endpoint ("" for a text-only target).
        image_size: the model's input side.
        timeout_s: deadline of every call.
        decode_per_call: decode every call's images (see above).
        text_model, tokenizer: the text endpoint and its tokenizer (text and classify calls).
        labels, prompts, temperature: the classify label set and scoring (classify calls).
    """

    def __init__(self, url: str, model: str, image_size: int, timeout_s: float = 30.0, *,
                 decode_per_call: bool = False, text_model: str = "", tokenizer=None,
                 labels: tuple[str, ...] = (), prompts: tuple[str, ...] = ("{}",),
                 temperature: float = 1.0):
        import tritonclient.grpc.aio as triton_aio

        self._aio = triton_aio
        self.url = check_address(url)
        self.model = model
        self.image_size = image_size
        self.timeout_s = timeout_s
        self.decode_per_call = decode_per_call
        self.text_model, self._tokenizer = text_model, tokenizer
        self.labels, self.prompts, self.temperature = tuple(labels), tuple(prompts), temperature
        self._client = triton_aio.InferenceServerClient(url)
        self._pixels: dict[bytes, np.ndarray] = {}
        self._decoder = None
        self._label_emb: np.ndarray | None = None

    async def _batch(self, images: tuple[bytes, ...]) -> np.ndarray:
        from clipserve.server.images import preprocess

        if self.decode_per_call:
            if self._decoder is None:
                import os

                from clipserve.server.images import ImageDecoder

                workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                    else (os.cpu_count() or 1)
                self._decoder = ImageDecoder(workers, 8 * workers, 1 << 26, 1 << 28)
            return await self._decoder.decode(images, self.image_size)
        for data in images:
            if data not in self._pixels:
                self._pixels[data] = preprocess(data, self.image_size, max_bytes=1 << 26,
                                                max_pixels=1 << 28)
        return np.stack([self._pixels[d] for d in images])

    async def _infer(self, model: str, name: str, batch: np.ndarray, dtype: str) -> np.ndarray:
        infer_input = self._aio.InferInput(name, list(batch.shape), dtype)
        infer_input.set_data_from_numpy(batch)
        result = await self._client.infer(model, [infer_input],
                                          outputs=[self._aio.InferRequestedOutput("embedding")],
                                          client_timeout=self.timeout_s)
        return result.as_numpy("embedding")

    async def _embed_texts(self, texts) -> np.ndarray:
        from clipserve.endpoints import TEXT_INPUT

        if self._tokenizer is None or not self.text_model:
            raise ValueError("TritonTarget needs text_model and tokenizer for text calls")
        ids, _ = self._tokenizer.encode(list(texts))
        return await self._infer(self.text_model, TEXT_INPUT, ids.astype(np.int32), "INT32")

    async def _label_embeddings(self) -> np.ndarray:
        from clipserve.calibration import average_prompts

        if self._label_emb is None:  # once per target, as the gateway's label cache
            if not self.labels:
                raise ValueError("TritonTarget needs labels for classify calls")
            texts = [t.replace("{}", label) for label in self.labels for t in self.prompts]
            self._label_emb = average_prompts(await self._embed_texts(texts), len(self.labels))
        return self._label_emb

    async def result(self, call: Call) -> np.ndarray:
        """What the call computes: embeddings [n, D] (image, text) or label probabilities
        [n, labels] (classify). Raises InferenceServerException when Triton fails it."""
        from clipserve.endpoints import IMAGE_INPUT

        if call.kind == "text":
            return await self._embed_texts(call.texts)
        labels = await self._label_embeddings() if call.kind == "classify" else None
        embedding = await self._infer(self.model, IMAGE_INPUT, await self._batch(call.images),
                                      "UINT8")
        if labels is None:
            return embedding
        from clipserve.calibration import label_cosines, softmax

        return softmax(label_cosines(embedding, labels), self.temperature)

    async def send(self, call: Call) -> tuple[str, str]:
        from tritonclient.utils import InferenceServerException

        model = self.text_model if call.kind == "text" else self.model
        try:
            await self.result(call)
        except InferenceServerException as exc:
            return model, (exc.status() or "UNKNOWN").rsplit(".", 1)[-1]
        return model, OK

    async def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
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
