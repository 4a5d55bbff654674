"""The gateway's one config object: flags, ``CLIPSERVE_*`` env vars and defaults come from here.

``clipserve serve --help`` lists every field with its env var; see :mod:`clipserve.config` for the
resolution order. Routing weights live in the optional routing file (reloaded at run time), not
here, because they change without a restart.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from clipserve.endpoints import Precision

_MIB = 1024 * 1024
EVENT_LOOPS = ("auto", "asyncio", "uvloop")  # --event-loop (server/app.py run_loop)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``clipserve serve`` needs. Validated on construction (raises ValueError)."""

    repository: Path = field(default=Path("model_repository"), metadata=_help(
        "Triton model repository written by `clipserve export` (sidecars and tokenizers are "
        "read from it even when Triton runs elsewhere)"))
    host: str = field(default="0.0.0.0", metadata=_help(
        "address the gRPC and metrics servers bind to"))
    port: int = field(default=50051, metadata=_help("gRPC port (0: any free port)"))
    metrics_port: int = field(default=9464, metadata=_help(
        "Prometheus /metrics port (0: any free port)"))
    triton_url: str = field(default="", metadata=_help(
        "host:port of an external Triton gRPC endpoint; empty: start tritonserver on the "
        "repository as a child process"))
    triton_start_timeout_s: float = field(default=180.0, metadata=_help(
        "how long a child tritonserver may take until every model is ready"))
    routing_file: Path | None = field(default=None, metadata=_help(
        "JSON file with the A/B weights for calls without x-clip-scale/x-clip-precision, "
        "e.g. {\"weights\": {\"fp32\": 90, \"int8\": 10}}; reloaded on change and on SIGHUP. "
        "Without it every such call goes to the default scale's most precise precision "
        "(fp32 in a full export)"))
    routing_poll_s: float = field(default=2.0, metadata=_help(
        "how often the routing file's modification time is checked"))
    default_scale: str = field(default="", metadata=_help(
        "scale for calls and routing weights that name none; empty: the repository's only "
        "scale, or with several the largest (embedding dimension, then image size, then "
        "fp32 image model file size), logged at start; every scale stays reachable by "
        "x-clip-scale"))
    max_batch_items: int = field(default=64, metadata=_help(
        "most images or texts in one call (more: INVALID_ARGUMENT)"))
    max_image_bytes: int = field(default=16 * _MIB, metadata=_help(
        "largest encoded image accepted, in bytes"))
    max_image_pixels: int = field(default=40_000_000, metadata=_help(
        "largest width*height accepted, checked from the header before decoding "
        "(decompression-bomb guard)"))
    max_text_chars: int = field(default=10_000, metadata=_help(
        "longest text accepted, in characters (longer token sequences are truncated to the "
        "context length; this only bounds tokenizer work)"))
    max_labels: int = field(default=1000, metadata=_help(
        "most labels x prompt templates in one Classify call"))
    max_message_bytes: int = field(default=64 * _MIB, metadata=_help(
        "largest gRPC request message (larger: RESOURCE_EXHAUSTED from gRPC itself)"))
    max_concurrent_calls: int = field(default=256, metadata=_help(
        "clipserve.v1 calls in progress at once (a stream counts as one while open); more get "
        "RESOURCE_EXHAUSTED at once instead of waiting in an unbounded queue. 0: no bound"))
    tls_cert_file: Path | None = field(default=None, metadata=_help(
        "PEM certificate chain for TLS on the gRPC port (with tls_key_file); unset: plaintext. "
        "Re-read when it changes"))
    tls_key_file: Path | None = field(default=None, metadata=_help(
        "PEM private key of tls_cert_file"))
    tls_client_ca_file: Path | None = field(default=None, metadata=_help(
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS); needs "
        "tls_cert_file"))
    api_keys_file: Path | None = field(default=None, metadata=_help(
        "file of API keys, one per line (optionally followed by the services it may call, "
        "e.g. 'KEY EmbeddingService,ModelService'); calls then need metadata "
        "'authorization: Bearer KEY'. Re-read when it changes and on SIGHUP. Unset: no keys"))
    api_keys_poll_s: float = field(default=5.0, metadata=_help(
        "how often the API key file's modification time is checked"))
    reflection_needs_key: bool = field(default=True, metadata=_help(
        "with api_keys_file: server reflection needs a key too (health never does)"))
    health_port: int | None = field(default=None, metadata=_help(
        "extra plaintext port serving only grpc.health.v1, without TLS or key, for Kubernetes "
        "gRPC probes (which cannot do TLS); 0: any free port; unset: none"))
    http_port: int | None = field(default=None, metadata=_help(
        "port of the OpenAI-compatible HTTP API (POST /v1/embeddings, /v1/classify, "
        "/v1/feedback, GET /v1/models, /health/live, /health/ready), served in the same process "
        "with the same routing, limits, API keys and TLS files as gRPC; 0: any free port; "
        "unset: no HTTP API"))
    decode_workers: int = field(default=0, metadata=_help(
        "threads decoding and resizing images; 0: one per CPU"))
    blas_threads: int = field(default=1, metadata=_help(
        "threads numpy's BLAS may use in the gateway (live scoring: cosines to the labels, "
        "Mahalanobis/kNN OOD scores). 1 (default): these matrices are small, and BLAS worker "
        "threads spin (sched_yield) between them on the cores Triton needs; measured on "
        "ViT-B-32 int8 on 2 cores: 6.8 -> 1.8 ms of gateway CPU per image, 57 -> 97 img/s. "
        "0: the BLAS library's own default"))
    event_loop: str = field(default="auto", metadata=_help(
        "the event loop the gateway runs on: auto (uvloop where it is installed, as it is with "
        "clipserve on Linux and macOS; else asyncio), uvloop (libuv; fails if missing) or "
        "asyncio (the standard library's). Measured on digits-s, 2 cores, 8 callers: uvloop "
        "1.09-1.11x the items/s of asyncio (BENCHMARKS.md)"))
    decode_queue: int = field(default=0, metadata=_help(
        "decode jobs (one per call, or one per worker for a large batch) waiting for a "
        "thread before further calls wait; 0: 8 per worker"))
    reduced_jpeg_decode: bool = field(default=True, metadata=_help(
        "decode JPEGs at least twice the model input on both sides at 1/2, 1/4 or 1/8 scale "
        "(libjpeg DCT scaling) before the bicubic resize: about half the decode CPU of a "
        "640x480 photo at 224 px, embeddings at cosine >= 0.999 to the exact path "
        "(BENCHMARKS.md, issue 10); off: every image takes the exact open_clip transform"))
    coalesce: bool = field(default=True, metadata=_help(
        "while an endpoint's Triton requests are in flight (one per model instance), chunks of "
        "further calls to it wait and then go as one request of up to its max_batch_size "
        "(no timer: nothing waits unless Triton is busy with that endpoint); off: every "
        "chunk goes at once and only Triton's dynamic batcher merges them"))
    stream_concurrency: int = field(default=64, metadata=_help(
        "items of one EmbedStream call in flight at once (the rest wait: backpressure)"))
    request_timeout_s: float = field(default=30.0, metadata=_help(
        "deadline for calls whose client sets none, and upper bound for those that do"))
    endpoint_warmup: bool = field(default=True, metadata=_help(
        "send each endpoint one warm-up request when Triton reports it READY; it is routable, "
        "and health SERVING, only once it (and every other READY endpoint) has answered"))
    endpoint_warmup_timeout_s: float = field(default=60.0, metadata=_help(
        "deadline of one warm-up request (retried at the next health poll)"))
    health_poll_s: float = field(default=1.0, metadata=_help(
        "how often Triton readiness is polled into gRPC health"))
    shutdown_grace_s: float = field(default=10.0, metadata=_help(
        "on SIGTERM/SIGINT, how long in-flight calls may take to finish"))
    triton_repository_poll_s: int = field(default=2, metadata=_help(
        "how often (whole seconds) the tritonserver child polls the repository for endpoints "
        "added, changed or removed (Triton's --model-control-mode=poll), so a precision can "
        "be added to or removed from a running deployment; the gateway's catalog follows "
        "what Triton loads. 0: the repository is fixed at start (model control none). Not "
        "used with triton_url: start that Triton with the same flags"))
    triton_metrics_address: str = field(default="127.0.0.1", metadata=_help(
        "address the tritonserver child's Prometheus port binds to; 0.0.0.0 to be scraped at "
        "the pod IP (its gRPC and HTTP ports stay on 127.0.0.1 behind the gateway). Not used "
        "with triton_url"))
    triton_metrics_port: int = field(default=0, metadata=_help(
        "Prometheus port of the tritonserver child (Triton's own metrics, bound on "
        "triton_metrics_address); 0: any "
        "free port, logged at start. Not used with triton_url: scrape that Triton directly"))
    ood_labels: tuple[str, ...] = field(default=(), metadata=_help(
        "the deployment's in-distribution labels, comma-separated: every image served is scored "
        "against them (MCM) for the live OOD rate. Empty: each image endpoint's own label set, "
        "the one its OOD threshold was fitted on"))
    ood_prompts: tuple[str, ...] = field(default=(), metadata=_help(
        "prompt templates for the live OOD label set, comma-separated, each with {} for the "
        "label. Empty: the sidecar's templates (or, with ood_labels, the labels verbatim)"))
    calibration_window: int = field(default=1000, metadata=_help(
        "outcomes per endpoint in the sliding window behind clipserve_calibration_ece and "
        "clipserve_calibration_accuracy (fed by ReportOutcome)"))
    outcome_ttl_s: float = field(default=3600.0, metadata=_help(
        "how long a call's predictions are kept for ReportOutcome"))
    outcome_store_mib: int = field(default=64, metadata=_help(
        "memory for predictions kept for ReportOutcome, in MiB; the oldest go first"))
    outcome_sample_fraction: float = field(default=1.0, metadata=_help(
        "share of EmbedImages/Classify calls whose predictions are kept for ReportOutcome "
        "when the call does not say (header x-clip-store-prediction: 1 always keeps, 0 never); "
        "1: every call, as before; 0: only calls that ask, which saves the store's work on "
        "every other call"))
    label_cache_mib: int = field(default=64, metadata=_help(
        "memory for cached label text embeddings (live OOD and Classify), in MiB"))
    shadow_fraction: float = field(default=0.0, metadata=_help(
        "share of image calls (EmbedImages, Classify) mirrored in the background to "
        "shadow_precision for top-1 agreement, cosine and KL metrics; 0: off"))
    shadow_precision: str = field(default="fp32", metadata=_help(
        "the reference precision shadow calls are compared against"))
    shadow_queue_mib: int = field(default=32, metadata=_help(
        "memory for mirrored calls waiting to be compared, in MiB; when full, calls are not "
        "mirrored (counted in clipserve_shadow_dropped_total) and never wait"))
    workers: int = field(default=1, metadata=_help(
        "gateway processes sharing the gRPC (and HTTP, health) port with SO_REUSEPORT, so "
        "the gateway uses that many cores; the parent process starts the tritonserver child, "
        "serves /metrics summed over the workers (prometheus_client multiprocess mode) and "
        "stops them. 0: the cores this container may use (CPU affinity, capped by the cgroup "
        "CPU quota); 1 (default): one process. Each worker keeps its own ReportOutcome "
        "store, so with N > 1 an outcome must come back on its call's connection"))
    log_level: str = field(default="INFO", metadata=_help("Python logging level"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.routing_file is not None:
            object.__setattr__(self, "routing_file", Path(self.routing_file))
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "api_keys_file"):
            value = getattr(self, name)
            # An empty env var (a Kubernetes base that leaves it blank) means unset.
            object.__setattr__(self, name, None if value is None or str(value) in ("", ".")
                               else Path(value))
        problems = []
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                problems.append(f"{name} must be 0..65535, got {value}")
        if self.port and self.port == self.metrics_port:
            problems.append(f"port and metrics_port are both {self.port}")
        if self.health_port is not None:
            if not 0 <= self.health_port <= 65535:
                problems.append(f"health_port must be 0..65535, got {self.health_port}")
            elif self.health_port and self.health_port in (self.port, self.metrics_port):
                problems.append(f"health_port {self.health_port} is also port or metrics_port")
        if self.http_port is not None:
            if not 0 <= self.http_port <= 65535:
                problems.append(f"http_port must be 0..65535, got {self.http_port}")
            elif self.http_port and self.http_port in (self.port, self.metrics_port,
                                                       self.health_port):
                problems.append(f"http_port {self.http_port} is also port, metrics_port or "
                                "health_port")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                            "tls_key_file")
        if self.event_loop not in EVENT_LOOPS:
            problems.append(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got "
                            f"{self.event_loop!r}")
        if self.workers < 0:
            problems.append(f"workers must be 0 (one per available core) or more, got "
                            f"{self.workers}")
        if self.max_concurrent_calls < 0:
            problems.append(f"max_concurrent_calls must be 0 (no bound) or more, got "
                            f"{self.max_concurrent_calls}")
        for name in ("max_batch_items", "max_image_bytes", "max_image_pixels",
                     "max_text_chars", "max_labels", "max_message_bytes",
                     "stream_concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("decode_workers", "decode_queue", "blas_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 (automatic) or more, got {getattr(self, name)}")
        for name in ("triton_start_timeout_s", "routing_poll_s", "request_timeout_s",
                     "health_poll_s", "api_keys_poll_s", "endpoint_warmup_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown_grace_s must be 0 or more, got {self.shutdown_grace_s}")
        if self.triton_url and ("://" in self.triton_url or ":" not in self.triton_url):
            problems.append(f"triton_url must be host:port (gRPC, no scheme), got "
                            f"{self.triton_url!r}")
        problems += self._live_quality_problems()
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems.append(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got "
                            f"{self.log_level!r}")
        if problems:
            raise ValueError("invalid server config: " + "; ".join(problems))

    def _live_quality_problems(self) -> list[str]:
        problems = []
        try:
            ipaddress.ip_address(self.triton_metrics_address)
        except ValueError:
            problems.append(f"triton_metrics_address must be an IP address (e.g. 127.0.0.1 or "
                            f"0.0.0.0), got {self.triton_metrics_address!r}")
        if self.triton_repository_poll_s < 0:
            problems.append(f"triton_repository_poll_s must be 0 (no polling) or more, got "
                            f"{self.triton_repository_poll_s}")
        if not 0 <= self.triton_metrics_port <= 65535:
            problems.append(f"triton_metrics_port must be 0..65535, got {self.triton_metrics_port}")
        if self.ood_labels and (len(self.ood_labels) < 2
                                or len(set(self.ood_labels)) != len(self.ood_labels)):
            problems.append(f"ood_labels must be at least 2 distinct labels, got "
                            f"{','.join(self.ood_labels)!r}")
        for template in self.ood_prompts:
            if "{}" not in template:
                problems.append(f"ood_prompts template {template!r} has no {{}} for the label")
        for name in ("calibration_window", "outcome_store_mib", "label_cache_mib",
                     "shadow_queue_mib"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.outcome_ttl_s <= 0:
            problems.append(f"outcome_ttl_s must be positive, got {self.outcome_ttl_s}")
        if not 0.0 <= self.outcome_sample_fraction <= 1.0:
            problems.append(
                f"outcome_sample_fraction must be 0..1, got {self.outcome_sample_fraction}")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            problems.append(f"shadow_fraction must be 0..1, got {self.shadow_fraction}")
        try:
            Precision.parse(self.shadow_precision)
        except ValueError as exc:
            problems.append(f"shadow_precision: {exc}")
        return problems

    @property
    def shadow_reference(self) -> Precision:
        """shadow_precision as a Precision."""
        return Precision.parse(self.shadow_precision)

    @property
    def effective_decode_workers(self) -> int:
        """Decode threads after resolving 0 to the CPU count."""
        return self.decode_workers or os.cpu_count() or 1

    @property
    def effective_decode_queue(self) -> int:
        """Decode queue bound after resolving 0 to 8 per worker."""
        return self.decode_queue or 8 * self.effective_decode_workers
