"""``clipserve loadtest``'s one config object (flags and ``CLIPSERVE_*`` env vars come from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipserve.endpoints import Precision

from .runner import parse_sweep
from .stats import ARRIVALS
from .targets import check_address
from .workload import parse_mix

MAX_DURATION_S = 3600.0  # one run (or one sweep step) never goes longer than an hour


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class LoadtestConfig:
    """Everything ``clipserve loadtest`` takes. Validated on construction (raises ValueError)."""

    target: str = field(default="127.0.0.1:50051", metadata=_help(
        "HOST:PORT of the clipserve gateway; the only address traffic is sent to"))
    protocol: str = field(default="grpc", metadata=_help(
        "front end to drive: grpc (clipserve.v1) or http (the OpenAI-compatible API; --target is "
        "then the gateway's --http-port)"))
    concurrency: int = field(default=8, metadata=_help(
        "closed loop: callers each sending their next call when the last returns"))
    rate: float = field(default=0.0, metadata=_help(
        "open loop: requests per second (> 0 switches to open loop); latency counts from each "
        "request's scheduled time"))
    arrival: str = field(default="poisson", metadata=_help(
        "open loop arrivals: 'poisson' (exponential gaps) or 'fixed' (even spacing)"))
    duration: float = field(default=10.0, metadata=_help(
        "seconds to send for (each sweep step too); the run always stops by itself"))
    requests: int = field(default=0, metadata=_help(
        "stop after this many requests if that comes before the duration; 0: no count bound"))
    warmup: float = field(default=0.0, metadata=_help(
        "seconds at the start left out of the statistics (still sent)"))
    mix: str = field(default="image", metadata=_help(
        "calls by ratio, e.g. 'image:3,text:1,classify:1' (EmbedImages, EmbedTexts, Classify)"))
    batch: int = field(default=1, metadata=_help("images or texts per call"))
    images: str = field(default="", metadata=_help(
        "folder of JPEG/PNG/WebP files to send; empty: the built-in digits set"))
    image_size: int = field(default=64, metadata=_help(
        "side in pixels of the built-in images (the server resizes to the model's input)"))
    texts: str = field(default="", metadata=_help(
        "file with one text per line; empty: built-in captions"))
    scale: str = field(default="", metadata=_help(
        "x-clip-scale header on every call; empty: not sent"))
    precision: str = field(default="", metadata=_help(
        "x-clip-precision header on every call (fp32, fp16, int8, int4); empty: not sent, "
        "so the server's A/B split decides"))
    routing_keys: int = field(default=0, metadata=_help(
        "send x-clip-routing-key from this many distinct keys (lt-0, lt-1, ...) so the "
        "server's sticky split sees many users; 0: none"))
    timeout: float = field(default=30.0, metadata=_help("deadline of each call in seconds"))
    api_key: str = field(default="", metadata=_help(
        "API key sent as 'authorization: Bearer KEY' (prefer the env var to the flag: flags "
        "show in the process list); never written to the JSON"))
    tls: bool = field(default=False, metadata=_help(
        "connect with TLS, checking the server against the system's CA roots"))
    tls_ca_file: str = field(default="", metadata=_help(
        "PEM CA certificate to check the server's TLS certificate against (implies --tls)"))
    max_in_flight: int = field(default=1024, metadata=_help(
        "open loop: most calls outstanding; a call due beyond it is counted DROPPED, not sent"))
    sweep: str = field(default="", metadata=_help(
        "run one step per load level and find saturation and the SLO knee: "
        "'concurrency:1,2,4,8' or 'rate:5,10,20'"))
    slo_ms: float = field(default=200.0, metadata=_help("p99 latency SLO for the sweep knee"))
    json: str = field(default="", metadata=_help("write the results as JSON to this file"))
    plot: str = field(default="", metadata=_help(
        "write a PNG: latency CDF and throughput over time per endpoint (sweep: throughput "
        "and p99 against load)"))
    seed: int = field(default=0, metadata=_help("seed for arrivals and the call mix"))
    quiet: bool = field(default=False, metadata=_help("no live progress line"))

    def __post_init__(self) -> None:
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for fn, value in ((check_address, self.target), (parse_mix, self.mix)):
            try:
                fn(value)
            except ValueError as exc:
                problems.append(str(exc))
        if self.sweep:
            try:
                parse_sweep(self.sweep)
            except ValueError as exc:
                problems.append(str(exc))
        if self.precision:
            try:
                Precision.parse(self.precision)
            except ValueError as exc:
                problems.append(str(exc))
        check(self.protocol in ("grpc", "http"),
              f"protocol must be grpc or http, got {self.protocol!r}")
        check(self.concurrency >= 1, f"concurrency must be at least 1, got {self.concurrency}")
        check(self.rate >= 0, f"rate must be 0 (closed loop) or positive, got {self.rate}")
        check(self.arrival in ARRIVALS, f"arrival must be one of {', '.join(ARRIVALS)}, got "
                                        f"{self.arrival!r}")
        check(0 < self.duration <= MAX_DURATION_S,
              f"duration must be in (0, {MAX_DURATION_S:g}] seconds, got {self.duration}")
        check(0 <= self.warmup < self.duration,
              f"warmup must be in [0, duration), got {self.warmup}")
        check(self.requests >= 0, f"requests must be 0 or more, got {self.requests}")
        check(self.batch >= 1, f"batch must be at least 1, got {self.batch}")
        check(self.image_size >= 8, f"image_size must be at least 8, got {self.image_size}")
        check(self.routing_keys >= 0, f"routing_keys must be 0 or more, got {self.routing_keys}")
        check(self.timeout > 0, f"timeout must be positive, got {self.timeout}")
        check(self.max_in_flight >= 1, f"max_in_flight must be at least 1, got "
                                       f"{self.max_in_flight}")
        check(self.slo_ms > 0, f"slo_ms must be positive, got {self.slo_ms}")
        if problems:
            raise ValueError("invalid loadtest config: " + "; ".join(problems))

    @property
    def open_loop(self) -> bool:
        return self.rate > 0
