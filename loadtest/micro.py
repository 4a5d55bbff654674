"""The servicer's own cost per call: CPU microseconds of EmbedImages, EmbedTexts and Classify
against an in-process fake backend, no sockets, no Triton.

    python -m clipserve.loadtest.micro --json micro.json

What it measures is the gateway's Python between the handler and the backend and back: routing,
validation, metric updates, live scoring, decoding small images, building the response. The fake
backend returns fixed embeddings at once, so Triton's and gRPC's costs are not in the numbers.
CPU time is ``time.process_time`` (every thread of the process, so decode threads count) divided
by the calls made. The machine is shared: the JSON records the CPU model, its flags and
``os.getloadavg()`` before and after, so two runs can be compared honestly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from clipserve import cpu
from clipserve.endpoints import Precision, Sidecar, Tower, endpoint_name
from clipserve.server.config import ServerConfig
from clipserve.server.health import BackendState
from clipserve.server.images import ImageDecoder
from clipserve.server.metrics import ServerMetrics
from clipserve.server.repository import Catalog
from clipserve.server.routing import RoutingPolicy
from clipserve.server.service import ClipService
from clipserve.server.v1 import clipserve_pb2 as pb

from .workload import builtin_images

SCALE = "micro"
DIM = 64  # digits-s's embedding width
IMAGE_SIZE = 32  # digits-s's input side
CONTEXT = 16
MAX_BATCH = 32
LABELS = [str(i) for i in range(10)]
# "+packed": the same call with pack_float32 (embeddings as one bytes field, issue 10).
METHODS = ("EmbedImages", "EmbedImages+packed", "EmbedTexts", "EmbedTexts+packed", "Classify")
# The client's share: parse the serialized response and decode it as clipserve.client does.
CLIENT_METHODS = ("client:EmbedImages", "client:EmbedImages+packed")


@dataclass(frozen=True)
class MicroResult:
    """One (method, batch) measurement."""

    method: str
    batch: int
    calls: int
    cpu_us_per_call: float
    cpu_us_per_item: float
    wall_us_per_call: float


def _write_repository(root: Path) -> None:
    for tower in Tower:
        image = tower is Tower.IMAGE
        d = root / endpoint_name(SCALE, Precision.FP32, tower)
        d.mkdir(parents=True)
        Sidecar(scale=SCALE, precision="fp32", tower=tower.value, embed_dim=DIM,
                source="micro::fake", image_size=IMAGE_SIZE if image else None,
                context_length=None if image else CONTEXT,
                temperature=0.05 if image else None, ood_threshold=0.3 if image else None,
                quantization={"method": "none"}, labels=LABELS if image else None,
                prompts=["a photo of {}"] if image else None).write(d)
        (d / "config.pbtxt").write_text(
            f'name: "{d.name}"\nmax_batch_size: {MAX_BATCH}\n'
            "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n")
    (root / "report.json").write_text("{}")


class _Backend:
    """Returns unit vectors at once: only the servicer's own work is left to measure."""

    def __init__(self):
        rng = np.random.default_rng(0)
        v = rng.normal(size=(MAX_BATCH, DIM)).astype(np.float32)
        self._rows = v / np.linalg.norm(v, axis=1, keepdims=True)

    async def embed(self, model, input_name, batch, timeout_s):
        n = len(batch)
        return self._rows[np.arange(n) % MAX_BATCH]

    async def server_ready(self, timeout_s):
        return True

    async def ready_models(self, timeout_s):
        return frozenset()

    async def close(self):
        pass


class _Tokenizer:
    def encode(self, texts):
        ids = np.zeros((len(texts), CONTEXT), np.int32)
        for i, text in enumerate(texts):
            row = [49406, *(1 + ord(c) % 1000 for c in text[:CONTEXT - 2]), 49407]
            ids[i, :len(row)] = row
        return ids, [len(t) > CONTEXT - 2 for t in texts]


class _Context:
    """The parts of grpc.aio.ServicerContext the servicer uses."""

    def __init__(self):
        self.initial_metadata = None

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    async def send_initial_metadata(self, metadata):
        self.initial_metadata = metadata

    async def abort(self, code, details=""):
        raise RuntimeError(f"{code}: {details}")


async def _measure(service: ClipService, method: str, request, calls: int,
                   warmup: int) -> tuple[float, float]:
    handler = getattr(service, method.split("+")[0])
    for _ in range(warmup):
        await handler(request, _Context())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await handler(request, _Context())
    return ((time.process_time() - cpu0) / calls * 1e6,
            (time.perf_counter() - wall0) / calls * 1e6)


def _requests(batch: int) -> dict[str, object]:
    images = (builtin_images(batch, IMAGE_SIZE, seed=0) * batch)[:batch]
    texts = [f"a photo of the digit {i}" for i in range(batch)]
    return {"EmbedImages": pb.EmbedImagesRequest(images=images),
            "EmbedImages+packed": pb.EmbedImagesRequest(images=images, pack_float32=True),
            "EmbedTexts": pb.EmbedTextsRequest(texts=texts),
            "EmbedTexts+packed": pb.EmbedTextsRequest(texts=texts, pack_float32=True),
            "Classify": pb.ClassifyRequest(images=images)}


