"""Assemble and run the gateway: Triton (child or external), gRPC server, health, metrics.

:class:`Gateway` is the running program with an explicit ``start()``/``stop()`` so integration
tests can run it in-process on ephemeral ports; :func:`serve` adds signal handling for
``clipserve serve``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health as health_sync
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from clipserve.config import describe
from clipserve.endpoints import Precision, Tower

from .backend import Backend
from .config import ServerConfig
from .health import NOT_SERVING, HealthMonitor, catalog_warmups
from .images import ImageDecoder
from .metrics import Method, ServerMetrics
from .repository import Catalog
from .routing import RoutingPolicy
from .routing_file import RoutingSource
from .security import CallGuard, KeyFile, TlsFiles
from .service import ClipService
from .v1 import clipserve_pb2 as pb
from .v1 import clipserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


def scale_size(catalog: Catalog, scale: str) -> tuple[int, int, int]:
    """How large ``scale`` is, for picking a default: (embedding dimension, image size, bytes of
    its most precise image tower's model file, a stand-in for the parameter count; 0 when the
    repository holds only sidecars, as a gateway in front of a remote Triton may)."""
    specs = [s for s in catalog if s.scale == scale]
    images = sorted((s for s in specs if s.tower is Tower.IMAGE),
                    key=lambda s: list(Precision).index(s.precision))
    model_bytes = 0
    if images:
        model_bytes = sum(f.stat().st_size for f in images[0].directory.glob("1/model.onnx*"))
    return (max(s.sidecar.embed_dim for s in specs),
            max((s.sidecar.image_size or 0) for s in specs), model_bytes)


def resolve_default_scale(config: ServerConfig, catalog: Catalog) -> str:
    """The configured default scale; else the repository's only one; else the largest by
    :func:`scale_size` (ties: the name that sorts last), logged. Every other scale stays
    reachable through ``x-clip-scale`` (and ``<scale>_<precision>`` routing-file keys).

    Raises:
        ValueError: the configured scale is absent.
    """
    if config.default_scale:
        if config.default_scale not in catalog.scales:
            raise ValueError(f"default_scale {config.default_scale!r} is not in the repository "
                             f"(scales: {', '.join(catalog.scales)})")
        return config.default_scale
    if len(catalog.scales) == 1:
        return catalog.scales[0]
    chosen = max(catalog.scales, key=lambda s: (scale_size(catalog, s), s))
    log.info("the repository holds scales %s and no --default-scale was set: %s (the largest "
             "by embedding dimension, image size and model file size) takes calls that name "
             "no scale; the others answer to x-clip-scale", ", ".join(catalog.scales), chosen)
    return chosen


def default_policy(catalog: Catalog, scale: str) -> RoutingPolicy:
    """Without a routing file: the most precise precision of ``scale`` that has both towers
    (fp32 in a full export), else the most precise one present."""
    complete = [p for p in Precision if all(catalog.has(scale, p, t) for t in Tower)]
    present = [p for p in Precision if any(catalog.has(scale, p, t) for t in Tower)]
    return RoutingPolicy.single(scale, (complete or present)[0])


def count_refusals(metrics: ServerMetrics):
    """CallGuard's on_reject: calls refused before the servicer (no key, over the concurrency
    bound, unparsable body) are counted in clipserve_requests_total like any other outcome."""
    def count(method_path: str, code: grpc.StatusCode) -> None:
        try:
            method = Method(method_path.rsplit("/", 1)[-1])
        except ValueError:  # not one of ours (reflection)
            return
        metrics.observe_call(method, None, None, code, 0.0)
    return count


async def warm_request_path(decoder: ImageDecoder, catalog: Catalog, tokenizers: dict) -> None:
    """Run the gateway's own first-call costs before it reports SERVING: one PNG and one JPEG
    decoded and resized to each image size of the catalog (Pillow imports its format plugins
    and the decode pool starts its first thread on the first image: most of a first call's
    extra time on a small model), and one string through each tokenizer. Nothing is counted
    in the request metrics."""
    import io

    from PIL import Image

    start = time.perf_counter()
    for size in sorted({s.sidecar.image_size for s in catalog if s.tower is Tower.IMAGE}):
        for fmt in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            Image.new("RGB", (size + 1, size + 3), (90, 120, 150)).save(buffer, format=fmt)
            await decoder.decode([buffer.getvalue()], size)
    for tokenizer in tokenizers.values():
        tokenizer.encode(["a photo of a warm-up"])
    log.info("request path warmed up in %.1f ms (image decode, tokenizers)",
             (time.perf_counter() - start) * 1e3)


def load_tokenizers(catalog: Catalog) -> dict:
    """Text endpoint name -> its tokenizer (CLIP BPE, or the Hugging Face tokenizer the
    sidecar names: clipserve.tokenizer.load_tokenizer); raises ValueError when one is
    missing."""
    from clipserve.tokenizer import load_tokenizer

    tokenizers = {}
    for spec in catalog:
        if spec.tower is Tower.TEXT:
            if not spec.tokenizer_path.is_file():
                raise ValueError(f"text endpoint {spec.name} has no {spec.tokenizer_path.name}; "
                                 "re-export the repository")
            tokenizers[spec.name] = load_tokenizer(spec.tokenizer_path,
                                                   spec.sidecar.context_length,
                                                   spec.sidecar.tokenizer)
    return tokenizers


class Gateway:
    """The gateway process's parts, started and stopped in order.

    Args:
        config: validated config.
        backend: inject a backend (tests); default: a TritonBackend on ``config.triton_url``
            or on a tritonserver child started over the repository.
        registry: Prometheus registry (tests pass a fresh one).
        worker: one of ``--workers N`` (:mod:`.workers`): bind the ports with SO_REUSEPORT,
            which other workers share, and serve no /metrics (the parent serves all workers').
    """

    def __init__(self, config: ServerConfig, backend: Backend | None = None,
                 registry: CollectorRegistry | None = None, worker: bool = False):
        self.config = config
        self.worker = worker
        self.registry = registry or CollectorRegistry()
        self._backend = backend
        self._triton = None  # TritonProcess when we started one
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None  # plaintext probes (health_port)
        self._metrics_http = None
        self._http = None  # HttpApi when http_port is set
        self._decoder: ImageDecoder | None = None
        self._tasks: list[asyncio.Task] = []
        self.health = health_aio.HealthServicer()
        self.routing: RoutingSource | None = None
        self.catalog: Catalog | None = None
        self._tokenizers: dict = {}  # shared with the servicer: endpoints added later join it
        self._metrics: ServerMetrics | None = None
        self.monitor: HealthMonitor | None = None
        self.keys: KeyFile | None = None
        self.guard: CallGuard | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    async def start(self) -> None:
        """Read the repository, connect to (or start) Triton, start serving.

        Raises:
            ValueError: the repository, routing file, API key file or a TLS file is unusable.
            RuntimeError: the tritonserver child failed to start, or a port cannot be bound.
        """
        config = self.config
        log.info("clipserve serve: %s", describe(config))
        catalog = self.catalog = Catalog.from_repository(config.repository)
        scale = resolve_default_scale(config, catalog)
        tokenizers = self._tokenizers = load_tokenizers(catalog)
        metrics = self._metrics = ServerMetrics(self.registry, catalog.scales)
        self.routing = RoutingSource(config.routing_file, default_policy(catalog, scale), scale,
                                     catalog.targets(), metrics)
        for service in ("", *SERVICE_NAMES):
            await self.health.set(service, NOT_SERVING)
        # Key and TLS files are read before Triton starts, so a bad one fails the start fast.
        if config.api_keys_file is not None:
            self.keys = KeyFile(config.api_keys_file, SERVICE_NAMES)
        tls = (TlsFiles(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
               if config.tls_cert_file is not None else None)

        if self._backend is None:
            self._backend = await self._connect_triton()
        self._decoder = ImageDecoder(config.effective_decode_workers,
                                     config.effective_decode_queue, config.max_image_bytes,
                                     config.max_image_pixels,
                                     reduced_jpeg=config.reduced_jpeg_decode)
        if config.endpoint_warmup:
            await warm_request_path(self._decoder, catalog, tokenizers)
        # Each endpoint is routable once it has answered a warm-up request; SERVING once all
        # that Triton reports READY have (health.py).
        self.monitor = HealthMonitor(
            self._backend, self.health, SERVICE_NAMES, metrics, config.health_poll_s,
            warmups=catalog_warmups(catalog) if config.endpoint_warmup else None,
            warmup_timeout_s=config.endpoint_warmup_timeout_s,
            on_models=self._triton_models_changed)
        # An external Triton may come up after us (Kubernetes starts containers in any order):
        # serve anyway, NOT_SERVING and UNAVAILABLE until the monitor sees it ready.
        if not (await self.monitor.poll_once()).serving:
            log.warning("Triton at %s is not ready (or its endpoints not warmed up) yet; "
                        "health is NOT_SERVING until it is", getattr(self._backend, "url", "?"))

        service = ClipService(config=config, catalog=catalog, backend=self._backend,
                              decoder=self._decoder, tokenizers=tokenizers, metrics=metrics,
                              routing=lambda: self.routing.policy,
                              state=lambda: self.monitor.state)
        open_services = {health_sync.SERVICE_NAME}
        if not config.reflection_needs_key:
            open_services.add(reflection.SERVICE_NAME)
        self.guard = CallGuard(keys=lambda: self.keys.keys if self.keys else None,
                               open_services=open_services,
                               max_concurrent_calls=config.max_concurrent_calls,
                               on_reject=count_refusals(metrics))
        # gRPC core sets SO_REUSEPORT unless told not to: only workers share a port; a lone
        # gateway whose port is taken fails to start instead of splitting its traffic.
        reuse_port = ("grpc.so_reuseport", 1 if self.worker else 0)
        self._server = grpc.aio.server(interceptors=[self.guard], options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes), reuse_port,
        ])
        pb_grpc.add_EmbeddingServiceServicer_to_server(service, self._server)
        pb_grpc.add_ClassificationServiceServicer_to_server(service, self._server)
        pb_grpc.add_ModelServiceServicer_to_server(service, self._server)
        pb_grpc.add_FeedbackServiceServicer_to_server(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_sync.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"{config.host}:{config.port}"
        self.port = (self._server.add_secure_port(address, tls.credentials()) if tls
                     else self._server.add_insecure_port(address))
        if not self.port:
            raise RuntimeError(f"cannot bind gRPC port {address}")
        if config.health_port is not None:
            self._health_server = grpc.aio.server(options=[reuse_port])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{config.host}:{config.health_port}")
            if not self.health_port:
                raise RuntimeError(f"cannot bind health port {config.host}:{config.health_port}")
        if not self.worker:
            self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.host,
                                                      registry=self.registry)
            self.metrics_port = self._metrics_http.server_port
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        if config.http_port is not None:
            from .http_api import HttpApi

            self._http = HttpApi(
                service=service, catalog=catalog, metrics=metrics,
                keys=lambda: self.keys.keys if self.keys else None, guard=self.guard,
                ready=lambda: self.monitor.state.serving,
                max_body_bytes=config.max_message_bytes, default_scale=scale)
            self.http_port = await self._http.start(
                config.host, config.http_port, cert_file=config.tls_cert_file,
                key_file=config.tls_key_file, client_ca_file=config.tls_client_ca_file,
                grace_s=config.shutdown_grace_s, reuse_port=self.worker)
        self._tasks = [asyncio.create_task(self.monitor.run(), name="health"),
                       asyncio.create_task(self.routing.watch(config.routing_poll_s),
                                           name="routing"),
                       asyncio.create_task(service.run_background(), name="live-quality")]
        if self.keys is not None:
            self._tasks.append(asyncio.create_task(self.keys.watch(config.api_keys_poll_s),
                                                   name="api-keys"))
        log.info("serving gRPC on %s:%d (%s, %s, at most %s concurrent calls), metrics on "
                 "%s:%s%s", config.host, self.port,
                 "mutual TLS" if tls and tls.mutual else "TLS" if tls else "plaintext",
                 "API keys" if self.keys else "no API keys",
                 config.max_concurrent_calls or "unbounded", config.host,
                 self.metrics_port if not self.worker else "the parent's",
                 f", plaintext health on {config.host}:{self.health_port}"
                 if self._health_server is not None else "")
        if self._http is not None:
            log.info("serving the OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls
                     else "http", config.host, self.http_port)

    async def _connect_triton(self) -> Backend:
        from .triton_client import TritonBackend

        if self.config.triton_url:
            return TritonBackend(self.config.triton_url)
        from .triton_process import start_child

        self._triton = await start_child(self.config)
        return TritonBackend(self._triton.grpc_url)

    def refresh_catalog(self) -> tuple[list, list]:
        """Follow the repository: endpoints whose directory appeared join the catalog (their
        tokenizer, metric series and routing targets with them; the health monitor warms
        them up before they are routable), those whose directory is gone leave it. Called
        on SIGHUP and whenever Triton's READY model set changes. Returns (added, removed)."""
        if self.catalog is None:
            return [], []
        added, removed = self.catalog.refresh()
        for spec in added:
            if spec.tower is Tower.TEXT:
                try:
                    self._tokenizers.update(load_tokenizers([spec]))
                except ValueError as exc:  # served without text: calls get FAILED_PRECONDITION
                    log.error("%s", exc)
        for spec in removed:
            self._tokenizers.pop(spec.name, None)
        if added and self._metrics is not None:
            self._metrics.add_scales(s.scale for s in added)
            self._metrics.init_endpoints({(s.scale, s.precision) for s in added
                                          if s.tower is Tower.IMAGE})
        if added or removed:
            log.info("repository changed: added %s; removed %s",
                     ", ".join(s.name for s in added) or "none",
                     ", ".join(s.name for s in removed) or "none")
            if self.routing is not None:
                self.routing.set_available(self.catalog.targets())
        return added, removed

    def _triton_models_changed(self, models: frozenset[str]) -> None:
        if self.catalog is not None and ({m for m in models if self.catalog.by_name(m) is None}
                                         or {s.name for s in self.catalog} - models):
            self.refresh_catalog()

    def reload(self) -> None:
        """Re-read the repository (endpoints added or removed), the routing file, the API key
        file and the endpoints' sidecars now (SIGHUP)."""
        self.refresh_catalog()
        if self.routing is not None:
            self.routing.reload()
        if self.keys is not None:
            self.keys.reload()
        if self.catalog is not None:
            for name in self.catalog.reload_sidecars():
                spec = self.catalog.by_name(name)
                log.info("%s: sidecar revision %d (labels %s)", name, spec.sidecar.revision,
                         ", ".join(spec.sidecar.labels or ()) or "none")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace_s`` (default the
        config's), then stop health polling, Triton and the rest. Idempotent."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._health_server is not None:  # probes see NOT_SERVING until the drain ends
            await self._health_server.stop(0)
            self._health_server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._backend is not None:
            await self._backend.close()
            self._backend = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._triton is not None:
            await asyncio.to_thread(self._triton.stop)
            self._triton = None
        log.info("stopped")


def limit_blas_threads(threads: int) -> list[dict]:
    """Cap numpy's BLAS thread pools (OpenBLAS, MKL, BLIS) at ``threads`` in this process, at
    run time, with threadpoolctl (environment variables act only before numpy loads, and
    numpy is loaded by now); 0 leaves them alone. Returns the pools after the change, as
    threadpoolctl describes them."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads > 0:
        threadpool_limits(limits=threads, user_api="blas")
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    log.info("BLAS thread pools: %s", ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}"
                                                 for p in pools) or "none found")
    return pools


def run_loop(config: ServerConfig, worker: bool = False) -> int:
    """Run :func:`serve` to completion on the event loop ``config.event_loop`` names (auto:
    uvloop where installed, else asyncio's; see :func:`event_loop_runner`)."""
    return event_loop_runner(config.event_loop)(serve(config, worker=worker))


def event_loop_runner(name: str):
    """``asyncio.run`` or ``uvloop.run`` for ``--event-loop`` NAME.

    Raises:
        RuntimeError: uvloop asked for by name but not installed (the message says how to
            get it).
    """
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise RuntimeError("--event-loop uvloop: uvloop is not installed "
                                   "(pip install uvloop), or use --event-loop asyncio") from None
        else:
            return uvloop.run
    return asyncio.run


async def serve(config: ServerConfig, worker: bool = False) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the routing and API key files. Returns an
    exit code. With more than one worker (config.workers; 0: one per available core) this
    process supervises that many gateway processes instead (:mod:`.workers`).

    A signal that arrives while a tritonserver child is starting takes effect once the start
    returns (bounded by triton_start_timeout_s): stopping it half-way would orphan the child.
    """
    if not worker:
        from .workers import effective_workers, serve_workers

        workers = effective_workers(config)
        if workers > 1:
            return await serve_workers(config, workers)
    limit_blas_threads(config.blas_threads)
    gateway = Gateway(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker:  # a Ctrl-C reaches the whole process group: the parent stops the workers
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        await gateway.start()
        loop.add_signal_handler(signal.SIGHUP, gateway.reload)
        await stop.wait()
        log.info("shutting down: draining calls for up to %.1f s", config.shutdown_grace_s)
    finally:
        await gateway.stop()
    return 0
