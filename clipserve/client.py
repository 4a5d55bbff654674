"""A Python client for the clipserve gateway (gRPC): numpy arrays out, no proto in sight.

    from clipserve.client import Client
    with Client("127.0.0.1:50051") as client:
        images = client.embed_images(["photo.jpg"], precision="int8")
        texts = client.embed_texts(["a cat", "a dog"], precision="int8")
        print(images.endpoint, images.vectors @ texts.vectors.T)

:class:`Client` is synchronous, :class:`AsyncClient` the same on ``grpc.aio``. Each call takes
``precision=``, ``scale=`` and ``routing_key=`` (the ``x-clip-*`` headers) and ``timeout_s=``
(the deadline); calls that fail with UNAVAILABLE (Triton not ready, the gateway restarting) are
retried with exponential backoff and jitter within that deadline, and no other status is
retried: INVALID_ARGUMENT will not get better by asking again.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np

from clipserve.formats import OutputFormat, decode

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass
class Embeddings:
    """Embeddings of one call: ``vectors`` float32 [n, dim] (decoded from the requested output
    format), the endpoint that served them and, for images, the request id (for
    :meth:`Client.report_outcome`). ``np.asarray(result)`` gives ``vectors``."""

    vectors: np.ndarray
    endpoint: str
    request_id: str = ""
    truncated: list[bool] = field(default_factory=list)  # texts cut to the context length
    packed: list[bytes] = field(default_factory=list)  # as sent, for formats other than float32

    def __array__(self, dtype=None, copy=None):
        return self.vectors if dtype is None else self.vectors.astype(dtype)

    def __len__(self) -> int:
        return len(self.vectors)


@dataclass
class Classification:
    """A Classify call: ``probabilities`` [n_images, n_labels] in ``labels`` order, the top
    label, OOD score and flag per image, and the request id for feedback."""

    labels: list[str]
    probabilities: np.ndarray
    top_labels: list[str]
    ood_scores: np.ndarray
    out_of_distribution: np.ndarray
    ood_threshold: float
    endpoint: str
    request_id: str


def image_bytes(image: Any) -> bytes:
    """An image as encoded bytes: bytes pass through, a str/Path is read, a PIL image or an
    HxWx3 uint8 array is encoded as PNG.

    Raises:
        TypeError: anything else.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send a {type(image).__name__} as an image: pass bytes, a path, a "
                    "PIL image or an HxWx3 uint8 array")


def backoff_delays(attempts: int, first_s: float, rng: random.Random) -> Iterable[float]:
    """Full-jitter exponential backoff: before retry i, a uniform wait in [0, first * 2**i]."""
    for i in range(attempts):
        yield rng.uniform(0, first_s * 2 ** i)


def call_with_retries(call: Callable[[float], Any], *, timeout_s: float, retries: int,
                      backoff_s: float, rng: random.Random | None = None,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic):
    """Run ``call(remaining_timeout_s)``; on UNAVAILABLE wait and try again, at most
    ``retries`` more times and never past ``timeout_s`` overall. Other errors raise at once.

    Raises:
        grpc.RpcError: the last failure.
    """
    deadline = clock() + timeout_s
    delays = backoff_delays(retries, backoff_s, rng or random.Random())
    while True:
        try:
            return call(max(deadline - clock(), 0.001))
        except grpc.RpcError as exc:
            delay = next(delays, None)
            if exc.code() not in RETRYABLE or delay is None or clock() + delay >= deadline:
                raise
            sleep(delay)