async def _measure_client(service: ClipService, request, calls: int) -> tuple[float, float]:
    """CPU and wall us per call of the client's decode of one EmbedImages response."""
    from clipserve.client import Client
    from clipserve.formats import OutputFormat

    wire = (await service.EmbedImages(request, _Context())).SerializeToString()
    client = Client("127.0.0.1:1")  # its decode only; the channel never connects
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            client._embeddings(pb.EmbedImagesResponse.FromString(wire), OutputFormat.FLOAT32,
                               None)
        return ((time.process_time() - cpu0) / calls * 1e6,
                (time.perf_counter() - wall0) / calls * 1e6)
    finally:
        client.close()


async def run(batches=(1, 32), calls: int = 300, warmup: int = 30,
              outcome_sample_fraction: float = 1.0, coalesce: bool = True) -> list[MicroResult]:
    """Measure each method at each batch size; ``calls`` is for batch 1 (fewer for larger
    batches, so each cell costs about the same). ``outcome_sample_fraction``: the server
    config's (1.0 stores every call's predictions for ReportOutcome, as by default)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        _write_repository(root)
        catalog = Catalog.from_repository(root)
        config = ServerConfig(repository=root, max_batch_items=max(batches),
                              outcome_sample_fraction=outcome_sample_fraction,
                              coalesce=coalesce)
        decoder = ImageDecoder(config.effective_decode_workers, config.effective_decode_queue,
                               config.max_image_bytes, config.max_image_pixels)
        state = BackendState(True, frozenset(s.name for s in catalog))
        service = ClipService(
            config=config, catalog=catalog, backend=_Backend(), decoder=decoder,
            tokenizers={s.name: _Tokenizer() for s in catalog if s.tower is Tower.TEXT},
            metrics=ServerMetrics(CollectorRegistry(), catalog.scales),
            routing=lambda: RoutingPolicy.single(SCALE), state=lambda: state,
            rng=random.Random(0))
        background = asyncio.create_task(service.run_background())
        try:
            # Let the deployment label set be embedded, so EmbedImages is scored live as in
            # production (not counted as labels_pending).
            for _ in range(200):
                if all(service.live.labels.has(k) for k in service.live.deployment_keys()):
                    break
                await asyncio.sleep(0.01)
            for batch in batches:
                n = max(10, calls // batch)
                requests = _requests(batch)
                for method in METHODS:
                    cpu_us, wall_us = await _measure(service, method, requests[method], n,
                                                     max(3, warmup // batch))
                    results.append(MicroResult(method, batch, n, round(cpu_us, 1),
                                               round(cpu_us / batch, 1), round(wall_us, 1)))
                for method in CLIENT_METHODS:
                    cpu_us, wall_us = await _measure_client(
                        service, requests[method.removeprefix("client:")], 10 * n)
                    results.append(MicroResult(method, batch, 10 * n, round(cpu_us, 1),
                                               round(cpu_us / batch, 1), round(wall_us, 1)))
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
            decoder.close()
    return results


def table(results: list[MicroResult]) -> str:
    """Results as a fixed-width text table."""
    lines = [f"{'method':<26} {'batch':>5} {'calls':>6} {'cpu us/call':>12} {'cpu us/item':>12} "
             f"{'wall us/call':>13}"]
    for r in results:
        lines.append(f"{r.method:<26} {r.batch:>5} {r.calls:>6} {r.cpu_us_per_call:>12.1f} "
                     f"{r.cpu_us_per_item:>12.1f} {r.wall_us_per_call:>13.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the microbenchmark, print the table, optionally write JSON."""
    global DIM  # --dim sets the fake endpoints' width for this run
    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.micro",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results and machine here")
    parser.add_argument("--calls", type=int, default=300, help="calls per cell at batch 1")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--dim", type=int, default=DIM,
                        help="embedding dimension of the fake endpoints (64: digits-s, "
                             "512: ViT-B-32)")
    parser.add_argument("--outcome-sample-fraction", type=float, default=1.0,
                        help="the server's outcome_sample_fraction (1: store every prediction)")
    parser.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's coalesce setting (calls here never overlap: this "
                             "measures what the coalescer costs a call that goes straight on)")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    DIM = args.dim
    info = cpu.detect()
    load_before = os.getloadavg()
    results = asyncio.run(run(batches, args.calls,
                              outcome_sample_fraction=args.outcome_sample_fraction,
                              coalesce=args.coalesce))
    load_after = os.getloadavg()
    print(f"CPU: {info.model} ({info.cores} cores usable; {info.isa()}); "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({
            "label": args.label, "outcome_sample_fraction": args.outcome_sample_fraction,
            "dim": args.dim, "coalesce": args.coalesce,
            "cpu": {"model": info.model, "cores": info.cores,
                                         "flags": sorted(info.flags)},
            "python": sys.version.split()[0],
            "loadavg_before": load_before, "loadavg_after": load_after,
            "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
