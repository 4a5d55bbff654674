"""The OpenAI-compatible HTTP API, in the gateway's process and event loop (starlette + uvicorn).

Routes (all JSON):

- ``POST /v1/embeddings``: OpenAI's request and response. ``input`` is a string or a list of
  strings; a string that is a ``data:image/...;base64,`` URI is an image (as NV-CLIP), any
  other a text. ``model`` names a scale (``digits-s``), a scale and precision
  (``digits-s_int8``) or an endpoint (``digits-s_int8_text``); ``encoding_format`` is
  ``float`` or ``base64`` (base64 of the packed bytes: little-endian float32 by default);
  ``user`` is the routing key of the sticky A/B split. The clipserve extension
  ``output_format`` (``float32``, ``float16``, ``int8``, ``ubinary``; see
  :mod:`clipserve.formats`) packs the vectors; with ``encoding_format: float`` the packed values
  come as JSON numbers (int8 codes, ubinary bytes 0..255).
- ``GET /v1/models``, ``POST /v1/classify``, ``POST /v1/feedback``, ``GET /health/live``,
  ``GET /health/ready``.

Nothing here embeds, routes or scores: every call goes through the gRPC servicer's own methods
(:class:`~clipserve.server.service.ClipService`) with an :class:`HttpContext` standing in for
gRPC's, so validation, routing, Triton calls, live quality and metrics are the same code. The
headers are gRPC's metadata (``x-clip-scale``, ``x-clip-precision``, ``x-clip-routing-key``,
``authorization: Bearer``); ``x-clip-timeout`` (seconds) is the deadline. Errors map once,
:func:`clipserve.server.errors.to_http`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import ssl
import time

import grpc
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clipserve.endpoints import Precision, Tower
from clipserve.formats import OutputFormat, decode

from .errors import PayloadTooLarge, ServingError, to_http
from .metrics import Method, Protocol
from .routing import HEADER_PRECISION, HEADER_ROUTING_KEY, HEADER_SCALE
from .service import format_to_pb
from .v1 import clipserve_pb2 as pb

log = logging.getLogger(__name__)

HEADER_TIMEOUT = "x-clip-timeout"  # request: seconds the caller will wait (the deadline)
DATA_URI = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,", re.S)
ENCODINGS = ("float", "base64")


class HttpContext:
    """What :class:`ClipService` uses of ``grpc.aio.ServicerContext``, for an HTTP call.

    Args:
        metadata: the request headers (lower-case names), plus what the body implies
            (``model`` -> scale/precision headers, ``user`` -> routing key).
        timeout_s: the caller's deadline in seconds, or None (the server's own applies).
    """

    protocol = Protocol.HTTP

    def __init__(self, metadata: list[tuple[str, str]], timeout_s: float | None):
        self._metadata = tuple(metadata)
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout_s is None else loop.time() + timeout_s
        self.initial_metadata: list[tuple[str, str]] = []

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def send_initial_metadata(self, metadata) -> None:
        self.initial_metadata.extend(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise Aborted(code, details)


class Aborted(ServingError):
    """A failure the servicer already answered (and counted in metrics)."""


def _bad(message: str) -> ServingError:
    return ServingError.invalid_argument(message)


class HttpApi:
    """The starlette app and the uvicorn server running it.

    Args:
        service: the gRPC servicer every route calls.
        catalog: the repository's endpoints (to resolve ``model``).
        metrics: where refused calls are counted.
        keys: returns the current ApiKeys or None (no keys).
        guard: the gRPC CallGuard, whose concurrency bound HTTP calls share.
        ready: returns whether Triton is ready (``/health/ready``).
        max_body_bytes: largest request body (larger: 413).
        default_scale: the scale calls naming none go to (flagged in ``/v1/models``).
    """

    def __init__(self, *, service, catalog, metrics, keys, guard, ready, max_body_bytes: int,
                 default_scale: str):
        self._default_scale = default_scale
        self._service = service
        self._catalog = catalog
        self._metrics = metrics
        self._keys = keys
        self._guard = guard
        self._ready = ready
        self._max_body = max_body_bytes
        self._server = None
        self._task: asyncio.Task | None = None
        self.app = Starlette(routes=[
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/classify", self.classify, methods=["POST"]),
            Route("/v1/feedback", self.feedback, methods=["POST"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
        ])

    # -- serving -------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, cert_file=None, key_file=None,
                    client_ca_file=None, grace_s: float = 10.0, reuse_port: bool = False) -> int:
        """Bind ``host:port`` (0: any free port) and serve; returns the bound port. With
        ``reuse_port`` other processes may bind the same port (SO_REUSEPORT).

        TLS uses the gRPC port's files; they are read here, at start (unlike gRPC's, a
        rotated certificate needs a restart of the HTTP side).

        Raises:
            RuntimeError: the port cannot be bound.
        """
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: every worker binds this port; the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot bind HTTP port {host}:{port}: {exc}") from None
        sock.listen(1024)
        sock.setblocking(False)
        tls = {}
        if cert_file is not None:
            tls = {"ssl_certfile": str(cert_file), "ssl_keyfile": str(key_file)}
            if client_ca_file is not None:
                tls.update(ssl_ca_certs=str(client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=max(grace_s, 0.1), **tls)
        self._server = _InLoopServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting connections and let in-flight requests finish (uvicorn's graceful
        shutdown, bounded by the grace given to :meth:`start`)."""
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
            self._server = None

    # -- plumbing --------------------------------------------------------------------------

    async def _call(self, request: Request, service_name: str, method: Method, work):
        """Authorise, bound, read the body, run ``work(body, metadata, timeout)``; map errors.

        ``work`` returns (JSON body, extra response headers)."""
        started = time.perf_counter()
        entered = False
        try:
            keys = self._keys()
            if keys is not None:
                keys.authorize(list(request.headers.items()), service_name)
            self._guard.enter()
            entered = True
            metadata = [(k, v) for k, v in request.headers.items()]
            timeout = self._timeout(request)
            body = await self._body(request) if request.method == "POST" else {}
            payload, headers = await work(body, metadata, timeout)
            return JSONResponse(payload, headers=headers)
        except Exception as exc:
            if isinstance(exc, ServingError) and not isinstance(exc, Aborted):
                # refused before the servicer saw it (key, bound, body): counted here
                self._metrics.observe_call(method, None, None, exc.code,
                                           time.perf_counter() - started, Protocol.HTTP)
            status, error = to_http(exc)
            return JSONResponse(error, status_code=status)
        finally:
            if entered:
                self._guard.leave()

    @staticmethod
    def _timeout(request: Request) -> float | None:
        text = request.headers.get(HEADER_TIMEOUT)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise _bad(f"{HEADER_TIMEOUT} must be a positive number of seconds, got {text!r}")
        return value

    async def _body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise PayloadTooLarge(f"request body is {length} bytes; at most {self._max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"request body is over {self._max_body} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        return body

    def _model_metadata(self, model, metadata: list, tower: Tower | None = None) -> list:
        """Headers implied by ``model``; a header that says otherwise is INVALID_ARGUMENT."""
        if model is None or model == "":
            return metadata
        if not isinstance(model, str):
            raise _bad(f"model must be a string, got {type(model).__name__}")
        parts = model.split("_")
        scales = self._catalog.scales
        valid = sorted({*scales, *(f"{s}_{p.value}" for s, p in self._catalog.targets())})
        unknown = ServingError.not_found(
            f"model {model!r} is not served here; models: {', '.join(valid)} (or an endpoint "
            "name, scale_precision_tower)")
        if parts[0] not in scales or len(parts) > 3:
            raise unknown
        implied = {HEADER_SCALE: parts[0]}
        if len(parts) >= 2:
            try:
                implied[HEADER_PRECISION] = Precision.parse(parts[1]).value
            except ValueError:
                raise unknown from None
            if (parts[0], Precision(implied[HEADER_PRECISION])) not in self._catalog.targets():
                raise unknown
        if len(parts) == 3 and parts[2] != (tower.value if tower else None):
            raise _bad(f"model {model!r} is a {parts[2]} endpoint; this input needs "
                       f"{tower.value if tower else 'both towers'}")
        headers = dict(metadata)
        for name, value in implied.items():
            sent = headers.get(name)
            if sent is not None and sent.strip().lower() != value.lower():
                raise _bad(f"model {model!r} and header {name}: {sent!r} disagree")
        return [*metadata, *implied.items()]

    @staticmethod
    def _response_headers(context: HttpContext) -> dict:
        names = [v for k, v in context.initial_metadata if k == "x-clip-endpoint"]
        ids = [v for k, v in context.initial_metadata if k == "x-clip-request-id"]
        headers = {"x-clip-endpoint": ",".join(names)}
        if ids:
            headers["x-clip-request-id"] = ids[0]
        return headers

    # -- routes ----------------------------------------------------------------------------

    async def embeddings(self, request: Request):
        return await self._call(request, "clipserve.v1.EmbeddingService", Method.EMBEDDINGS,
                                self._embeddings)

    async def _embeddings(self, body: dict, metadata: list, timeout):
        items = body.get("input")
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not items:
            raise _bad("input must be a string or a non-empty list of strings (texts, or "
                       "images as data:image/...;base64, URIs)")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise _bad(f"encoding_format must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        try:
            fmt = OutputFormat.parse(body.get("output_format") or "float32")
        except ValueError as exc:
            raise _bad(f"output_format: {exc}") from None
        images, texts = [], []  # (input index, payload)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise _bad(f"input[{i}] is a {type(item).__name__}; send a text or an image as a "
                           "data URI (token arrays are not supported)")
            match = DATA_URI.match(item)
            if match:
                images.append((i, _b64(item[match.end():], f"input[{i}]")))
            elif item.startswith("data:"):
                raise _bad(f"input[{i}] is a data URI but not data:image/...;base64,...")
            else:
                texts.append((i, item))
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise _bad("user must be a string")
        if user and not any(k == HEADER_ROUTING_KEY for k, _ in metadata):
            metadata = [*metadata, (HEADER_ROUTING_KEY, user)]
        tower = None if images and texts else (Tower.IMAGE if images else Tower.TEXT)
        metadata = self._model_metadata(body.get("model"), metadata, tower)
        dimensions = body.get("dimensions")

        vectors: dict[int, object] = {}
        headers: dict[str, str] = {}
        names, tokens = [], 0
        served_dim = None
        if images:
            context = HttpContext(metadata, timeout)
            response = await self._renamed(self._service.EmbedImages(
                pb.EmbedImagesRequest(images=[d for _, d in images], format=format_to_pb(fmt)),
                context), "image", [i for i, _ in images])
            headers = self._response_headers(context)
            names.append(response.endpoint.name)
            served_dim = response.endpoint.embed_dim
            for (i, _), e in zip(images, response.embeddings):
                vectors[i] = e
            if texts:  # the texts go to the arm the images went to, not a second draw
                metadata = [(k, v) for k, v in metadata
                            if k not in (HEADER_SCALE, HEADER_PRECISION)]
                metadata += [(HEADER_SCALE, response.endpoint.scale),
                             (HEADER_PRECISION,
                              pb.Precision.Name(response.endpoint.precision)[10:].lower())]
        if texts:
            context = HttpContext(metadata, timeout)
            response = await self._renamed(self._service.EmbedTexts(
                pb.EmbedTextsRequest(texts=[t for _, t in texts], format=format_to_pb(fmt)),
                context), "text", [i for i, _ in texts])
            text_headers = self._response_headers(context)
            headers["x-clip-endpoint"] = ",".join(filter(None, (
                headers.get("x-clip-endpoint"), text_headers["x-clip-endpoint"])))
            names.append(response.endpoint.name)
            served_dim = response.endpoint.embed_dim
            for (i, _), e in zip(texts, response.embeddings):
                vectors[i] = e
                tokens += e.tokens
        if dimensions is not None and dimensions != served_dim:
            raise _bad(f"dimensions {dimensions!r}: this model's embeddings have {served_dim} "
                       "(shortening is not supported)")
        data = [{"object": "embedding", "index": i,
                 "embedding": _encoded(vectors[i], fmt, encoding, served_dim)}
                for i in range(len(items))]
        headers["x-clip-output-format"] = fmt.value
        return ({"object": "list", "data": data, "model": ",".join(names),
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers)

    @staticmethod
    async def _renamed(call, kind: str, indices: list[int]):
        """Run a servicer call; its messages' "image 3" / "text 3" become "input[k]"."""
        try:
            return await call
        except ServingError as exc:
            if exc.code is grpc.StatusCode.INVALID_ARGUMENT:
                exc.message = re.sub(rf"\b{kind} (\d+)\b", lambda m: (
                    f"input[{indices[int(m.group(1))]}] ({kind})"
                    if int(m.group(1)) < len(indices) else m.group(0)), exc.message)
            raise

    async def models(self, request: Request):
        return await self._call(request, "clipserve.v1.ModelService", Method.LIST_MODELS,
                                self._models)

    async def _models(self, body, metadata, timeout):
        context = HttpContext(metadata, timeout)
        listing = await self._service.ListModels(pb.ListModelsRequest(), context)
        default = self._default_scale
        by_target: dict[tuple[str, int], dict] = {}
        for info in listing.endpoints:
            e = info.endpoint
            entry = by_target.setdefault((e.scale, e.precision), {
                "id": f"{e.scale}_{pb.Precision.Name(e.precision)[10:].lower()}",
                "object": "model", "created": 0, "owned_by": "clipserve", "scale": e.scale,
                "precision": pb.Precision.Name(e.precision)[10:].lower(),
                "routing_weight": info.routing_weight, "description": info.description,
                "endpoints": {}})
            tower = pb.Tower.Name(e.tower)[6:].lower()
            entry["endpoints"][tower] = {
                "name": e.name, "embed_dim": e.embed_dim, "ready": info.ready,
                "max_batch_size": info.max_batch_size, "source": info.source,
                "image_size": info.image_size or None,
                "context_length": info.context_length or None,
                "output_formats": [f.value for f in OutputFormat
                                   if f is not OutputFormat.INT8 or info.HasField("int8_ranges")],
                "int8_ranges": ({"lo": list(info.int8_ranges.lo), "hi": list(info.int8_ranges.hi)}
                                if info.HasField("int8_ranges") else None)}
        scales = [{"id": s, "object": "model", "created": 0, "owned_by": "clipserve",
                   "scale": s, "default": s == default,
                   "precisions": [t["precision"] for (sc, _), t in by_target.items() if sc == s]}
                  for s in listing.scales]
        return {"object": "list", "data": scales + list(by_target.values())}, {}

    async def classify(self, request: Request):
        return await self._call(request, "clipserve.v1.ClassificationService", Method.CLASSIFY,
                                self._classify)

    async def _classify(self, body: dict, metadata: list, timeout):
        images = body.get("input", body.get("images"))
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise _bad("input must be a list of images (data URIs or base64 strings)")
        data = []
        for i, item in enumerate(images):
            if not isinstance(item, str):
                raise _bad(f"input[{i}] must be a string (a data URI or base64)")
            match = DATA_URI.match(item)
            data.append(_b64(item[match.end():] if match else item, f"input[{i}]"))
        labels = _strings(body, "labels")
        templates = _strings(body, "prompt_templates")
        metadata = self._model_metadata(body.get("model"), metadata)
        context = HttpContext(metadata, timeout)
        response = await self._renamed(self._service.Classify(
            pb.ClassifyRequest(images=data, labels=labels, prompt_templates=templates), context),
            "image", list(range(len(data))))
        results = [{"index": i, "probabilities": [float(p) for p in r.probabilities],
                    "top_index": r.top_index, "top_label": r.top_label,
                    "confidence": r.confidence, "ood_score": r.ood_score,
                    "out_of_distribution": r.out_of_distribution}
                   for i, r in enumerate(response.results)]
        return ({"object": "list", "model": response.endpoint.name,
                 "text_model": response.text_endpoint.name, "labels": list(response.labels),
                 "data": results, "temperature": response.temperature,
                 "ood_threshold": response.ood_threshold, "request_id": response.request_id},
                self._response_headers(context))

    async def feedback(self, request: Request):
        return await self._call(request, "clipserve.v1.FeedbackService", Method.REPORT_OUTCOME,
                                self._feedback)

    async def _feedback(self, body: dict, metadata: list, timeout):
        request_id = body.get("request_id")
        outcomes = body.get("outcomes")
        if not isinstance(request_id, str) or not isinstance(outcomes, list):
            raise _bad('send {"request_id": "...", "outcomes": [{"index": 0, "true_label": '
                       '"..."}]}')
        parsed = []
        for i, o in enumerate(outcomes):
            if (not isinstance(o, dict) or not isinstance(o.get("index"), int)
                    or isinstance(o.get("index"), bool) or o["index"] < 0
                    or not isinstance(o.get("true_label"), str)):
                raise _bad(f"outcomes[{i}] must be {{\"index\": int >= 0, \"true_label\": str}}")
            parsed.append(pb.Outcome(index=o["index"], true_label=o["true_label"]))
        context = HttpContext(metadata, timeout)
        response = await self._service.ReportOutcome(
            pb.ReportOutcomeRequest(request_id=request_id, outcomes=parsed), context)
        return {"accepted": response.accepted, "model": response.endpoint.name}, {}

    async def live(self, request: Request):
        return JSONResponse({"status": "live"})

    async def ready(self, request: Request):
        if self._ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{what} is not valid base64") from None


def _strings(body: dict, name: str) -> list[str]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{name} must be a list of strings")
    return value


def _encoded(embedding, fmt: OutputFormat, encoding: str, dim: int):
    """One embedding as JSON: base64 of the packed bytes, or numbers."""
    if fmt is OutputFormat.FLOAT32:
        if encoding == "base64":
            return base64.b64encode(np.asarray(embedding.values, "<f4").tobytes()).decode()
        return list(embedding.values)
    if encoding == "base64":
        return base64.b64encode(embedding.packed).decode()
    if fmt is OutputFormat.FLOAT16:
        return decode(embedding.packed, fmt, dim)[0].tolist()
    dtype = np.int8 if fmt is OutputFormat.INT8 else np.uint8
    return np.frombuffer(embedding.packed, dtype=dtype).tolist()


class _InLoopServer:
    """uvicorn.Server without its signal handling: the gateway owns SIGTERM/SIGINT/SIGHUP."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # uvicorn < 0.29
                pass

            @contextlib.contextmanager
            def capture_signals(self):  # uvicorn >= 0.29
                yield

        return Server(config)