async def call_with_retries_async(call, *, timeout_s: float, retries: int, backoff_s: float,
                                  rng: random.Random | None = None):
    """:func:`call_with_retries` for a coroutine function ``call(remaining_timeout_s)``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delays = backoff_delays(retries, backoff_s, rng or random.Random())
    while True:
        try:
            return await call(max(deadline - loop.time(), 0.001))
        except grpc.RpcError as exc:
            delay = next(delays, None)
            if exc.code() not in RETRYABLE or delay is None or loop.time() + delay >= deadline:
                raise
            await asyncio.sleep(delay)


def _metadata(api_key, precision, scale, routing_key) -> tuple:
    md = []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    for name, value in (("x-clip-precision", precision), ("x-clip-scale", scale),
                        ("x-clip-routing-key", routing_key)):
        if value:
            md.append((name, str(value)))
    return tuple(md)


def _credentials(tls, root_certificates, client_certificate, client_key):
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates,
                                        private_key=client_key,
                                        certificate_chain=client_certificate)


class _Base:
    """What Client and AsyncClient share: requests in, numpy out."""

    def __init__(self, target: str, api_key: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None,
                 client_certificate: bytes | None = None, client_key: bytes | None = None,
                 timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.1,
                 pack_float32: bool = True):
        from clipserve.server.v1 import clipserve_pb2 as pb

        self._pb = pb
        self.target = target
        self._api_key = api_key
        self._credentials = _credentials(tls, root_certificates, client_certificate, client_key)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._rng = random.Random()
        self._ranges: dict[str, dict] = {}  # endpoint name -> output_formats (int8 ranges)
        self.pack_float32 = pack_float32

    def _md(self, precision, scale, routing_key):
        return _metadata(self._api_key, precision, scale, routing_key)

    def _embed_request(self, kind: str, items, output_format):
        fmt = OutputFormat.parse(output_format)
        value = self._pb.EmbeddingFormat.Value(f"EMBEDDING_FORMAT_{fmt.name}")
        if kind == "image":
            return fmt, self._pb.EmbedImagesRequest(images=[image_bytes(i) for i in items],
                                                    format=value, pack_float32=self.pack_float32)
        if isinstance(items, str):
            raise TypeError("embed_texts takes a list of strings, not one string")
        return fmt, self._pb.EmbedTextsRequest(texts=list(items), format=value,
                                               pack_float32=self.pack_float32)

    def _embeddings(self, response, fmt: OutputFormat, ranges: dict | None) -> Embeddings:
        dim = response.endpoint.embed_dim
        rows = list(response.embeddings)
        if fmt is OutputFormat.FLOAT32 and response.embeddings_f32:
            # pack_float32 (a server without it ignores the request field and fills values)
            # (copied: frombuffer over bytes is read-only, and callers may normalise in place)
            vectors = np.frombuffer(response.embeddings_f32, "<f4").reshape(-1, dim).copy()
            packed = []
        elif fmt is OutputFormat.FLOAT32:
            vectors = np.array([list(e.values) for e in rows], np.float32).reshape(-1, dim)
            packed = []
        else:
            packed = [e.packed for e in rows]
            vectors = decode(packed, fmt, dim, ranges)
        return Embeddings(vectors=vectors, endpoint=response.endpoint.name,
                          request_id=getattr(response, "request_id", ""),
                          truncated=[bool(getattr(e, "truncated", False)) for e in rows],
                          packed=packed)

    def _classification(self, response) -> Classification:
        results = list(response.results)
        return Classification(
            labels=list(response.labels),
            probabilities=np.array([list(r.probabilities) for r in results], np.float32),
            top_labels=[r.top_label for r in results],
            ood_scores=np.array([r.ood_score for r in results], np.float32),
            out_of_distribution=np.array([r.out_of_distribution for r in results], bool),
            ood_threshold=response.ood_threshold, endpoint=response.endpoint.name,
            request_id=response.request_id)

    def _classify_request(self, images, labels, prompt_templates):
        return self._pb.ClassifyRequest(images=[image_bytes(i) for i in images],
                                        labels=list(labels or []),
                                        prompt_templates=list(prompt_templates or []))

    def _outcome_request(self, request_id: str, outcomes):
        items = outcomes.items() if isinstance(outcomes, Mapping) else outcomes
        return self._pb.ReportOutcomeRequest(request_id=request_id, outcomes=[
            self._pb.Outcome(index=int(i), true_label=str(label)) for i, label in items])

    @staticmethod
    def _models(response) -> list[dict]:
        from clipserve.server.v1 import clipserve_pb2 as pb

        out = []
        for info in response.endpoints:
            e = info.endpoint
            out.append({
                "name": e.name, "scale": e.scale,
                "precision": pb.Precision.Name(e.precision)[len("PRECISION_"):].lower(),
                "tower": pb.Tower.Name(e.tower)[len("TOWER_"):].lower(),
                "embed_dim": e.embed_dim, "ready": info.ready,
                "routing_weight": info.routing_weight, "description": info.description,
                "int8_ranges": ({"lo": list(info.int8_ranges.lo), "hi": list(info.int8_ranges.hi)}
                                if info.HasField("int8_ranges") else None)})
        return out

    def _remember_ranges(self, models: list[dict]) -> None:
        for m in models:
            if m["int8_ranges"]:
                self._ranges[m["name"]] = {"int8": m["int8_ranges"]}


class Client(_Base):
    """Synchronous client.

    Args:
        target: ``host:port`` of the gateway's gRPC port.
        api_key: sent as ``authorization: Bearer <key>``.
        tls: use TLS (system roots unless ``root_certificates``).
        root_certificates: PEM CA bundle to trust (implies TLS).
        client_certificate, client_key: PEM pair for mutual TLS.
        timeout_s: default deadline per call, retries included.
        retries: UNAVAILABLE retries per call.
        backoff_s: first backoff (doubles each retry, full jitter).
        pack_float32: ask for float32 embeddings as one packed bytes field (decoded with
            numpy.frombuffer, no Python float per dimension on either side); False: the
            per-row ``repeated float values``. Same vectors either way.
    """

    def __init__(self, target: str, api_key: str | None = None, **kwargs):
        super().__init__(target, api_key, **kwargs)
        from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

        self._channel = (grpc.secure_channel(target, self._credentials)
                         if self._credentials is not None else grpc.insecure_channel(target))
        self._embed = pb_grpc.EmbeddingServiceStub(self._channel)
        self._classify = pb_grpc.ClassificationServiceStub(self._channel)
        self._model_stub = pb_grpc.ModelServiceStub(self._channel)
        self._feedback = pb_grpc.FeedbackServiceStub(self._channel)

    def _call(self, method, request, metadata, timeout_s):
        return call_with_retries(lambda left: method(request, metadata=metadata, timeout=left),
                                 timeout_s=timeout_s or self.timeout_s, retries=self.retries,
                                 backoff_s=self.backoff_s, rng=self._rng)

    def _ranges_for(self, name: str, fmt: OutputFormat) -> dict | None:
        if fmt is OutputFormat.INT8 and name not in self._ranges:
            self.models()
        return self._ranges.get(name)

    def embed_images(self, images: Sequence, *, precision: str | None = None,
                     scale: str | None = None, routing_key: str | None = None,
                     output_format: str = "float32", timeout_s: float | None = None
                     ) -> Embeddings:
        """Embed images (bytes, paths, PIL images or HxWx3 uint8 arrays); raises
        grpc.RpcError with the server's status."""
        fmt, request = self._embed_request("image", images, output_format)
        response = self._call(self._embed.EmbedImages, request,
                              self._md(precision, scale, routing_key), timeout_s)
        return self._embeddings(response, fmt, self._ranges_for(response.endpoint.name, fmt))

    def embed_texts(self, texts: Sequence[str], *, precision: str | None = None,
                    scale: str | None = None, routing_key: str | None = None,
                    output_format: str = "float32", timeout_s: float | None = None
                    ) -> Embeddings:
        """Embed texts; raises grpc.RpcError with the server's status."""
        fmt, request = self._embed_request("text", texts, output_format)
        response = self._call(self._embed.EmbedTexts, request,
                              self._md(precision, scale, routing_key), timeout_s)
        return self._embeddings(response, fmt, self._ranges_for(response.endpoint.name, fmt))

    def classify(self, images: Sequence, labels: Sequence[str] = (), *,
                 prompt_templates: Sequence[str] = (), precision: str | None = None,
                 scale: str | None = None, routing_key: str | None = None,
                 timeout_s: float | None = None) -> Classification:
        """Zero-shot classification with OOD flags (labels empty: the endpoint's own set)."""
        response = self._call(self._classify.Classify,
                              self._classify_request(images, labels, prompt_templates),
                              self._md(precision, scale, routing_key), timeout_s)
        return self._classification(response)

    def report_outcome(self, request_id: str, outcomes, *, timeout_s: float | None = None
                       ) -> int:
        """True labels for images of an earlier call: ``{index: label}`` or (index, label)
        pairs. Returns how many were accepted."""
        response = self._call(self._feedback.ReportOutcome,
                              self._outcome_request(request_id, outcomes),
                              self._md(None, None, None), timeout_s)
        return response.accepted

    def models(self, *, timeout_s: float | None = None) -> list[dict]:
        """Every endpoint: name, scale, precision, tower, embed_dim, ready, routing weight,
        int8 ranges (None when the endpoint has none)."""
        response = self._call(self._model_stub.ListModels, self._pb.ListModelsRequest(),
                              self._md(None, None, None), timeout_s)
        models = self._models(response)
        self._remember_ranges(models)
        return models

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """:class:`Client` on ``grpc.aio``: the same methods, as coroutines. Create it inside the
    event loop that uses it."""

    def __init__(self, target: str, api_key: str | None = None, **kwargs):
        super().__init__(target, api_key, **kwargs)
        from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

        self._channel = (grpc.aio.secure_channel(target, self._credentials)
                         if self._credentials is not None else grpc.aio.insecure_channel(target))
        self._embed = pb_grpc.EmbeddingServiceStub(self._channel)
        self._classify = pb_grpc.ClassificationServiceStub(self._channel)
        self._model_stub = pb_grpc.ModelServiceStub(self._channel)
        self._feedback = pb_grpc.FeedbackServiceStub(self._channel)

    async def _call(self, method, request, metadata, timeout_s):
        async def once(left):
            return await method(request, metadata=metadata, timeout=left)
        return await call_with_retries_async(once, timeout_s=timeout_s or self.timeout_s,
                                             retries=self.retries, backoff_s=self.backoff_s,
                                             rng=self._rng)

    async def _ranges_for(self, name: str, fmt: OutputFormat) -> dict | None:
        if fmt is OutputFormat.INT8 and name not in self._ranges:
            await self.models()
        return self._ranges.get(name)

    async def embed_images(self, images: Sequence, *, precision: str | None = None,
                           scale: str | None = None, routing_key: str | None = None,
                           output_format: str = "float32", timeout_s: float | None = None
                           ) -> Embeddings:
        """As :meth:`Client.embed_images`."""
        fmt, request = self._embed_request("image", images, output_format)
        response = await self._call(self._embed.EmbedImages, request,
                                    self._md(precision, scale, routing_key), timeout_s)
        return self._embeddings(response, fmt,
                                await self._ranges_for(response.endpoint.name, fmt))

    async def embed_texts(self, texts: Sequence[str], *, precision: str | None = None,
                          scale: str | None = None, routing_key: str | None = None,
                          output_format: str = "float32", timeout_s: float | None = None
                          ) -> Embeddings:
        """As :meth:`Client.embed_texts`."""
        fmt, request = self._embed_request("text", texts, output_format)
        response = await self._call(self._embed.EmbedTexts, request,
                                    self._md(precision, scale, routing_key), timeout_s)
        return self._embeddings(response, fmt,
                                await self._ranges_for(response.endpoint.name, fmt))

    async def classify(self, images: Sequence, labels: Sequence[str] = (), *,
                       prompt_templates: Sequence[str] = (), precision: str | None = None,
                       scale: str | None = None, routing_key: str | None = None,
                       timeout_s: float | None = None) -> Classification:
        """As :meth:`Client.classify`."""
        response = await self._call(self._classify.Classify,
                                    self._classify_request(images, labels, prompt_templates),
                                    self._md(precision, scale, routing_key), timeout_s)
        return self._classification(response)

    async def report_outcome(self, request_id: str, outcomes, *,
                             timeout_s: float | None = None) -> int:
        """As :meth:`Client.report_outcome`."""
        response = await self._call(self._feedback.ReportOutcome,
                                    self._outcome_request(request_id, outcomes),
                                    self._md(None, None, None), timeout_s)
        return response.accepted

    async def models(self, *, timeout_s: float | None = None) -> list[dict]:
        """As :meth:`Client.models`."""
        response = await self._call(self._model_stub.ListModels, self._pb.ListModelsRequest(),
                                    self._md(None, None, None), timeout_s)
        models = self._models(response)
        self._remember_ranges(models)
        return models

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
