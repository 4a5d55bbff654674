"""The ``clipserve.v1`` servicers: validate, route, preprocess, call the backend, answer.

One class implements the three services; it depends on the :class:`Backend` protocol, the
catalog, the live routing policy and the readiness snapshot, all passed in, so unit tests drive
it with fakes and no socket.

One call, top to bottom: an RPC method (``EmbedImages``) -> :meth:`ClipService._unary` (deadline,
status mapping, call metrics) -> the handler (``_embed_images``: validate, route, decode) ->
:class:`.embedder.Embedder` (readiness, chunking to max_batch_size, coalescing, batch metrics)
-> :class:`.backend.Backend` (Triton) -> back in the handler: live scoring
(:class:`.live_quality.LiveQuality`) and the response message.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Sequence

import grpc
import numpy as np

from clipserve.calibration import label_cosines
from clipserve.endpoints import Precision, Tower, endpoint_name
from clipserve.formats import OutputFormat, encode

from .backend import Backend
from .config import ServerConfig
from .embedder import Batch, Embedder, Tokenizer
from .errors import ServingError, to_status
from .health import BackendState
from .images import ImageDecoder
from .label_cache import LABEL_SLOT, LabelEmbeddingCache, LabelSetKey
from .live_quality import FIT_COMMAND, LiveQuality
from .metrics import Method, Phase, ServerMetrics
from .metrics import Protocol as Frontend
from .repository import Catalog, EndpointSpec
from .routing import HEADER_ENDPOINT, RoutingPolicy, Target, route
from .v1 import clipserve_pb2 as pb
from .v1 import clipserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "x-clip-request-id"  # response: the server's id for the call
# request: "1" keeps this call's predictions for ReportOutcome, "0" does not; absent: a share
# outcome_sample_fraction of calls is kept (1.0 by default: all of them).
HEADER_STORE_PREDICTION = "x-clip-store-prediction"
_YES, _NO = frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no"})


async def _within(awaitable: Awaitable, timeout_s: float, call: "_Call | None" = None):
    """``awaitable``'s result, or TimeoutError after ``timeout_s``. asyncio.timeout (3.11+)
    cancels in place where wait_for wraps the coroutine in a Task of its own. ``call``: gets
    the timeout as ``call.timeout`` (see :meth:`ClipService._announce`)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s) as timeout:
            if call is not None:
                call.timeout = timeout
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout_s)


def precision_to_pb(precision: Precision) -> int:
    return pb.Precision.Value(f"PRECISION_{precision.name}")


def tower_to_pb(tower: Tower) -> int:
    return pb.Tower.Value(f"TOWER_{tower.name}")


def format_from_pb(value: int) -> OutputFormat:
    """A pb.EmbeddingFormat value as an OutputFormat (INVALID_ARGUMENT for an unknown one)."""
    try:
        return OutputFormat(pb.EmbeddingFormat.Name(value).removeprefix(
            "EMBEDDING_FORMAT_").lower())
    except ValueError:
        raise ServingError.invalid_argument(
            f"unknown embedding format {value}; valid: "
            f"{', '.join(pb.EmbeddingFormat.keys())}") from None


def format_to_pb(fmt: OutputFormat) -> int:
    return pb.EmbeddingFormat.Value(f"EMBEDDING_FORMAT_{fmt.name}")


