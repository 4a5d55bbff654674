"""The gateway's one config object: flags, ``CLIPSERVE_*`` env vars and defaults come from here.

``clipserve serve --help`` lists every field with its env var; see :mod:`clipserve.config` for the
resolution order. Routing weights live in the optional routing file (reloaded at run time), not
here, because they change without a restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_MIB = 1024 * 1024


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
        "scale for calls and routing weights that name none; empty: the repository must "
        "hold exactly one scale"))
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
        "largest gRPC request message"))
    decode_workers: int = field(default=0, metadata=_help(
        "threads decoding and resizing images; 0: one per CPU"))
    decode_queue: int = field(default=0, metadata=_help(
        "images waiting for a decode thread before further calls wait; 0: 8 per worker"))
    stream_concurrency: int = field(default=64, metadata=_help(
        "items of one EmbedStream call in flight at once (the rest wait: backpressure)"))
    request_timeout_s: float = field(default=30.0, metadata=_help(
        "deadline for calls whose client sets none, and upper bound for those that do"))
    health_poll_s: float = field(default=1.0, metadata=_help(
        "how often Triton readiness is polled into gRPC health"))
    shutdown_grace_s: float = field(default=10.0, metadata=_help(
        "on SIGTERM/SIGINT, how long in-flight calls may take to finish"))
    log_level: str = field(default="INFO", metadata=_help("Python logging level"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.routing_file is not None:
            object.__setattr__(self, "routing_file", Path(self.routing_file))
        problems = []
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                problems.append(f"{name} must be 0..65535, got {value}")
        if self.port and self.port == self.metrics_port:
            problems.append(f"port and metrics_port are both {self.port}")
        for name in ("max_batch_items", "max_image_bytes", "max_image_pixels",
                     "max_text_chars", "max_labels", "max_message_bytes",
                     "stream_concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("decode_workers", "decode_queue"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 (automatic) or more, got {getattr(self, name)}")
        for name in ("triton_start_timeout_s", "routing_poll_s", "request_timeout_s",
                     "health_poll_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown_grace_s must be 0 or more, got {self.shutdown_grace_s}")
        if self.triton_url and ("://" in self.triton_url or ":" not in self.triton_url):
            problems.append(f"triton_url must be host:port (gRPC, no scheme), got "
                            f"{self.triton_url!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems.append(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got "
                            f"{self.log_level!r}")
        if problems:
            raise ValueError("invalid server config: " + "; ".join(problems))

    @property
    def effective_decode_workers(self) -> int:
        """Decode threads after resolving 0 to the CPU count."""
        return self.decode_workers or os.cpu_count() or 1

    @property
    def effective_decode_queue(self) -> int:
        """Decode queue bound after resolving 0 to 8 per worker."""
        return self.decode_queue or 8 * self.effective_decode_workers