def _f32_bytes(vectors: np.ndarray) -> bytes:
    """``embeddings_f32`` of a response: [n, d] row-major little-endian float32."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _precision_descriptions() -> dict[Precision, str]:
    # endpoints.Precision documents each value in a "- ``fp16``: ..." bullet; serve that text
    # rather than keep a second copy that could drift.
    doc = inspect.cleandoc(Precision.__doc__ or "")
    found = {m.group(1): " ".join(m.group(2).split())
             for m in re.finditer(r"^- ``(\w+)``: (.*?)(?=^- ``|\Z)", doc, re.S | re.M)}
    return {p: found.get(p.value, "") for p in Precision}


PRECISION_DESCRIPTIONS = _precision_descriptions()


@dataclass
class _Call:
    """Per-call bookkeeping: what metrics label it with, and when its time is up."""

    deadline: float  # event-loop time
    method: Method
    scale: str | None = None
    precision: Precision | None = None
    # Request data never becomes a metric label; this id only keys stored predictions.
    # 32 random hex digits, as uuid4().hex gave, for a tenth of its cost.
    request_id: str = field(default_factory=lambda: os.urandom(16).hex())
    # The asyncio.timeout the handler runs under (unary calls on 3.11+), else None.
    timeout: object | None = None

    def remaining(self) -> float:
        """Seconds left; raises DEADLINE_EXCEEDED when none are."""
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise ServingError.deadline_exceeded()
        return left


class _Observed:
    """:meth:`ClipService._observed`'s context manager. A class rather than an
    ``asynccontextmanager``: it is entered on every call, and the generator-based one costs an
    async generator and its first-iteration hooks each time."""

    __slots__ = ("_metrics", "_method", "_context", "_call", "_protocol", "_started",
                 "_in_flight")

    def __init__(self, metrics: ServerMetrics, method: Method, context, call: _Call):
        self._metrics, self._method, self._context, self._call = metrics, method, context, call
        # The HTTP front end passes a context of its own that says so; gRPC's does not.
        self._protocol = getattr(context, "protocol", Frontend.GRPC)

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        self._in_flight = self._metrics.in_flight_of(self._method)
        self._in_flight.inc()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                code = grpc.StatusCode.CANCELLED  # client gone or deadline passed
                return False
            if not isinstance(exc, Exception):  # None, or KeyboardInterrupt and the like
                return False
            code, message = to_status(exc)
            await self._context.abort(code, message)
            return True  # a context whose abort returns: the failure is answered
        finally:
            self._in_flight.dec()
            call = self._call
            self._metrics.observe_call(self._method, call.scale, call.precision, code,
                                       time.perf_counter() - self._started, self._protocol)


class ClipService(pb_grpc.EmbeddingServiceServicer, pb_grpc.ClassificationServiceServicer,
                  pb_grpc.ModelServiceServicer, pb_grpc.FeedbackServiceServicer):
    """EmbeddingService, ClassificationService, ModelService and FeedbackService.

    Embeddings come from :attr:`embedder`, label embeddings from :attr:`labels` (a cache
    over the embedder). Live quality (OOD scores, confidences, stored predictions, shadow
    comparison) goes through :attr:`live`, which uses the same two; its background work is
    :meth:`run_background`, which the app runs as a task.

    Args:
        config: limits and timeouts.
        catalog: the repository's endpoints.
        backend: runs the towers (Triton, or a fake in tests).
        decoder: image preprocessing pool.
        tokenizers: text endpoint name -> its tokenizer.
        metrics: where calls are recorded.
        routing: returns the current A/B policy (it may change between calls).
        state: returns the current readiness snapshot.
        rng: randomness for calls without a routing key (and shadow sampling).
    """

    def __init__(self, *, config: ServerConfig, catalog: Catalog, backend: Backend,
                 decoder: ImageDecoder, tokenizers: Mapping[str, Tokenizer],
                 metrics: ServerMetrics, routing: Callable[[], RoutingPolicy],
                 state: Callable[[], BackendState], rng: random.Random | None = None):
        self._config = config
        self._catalog = catalog
        self._decoder = decoder
        self._metrics = metrics
        self._routing = routing
        self._state = state
        self._rng = rng or random.Random()
        # pb.Endpoint per endpoint name, built once (keyed with the spec: a reloaded catalog
        # brings new specs). Messages passed to a constructor are copied, so sharing is safe.
        self._endpoint_pbs: dict[str, tuple[EndpointSpec, pb.Endpoint]] = {}
        self.embedder = Embedder(catalog=catalog, backend=backend, tokenizers=tokenizers,
                                 metrics=metrics, state=state, coalesce=config.coalesce)
        # A label set is embedded once for every caller (and often in the background), so
        # under request_timeout_s rather than the deadline of whichever call started it.
        self.labels = LabelEmbeddingCache(
            lambda key: self.embedder.embed_prompts(key.scale, key.precision, key.labels,
                                                    key.prompts(), config.request_timeout_s),
            metrics, config.label_cache_mib << 20)
        self.live = LiveQuality(catalog=catalog, metrics=metrics, config=config,
                                labels=self.labels, embedder=self.embedder, rng=random.Random(self._rng.random()))

    async def run_background(self) -> None:
        """Warm the label-embedding cache and run the shadow worker, until cancelled."""
        await self.live.run()

    # -- the RPCs --------------------------------------------------------------------------

    async def EmbedImages(self, request, context):
        return await self._unary(Method.EMBED_IMAGES, context,
                                 lambda call: self._embed_images(request, context, call))

    async def EmbedTexts(self, request, context):
        return await self._unary(Method.EMBED_TEXTS, context,
                                 lambda call: self._embed_texts(request, context, call))

    async def Classify(self, request, context):
        return await self._unary(Method.CLASSIFY, context,
                                 lambda call: self._classify(request, context, call))

    async def ListModels(self, request, context):
        return await self._unary(Method.LIST_MODELS, context,
                                 lambda call: self._list_models())

    async def ReportOutcome(self, request, context):
        return await self._unary(Method.REPORT_OUTCOME, context,
                                 lambda call: self._report_outcome(request, call))

    async def EmbedStream(self, request_iterator, context):
        call = _Call(deadline=self._call_deadline(context, stream=True),
                     method=Method.EMBED_STREAM)
        async with self._observed(Method.EMBED_STREAM, context, call):
            state = self._state()
            scale, precision = self._route(call, context, lambda target: any(
                self._routable(state, endpoint_name(*target, tower)) for tower in Tower))
            names = [endpoint_name(scale, precision, tower) for tower in Tower
                     if self._catalog.has(scale, precision, tower)]
            if not names:
                raise ServingError.not_found(
                    f"no endpoint for {scale} {precision.value} in this repository")
            await context.send_initial_metadata(
                (*((HEADER_ENDPOINT, n) for n in names), (HEADER_REQUEST_ID, call.request_id)))
            async for response in self._stream(request_iterator, call):
                yield response

    # -- call plumbing ---------------------------------------------------------------------

    def _call_deadline(self, context, stream: bool = False) -> float:
        """Event-loop time by which the call must finish: the client's deadline, capped at
        request_timeout_s for unary calls (a stream may run as long as its client allows; its
        items get request_timeout_s each)."""
        now = asyncio.get_running_loop().time()
        remaining = context.time_remaining()
        if stream:
            return now + remaining if remaining is not None else float("inf")
        limit = self._config.request_timeout_s
        return now + (min(remaining, limit) if remaining is not None else limit)

    def _observed(self, method: Method, context, call: _Call) -> "_Observed":
        """Around every RPC: map a failure to its status (the one mapping, errors.to_status)
        and abort the call with it; record the outcome in metrics (see :class:`_Observed`)."""
        return _Observed(self._metrics, method, context, call)

    async def _unary(self, method: Method, context,
                     handler: Callable[[_Call], Awaitable[object]]):
        call = _Call(deadline=self._call_deadline(context), method=method)
        async with self._observed(method, context, call):
            timeout = call.deadline - asyncio.get_running_loop().time()
            return await _within(handler(call), timeout, call)

    def _route(self, call: _Call, context, eligible: Callable[[Target], bool]) -> Target:
        scale, precision = route(self._routing(), context.invocation_metadata(),
                                 self._catalog.scales, eligible, self._rng)
        call.scale, call.precision = scale, precision
        return scale, precision

    def _route_towers(self, call: _Call, context, towers: tuple[Tower, ...]) -> Target:
        state = self._state()
        return self._route(call, context, lambda target: all(
            self._routable(state, endpoint_name(*target, tower)) for tower in towers))

    def _routable(self, state: BackendState, name: str) -> bool:
        """Whether endpoint ``name`` is ready, its GPU-decode ensemble too where it has one
        (so the router picks another arm instead of failing the call UNAVAILABLE)."""
        if not state.is_ready(name):
            return False
        spec = self._catalog.by_name(name)
        return spec is None or state.is_ready(spec.triton_model)

    def _endpoint(self, scale: str, precision: Precision, tower: Tower) -> EndpointSpec:
        """The endpoint, if present (else NOT_FOUND) and ready (else UNAVAILABLE)."""
        return self.embedder.endpoint(scale, precision, tower)

    def _check_batch(self, items: Sequence, kind: str) -> None:
        if not items:
            raise ServingError.invalid_argument(f"{kind} is empty: send at least one")
        limit = self._config.max_batch_items
        if len(items) > limit:
            raise ServingError.invalid_argument(
                f"{len(items)} {kind} in one call; at most {limit} (split the batch, or use "
                "EmbedStream)")

    def _check_text(self, text: str, what: str) -> None:
        limit = self._config.max_text_chars
        if len(text) > limit:
            raise ServingError.invalid_argument(
                f"{what} is {len(text)} characters; at most {limit}")

    async def _embed(self, call: _Call, spec: EndpointSpec, batch: Batch) -> np.ndarray:
        """A client's batch through the endpoint, within the call's deadline, recorded."""
        return await self.embedder.embed(call.method, spec, batch, call.remaining())

    async def _decode(self, call: _Call, spec: EndpointSpec,
                      images: Sequence[bytes]) -> Batch:
        """Preprocess a call's images, recording the preprocess and queue phases: pixels for
        the tower, or for an endpoint that decodes on the GPU the checked encoded files
        (padded uint8 groups, ImageDecoder.encoded) for its ensemble."""
        waits: list[float] = []
        started = time.perf_counter()
        if spec.gpu_decode:
            pixels = self._decoder.encoded(images, spec.sidecar.image_size)
        else:
            pixels = await self._decoder.decode(images, spec.sidecar.image_size, waits)
        self._metrics.observe_phase(call.method, spec.scale, spec.precision, Phase.PREPROCESS,
                                    time.perf_counter() - started)
        self._metrics.observe_phase(call.method, spec.scale, spec.precision, Phase.QUEUE,
                                    max(waits, default=0.0))
        return pixels

    @staticmethod
    def _output_format(request, spec: EndpointSpec) -> OutputFormat:
        """The format the call asked for, checked against what ``spec`` can give."""
        fmt = format_from_pb(request.format)
        if fmt is OutputFormat.INT8 and "int8" not in (spec.sidecar.output_formats or {}):
            raise ServingError.failed_precondition(
                f"endpoint {spec.name} has no int8 ranges in its sidecar (output_formats.int8); "
                "re-export the repository to fit them, or ask for float32, float16 or ubinary")
        return fmt

    @staticmethod
    def _pack(spec: EndpointSpec, vectors: np.ndarray, fmt: OutputFormat) -> list[bytes]:
        try:
            return encode(vectors, fmt, spec.sidecar.output_formats)
        except ValueError as exc:  # ranges of another dimension: the sidecar is inconsistent
            raise ServingError.failed_precondition(
                f"endpoint {spec.name} cannot encode {fmt.value}: {exc}; re-export the "
                "repository") from None

    def _endpoint_pb(self, spec: EndpointSpec) -> pb.Endpoint:
        cached = self._endpoint_pbs.get(spec.name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        message = pb.Endpoint(name=spec.name, scale=spec.scale,
                              precision=precision_to_pb(spec.precision),
                              tower=tower_to_pb(spec.tower), embed_dim=spec.sidecar.embed_dim)
        self._endpoint_pbs[spec.name] = (spec, message)
        return message

    def _stored_id(self, call: _Call, context) -> str | None:
        """The request id to keep this call's predictions under for ReportOutcome, or None
        when they are not kept: what the caller's x-clip-store-prediction header says, else a
        share outcome_sample_fraction of calls.

        Raises:
            ServingError: INVALID_ARGUMENT for a header value other than 1/0/true/false/yes/no.
        """
        for key, value in context.invocation_metadata() or ():
            if key == HEADER_STORE_PREDICTION:
                answer = str(value).strip().lower()
                if answer in _YES:
                    return call.request_id
                if answer in _NO:
                    return None
                raise ServingError.invalid_argument(
                    f"{HEADER_STORE_PREDICTION} is {str(value)[:40]!r}; send 1 (keep this "
                    "call's predictions for ReportOutcome) or 0")
        fraction = self._config.outcome_sample_fraction
        # Draw only for a real share, so the default (1.0) leaves the rng's sequence alone.
        if fraction >= 1.0 or (fraction > 0.0 and self._rng.random() < fraction):
            return call.request_id
        return None

    @staticmethod
    async def _announce(context, call: _Call, *specs: EndpointSpec) -> None:
        """Send the endpoint and request-id headers. A deadline must not cancel the handler
        mid-send: gRPC allows one pending batch per call, so the error status that follows
        would fail (TOO_MANY_OPERATIONS) unless this send finishes first; it is a single short
        write. Under the call's asyncio.timeout the deadline is held off for the send and put
        back after (one passed meanwhile fires at the next await), which costs no Task;
        otherwise the send runs shielded in a Task of its own."""
        metadata = (*((HEADER_ENDPOINT, s.name) for s in specs),
                    (HEADER_REQUEST_ID, call.request_id))
        timeout = call.timeout
        if timeout is not None and not timeout.expired():
            when = timeout.when()
            timeout.reschedule(None)
            try:
                await context.send_initial_metadata(metadata)
            finally:
                timeout.reschedule(when)
            return
        send = asyncio.ensure_future(context.send_initial_metadata(metadata))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await send
            raise

    # -- handlers --------------------------------------------------------------------------

    async def _embed_images(self, request, context, call: _Call) -> pb.EmbedImagesResponse:
        images = list(request.images)
        self._check_batch(images, "images")
        stored_id = self._stored_id(call, context)
        scale, precision = self._route_towers(call, context, (Tower.IMAGE,))
        spec = self._endpoint(scale, precision, Tower.IMAGE)
        fmt = self._output_format(request, spec)
        await self._announce(context, call, spec)
        pixels = await self._decode(call, spec, images)
        vectors = await self._embed(call, spec, pixels)
        self.live.score_images(spec, vectors, pixels, stored_id)
        if fmt is OutputFormat.FLOAT32 and request.pack_float32:  # one bytes field, no rows
            return pb.EmbedImagesResponse(
                endpoint=self._endpoint_pb(spec), request_id=call.request_id,
                format=request.format, embeddings_f32=_f32_bytes(vectors))
        embeddings = ([pb.Embedding(values=row) for row in vectors.tolist()]
                      if fmt is OutputFormat.FLOAT32 else
                      [pb.Embedding(packed=row) for row in self._pack(spec, vectors, fmt)])
        return pb.EmbedImagesResponse(
            endpoint=self._endpoint_pb(spec), embeddings=embeddings,
            request_id=call.request_id, format=request.format)

    async def _embed_texts(self, request, context, call: _Call) -> pb.EmbedTextsResponse:
        texts = list(request.texts)
        self._check_batch(texts, "texts")
        for i, text in enumerate(texts):
            self._check_text(text, f"text {i}")
        scale, precision = self._route_towers(call, context, (Tower.TEXT,))
        spec = self._endpoint(scale, precision, Tower.TEXT)
        fmt = self._output_format(request, spec)
        await self._announce(context, call, spec)
        started = time.perf_counter()
        ids, truncated = await self.embedder.tokenize(spec, texts)
        self._metrics.observe_phase(call.method, scale, precision, Phase.PREPROCESS,
                                    time.perf_counter() - started)
        vectors = await self._embed(call, spec, ids)
        # ids are 0-padded; the ufunc directly (count_nonzero with an axis goes via .sum()).
        tokens = np.add.reduce(ids != 0, axis=1).tolist()
        if fmt is OutputFormat.FLOAT32 and request.pack_float32:  # rows keep only metadata
            return pb.EmbedTextsResponse(
                endpoint=self._endpoint_pb(spec), format=request.format,
                embeddings=[pb.TextEmbedding(truncated=cut, tokens=n)
                            for cut, n in zip(truncated, tokens)],
                embeddings_f32=_f32_bytes(vectors))
        rows = (vectors.tolist() if fmt is OutputFormat.FLOAT32
                else self._pack(spec, vectors, fmt))
        field_name = "values" if fmt is OutputFormat.FLOAT32 else "packed"
        embeddings = [pb.TextEmbedding(**{field_name: row}, truncated=cut, tokens=n)
                      for row, cut, n in zip(rows, truncated, tokens)]
        return pb.EmbedTextsResponse(endpoint=self._endpoint_pb(spec), embeddings=embeddings,
                                     format=request.format)

    async def _classify(self, request, context, call: _Call) -> pb.ClassifyResponse:
        images = list(request.images)
        self._check_batch(images, "images")
        labels, templates = list(request.labels), list(request.prompt_templates)
        for i, template in enumerate(templates):
            if LABEL_SLOT not in template:
                raise ServingError.invalid_argument(
                    f"prompt template {i} ({template!r}) has no {LABEL_SLOT} for the label")
            self._check_text(template, f"prompt template {i}")
        stored_id = self._stored_id(call, context)
        scale, precision = self._route_towers(call, context, (Tower.IMAGE, Tower.TEXT))
        image_spec = self._endpoint(scale, precision, Tower.IMAGE)
        text_spec = self._endpoint(scale, precision, Tower.TEXT)
        sidecar = image_spec.sidecar
        if not labels:
            if not sidecar.labels:
                raise ServingError.invalid_argument(
                    f"labels is empty and endpoint {image_spec.name} has no default label set; "
                    "send the candidate labels")
            labels = list(sidecar.labels)
            templates = templates or list(sidecar.prompts or [LABEL_SLOT])
        templates = templates or [LABEL_SLOT]
        self._check_labels(labels, templates)
        if sidecar.temperature is None or sidecar.ood_threshold is None:
            raise ServingError.failed_precondition(
                f"endpoint {image_spec.name} has no temperature/OOD threshold fitted on its "
                f"domain; fit them with: {FIT_COMMAND}")
        await self._announce(context, call, image_spec)
        # Label embeddings come from the cache (computed once per scale, precision, labels and
        # templates), never re-embedded per call.
        key = LabelSetKey(scale, precision, tuple(labels), tuple(templates))

        async def image_vectors() -> tuple[np.ndarray, np.ndarray]:
            pixels = await self._decode(call, image_spec, images)
            return pixels, await self._embed(call, image_spec, pixels)

        label_emb = self.labels.peek(key)
        if label_emb is None:  # embed the labels while the images decode
            (pixels, image_emb), label_emb = await asyncio.gather(
                image_vectors(), self.labels.compute(key))
        else:
            pixels, image_emb = await image_vectors()
        cosines = label_cosines(image_emb, label_emb)
        probabilities = sidecar.scoring_rule().probabilities(cosines)  # softmax or sigmoid
        ood_scores = self.live.ood_scores(image_spec, image_emb, cosines, probabilities)
        self.live.classified(image_spec, key, probabilities, ood_scores, stored_id, pixels,
                             image_emb)
        results = []
        for probs, ood_score in zip(probabilities, ood_scores):
            top = int(probs.argmax())
            results.append(pb.Classification(
                probabilities=probs.tolist(), top_index=top, top_label=labels[top],
                confidence=float(probs[top]), ood_score=float(ood_score),
                out_of_distribution=bool(ood_score < sidecar.ood_threshold)))
        return pb.ClassifyResponse(
            endpoint=self._endpoint_pb(image_spec), text_endpoint=self._endpoint_pb(text_spec),
            labels=labels, results=results, temperature=sidecar.temperature,
            ood_threshold=sidecar.ood_threshold, request_id=call.request_id)

    def _check_labels(self, labels: list[str], templates: list[str]) -> None:
        if len(labels) < 2:
            raise ServingError.invalid_argument(
                f"{len(labels)} label(s); classification needs at least 2")
        seen: dict[str, int] = {}
        for i, label in enumerate(labels):
            if not label.strip():
                raise ServingError.invalid_argument(f"label {i} is empty")
            if label in seen:
                raise ServingError.invalid_argument(
                    f"label {i} ({label!r}) repeats label {seen[label]}")
            seen[label] = i
            self._check_text(label, f"label {i}")
        if len(labels) * len(templates) > self._config.max_labels:
            raise ServingError.invalid_argument(
                f"{len(labels)} labels x {len(templates)} prompt templates = "
                f"{len(labels) * len(templates)} prompts; at most {self._config.max_labels}")

    async def _report_outcome(self, request, call: _Call) -> pb.ReportOutcomeResponse:
        outcomes = [(o.index, o.true_label) for o in request.outcomes]
        if len(outcomes) > self._config.max_batch_items:
            raise ServingError.invalid_argument(
                f"{len(outcomes)} outcomes in one call; at most {self._config.max_batch_items}")
        prediction = self.live.report(request.request_id, outcomes)
        call.scale, call.precision = prediction.scale, prediction.precision
        spec = self._catalog.get(prediction.scale, prediction.precision, Tower.IMAGE)
        return pb.ReportOutcomeResponse(accepted=len(outcomes), endpoint=self._endpoint_pb(spec))

    async def _list_models(self) -> pb.ListModelsResponse:
        state = self._state()
        shares = self._routing().shares()
        infos = []
        for spec in self._catalog:
            car = spec.sidecar
            int8 = (car.output_formats or {}).get("int8")
            infos.append(pb.EndpointInfo(
                endpoint=self._endpoint_pb(spec),
                ready=state.is_ready(spec.name) and state.is_ready(spec.triton_model),
                image_size=car.image_size or 0, context_length=car.context_length or 0,
                max_batch_size=spec.max_batch_size, source=car.source,
                description=PRECISION_DESCRIPTIONS[spec.precision],
                quantization={str(k): v if isinstance(v, str) else json.dumps(v)
                              for k, v in (car.quantization or {}).items()},
                temperature=car.temperature or 0.0, ood_threshold=car.ood_threshold or 0.0,
                labels=car.labels or [],
                routing_weight=shares.get((spec.scale, spec.precision), 0.0),
                int8_ranges=(pb.Int8Ranges(lo=int8["lo"], hi=int8["hi"]) if int8 else None)))
        return pb.ListModelsResponse(
            endpoints=infos, scales=list(self._catalog.scales),
            precisions=[precision_to_pb(p) for p in self._catalog.precisions()])

    # -- bulk stream -----------------------------------------------------------------------

    async def _stream(self, request_iterator, call: _Call):
        """Yield one response per request item as items finish. At most stream_concurrency
        items are in flight or waiting to be written; the reader waits for a slot, so a client
        that sends faster than it reads is slowed down instead of growing our memory."""
        slots = asyncio.Semaphore(self._config.stream_concurrency)
        finished: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        end = object()

        async def run_item(request) -> None:
            await finished.put(await self._stream_item(request, call))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(run_item(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
                await finished.put(end)
            except BaseException as exc:  # hand the failure to the writer below
                await finished.put(exc)
                raise

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await finished.get()
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
                slots.release()  # only once written: buffered results count as in flight
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_item(self, request, stream_call: _Call) -> pb.EmbedStreamResponse:
        response = pb.EmbedStreamResponse(id=request.id)
        loop = asyncio.get_running_loop()
        call = _Call(deadline=min(stream_call.deadline,
                                  loop.time() + self._config.request_timeout_s),
                     method=stream_call.method, scale=stream_call.scale,
                     precision=stream_call.precision, request_id=stream_call.request_id)
        try:
            await _within(self._embed_item(request, call, response), call.remaining())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # per-item failure: reported in the item, stream goes on
            code, message = to_status(exc)
            response.ClearField("embedding")
            response.error.code = code.value[0]
            response.error.message = message
        return response

    async def _embed_item(self, request, call: _Call, response) -> None:
        kind = request.WhichOneof("item")
        what = f"item {request.id!r}"
        if kind is None:
            raise ServingError.invalid_argument(f"{what} has neither image nor text")
        tower = Tower.IMAGE if kind == "image" else Tower.TEXT
        # The stream's route was fixed when it opened; only the tower varies per item.
        spec = self._endpoint(call.scale, call.precision, tower)
        response.endpoint.CopyFrom(self._endpoint_pb(spec))
        if tower is Tower.IMAGE:
            waits: list[float] = []
            started = time.perf_counter()
            if spec.gpu_decode:
                batch = self._decoder.encoded([request.image], spec.sidecar.image_size, [what])
            else:
                batch = (await self._decoder.decode_one(request.image, spec.sidecar.image_size,
                                                        what, waits))[None]
            self._metrics.observe_phase(call.method, spec.scale, spec.precision,
                                        Phase.PREPROCESS, time.perf_counter() - started)
            self._metrics.observe_phase(call.method, spec.scale, spec.precision, Phase.QUEUE,
                                        max(waits, default=0.0))
            vectors = await self._embed(call, spec, batch)
            # Stream items are scored for the OOD rate but neither stored nor mirrored.
            self.live.score_images(spec, vectors, None, None)
            truncated = False
        else:
            self._check_text(request.text, what)
            started = time.perf_counter()
            ids, cut = await self.embedder.tokenize(spec, [request.text])
            self._metrics.observe_phase(call.method, spec.scale, spec.precision,
                                        Phase.PREPROCESS, time.perf_counter() - started)
            vectors = await self._embed(call, spec, ids)
            truncated = cut[0]
        response.embedding.values.extend(vectors[0].tolist())
        response.embedding.truncated = truncated
