"""The servicer's own cost per call: CPU microseconds of EmbedImages, EmbedTexts and Classify
against an in-process fake backend, no sockets, no Triton.

    python -m clipserve.loadtest.micro --json micro.json

The whole issue-10 measurement, rerun in one command (both embedding widths, the table
against a saved baseline, a py-spy profile of a second, untimed pass, and its section of
BENCHMARKS.md, between the ``micro`` markers)::

    python -m clipserve.loadtest.micro --dims 64,512 --baseline benchmarks/micro-before.json \
        --json benchmarks/micro.json --profile --markdown BENCHMARKS.md

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
import functools
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
from clipserve.server.app import event_loop_runner, limit_blas_threads
from clipserve.server.config import EVENT_LOOPS, ServerConfig
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
    dim: int = 64  # the fake endpoints' embedding width


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
                   warmup: int, repeats: int = 1) -> tuple[float, float]:
    """CPU and wall us per call over ``calls`` calls, the lowest of ``repeats`` such rounds
    (on a shared machine the least disturbed round is the closest to the code's own cost)."""
    handler = getattr(service, method.split("+")[0])
    for _ in range(warmup):
        await handler(request, _Context())
    best = (float("inf"), float("inf"))
    for _ in range(max(1, repeats)):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await handler(request, _Context())
        best = min(best, ((time.process_time() - cpu0) / calls * 1e6,
                          (time.perf_counter() - wall0) / calls * 1e6))
    return best


@functools.lru_cache(maxsize=None)
def _digit_images(batch: int) -> tuple[bytes, ...]:
    # Cached: the profiled second pass should sample the calls, not the digits' loading.
    return tuple((builtin_images(batch, IMAGE_SIZE, seed=0) * batch)[:batch])


def _requests(batch: int) -> dict[str, object]:
    images = list(_digit_images(batch))
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
              outcome_sample_fraction: float = 1.0, coalesce: bool = True,
              repeats: int = 1) -> list[MicroResult]:
    """Measure each method at each batch size; ``calls`` is for batch 1 (fewer for larger
    batches, so each cell costs about the same). ``outcome_sample_fraction``: the server
    config's (1.0 stores every call's predictions for ReportOutcome, as by default).
    ``repeats``: servicer cells are measured that many times and the lowest kept."""
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
        policy = RoutingPolicy.single(SCALE)  # held, as the app holds its current policy
        service = ClipService(
            config=config, catalog=catalog, backend=_Backend(), decoder=decoder,
            tokenizers={s.name: _Tokenizer() for s in catalog if s.tower is Tower.TEXT},
            metrics=ServerMetrics(CollectorRegistry(), catalog.scales),
            routing=lambda: policy, state=lambda: state,
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
                                                     max(3, warmup // batch), repeats)
                    results.append(MicroResult(method, batch, n, round(cpu_us, 1),
                                               round(cpu_us / batch, 1), round(wall_us, 1),
                                               DIM))
                for method in CLIENT_METHODS:
                    cpu_us, wall_us = await _measure_client(
                        service, requests[method.removeprefix("client:")], 10 * n)
                    results.append(MicroResult(method, batch, 10 * n, round(cpu_us, 1),
                                               round(cpu_us / batch, 1), round(wall_us, 1),
                                               DIM))
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
            decoder.close()
    return results


def table(results: list[MicroResult]) -> str:
    """Results as a fixed-width text table."""
    lines = [f"{'method':<26} {'dim':>4} {'batch':>5} {'calls':>6} {'cpu us/call':>12} "
             f"{'cpu us/item':>12} {'wall us/call':>13}"]
    for r in results:
        lines.append(f"{r.method:<26} {r.dim:>4} {r.batch:>5} {r.calls:>6} "
                     f"{r.cpu_us_per_call:>12.1f} {r.cpu_us_per_item:>12.1f} "
                     f"{r.wall_us_per_call:>13.1f}")
    return "\n".join(lines)


def load_baseline(path: Path) -> tuple[str, dict[tuple[str, int, int], float]]:
    """A saved ``--json`` file: its label and CPU us per call by (method, dim, batch). Files
    from before ``--dim`` existed measured digits-s's width, 64.

    Raises:
        ValueError: unreadable, or not this benchmark's JSON.
    """
    try:
        data = json.loads(Path(path).read_text())
        dim = int(data.get("dim", 64))
        cells = {(r["method"], int(r.get("dim", dim)), int(r["batch"])):
                 float(r["cpu_us_per_call"]) for r in data["results"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the baseline {path}: {exc}") from None
    return data.get("label") or str(path), cells


SECTION_START = "<!-- micro:start (written by python -m clipserve.loadtest.micro) -->"
SECTION_END = "<!-- micro:end -->"


def markdown(results: list[MicroResult], *, command: str, machine: str,
             baseline: tuple[str, dict] | None = None, profile: dict | None = None) -> str:
    """The BENCHMARKS.md section: the table (against ``baseline`` when given) and the
    profile's self time by area, with the command that made them."""
    lines = [SECTION_START, "## Servicer microbenchmark (issue 10, part 1)", "",
             "Rerun with:", "", "```bash", command, "```", "",
             f"{machine} The gateway's Python alone, in process, against a fake backend that "
             "answers at once (no sockets, no Triton): CPU us per call is `time.process_time` "
             "of every thread over the calls made. `client:` rows are the client's parse and "
             "decode of the serialized response. The machine may be shared: compare rows of "
             "one run, and the baseline with care.", ""]
    header = ["method", "dim", "batch", "CPU us/call", "CPU us/item", "wall us/call"]
    if baseline:
        header += [f"baseline ({baseline[0]}) CPU us/call", "now / baseline"]
    rows = []
    for r in results:
        row = [r.method, str(r.dim), str(r.batch), f"{r.cpu_us_per_call:.1f}",
               f"{r.cpu_us_per_item:.1f}", f"{r.wall_us_per_call:.1f}"]
        if baseline:
            before = baseline[1].get((r.method, r.dim, r.batch))
            row += (["-", "-"] if before is None else
                    [f"{before:.1f}", f"{r.cpu_us_per_call / before:.2f}"])
        rows.append(row)
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    if profile is not None:
        if profile.get("samples"):
            areas = ", ".join(f"{k} {v:.0f}%" for k, v in profile["by_area"].items())
            lines += [f"py-spy over a second, untimed pass of the same calls "
                      f"({profile['samples']} busy samples; {profile['idle_samples']} waiting "
                      f"ones left out): self time by area: {areas}. Top functions:", ""]
            lines += [f"- {name}: {pct:.1f}%" for name, pct in profile["top_self"]]
        else:
            lines.append(f"No profile: {profile.get('status', 'no samples')}.")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def _profile(again, out: Path) -> dict:
    """Run ``again()`` (an untimed pass of the same cells) with py-spy attached to this
    process, so start-up and imports are not in the samples, and summarise them; a dict whose
    status says why when py-spy is missing or fails."""
    import shutil
    import signal
    import subprocess

    from .bench_report import summarize_collapsed

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return {"status": "py-spy not installed"}
    out.unlink(missing_ok=True)
    spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "250",
                            "--format", "raw", "--output", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached before the calls start
    try:
        again()
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            return {"status": "py-spy did not finish"}
    if not out.is_file():
        return {"status": f"py-spy failed: {(err or '').strip()[-300:]}"}
    return {"status": "ok", **summarize_collapsed(out.read_text())}


def main(argv: list[str] | None = None) -> int:
    """Run the microbenchmark, print the table, optionally write JSON and BENCHMARKS.md."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m clipserve.loadtest.micro",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results and machine here")
    parser.add_argument("--calls", type=int, default=300, help="calls per cell at batch 1")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each servicer cell this many times and keep the lowest "
                             "CPU (and wall) figure: steadier on a shared machine")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--dim", type=int, default=DIM,
                        help="embedding dimension of the fake endpoints (64: digits-s, "
                             "512: ViT-B-32)")
    parser.add_argument("--dims", default="",
                        help="comma-separated dimensions, each measured in turn (overrides "
                             "--dim), e.g. 64,512")
    parser.add_argument("--outcome-sample-fraction", type=float, default=1.0,
                        help="the server's outcome_sample_fraction (1: store every prediction)")
    parser.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's coalesce setting (calls here never overlap: this "
                             "measures what the coalescer costs a call that goes straight on)")
    parser.add_argument("--blas-threads", type=int, default=ServerConfig.blas_threads,
                        help="cap numpy's BLAS threads as the server does (its blas_threads "
                             "setting, default 1; 0: the library's default)")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=ServerConfig.event_loop,
                        help="the event loop the servicer runs on (the server's --event-loop)")
    parser.add_argument("--baseline", type=Path,
                        help="a saved --json run to compare with (e.g. "
                             "benchmarks/micro-before.json)")
    parser.add_argument("--markdown", type=Path,
                        help="write the table (and profile) as this file's micro section")
    parser.add_argument("--profile", action="store_true",
                        help="profile a second, untimed pass with py-spy (raw samples next to "
                             "--json, or in the working directory)")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else (args.dim,)
        baseline = load_baseline(args.baseline) if args.baseline else None
    except ValueError as exc:
        print(f"micro: {exc}", file=sys.stderr)
        return 2
    if (any(d < 1 for d in dims) or any(b < 1 for b in batches) or args.calls < 1
            or args.repeats < 1):
        print("micro: --dims, --batches, --calls and --repeats must be positive",
              file=sys.stderr)
        return 2
    # The servicer runs in this process: cap BLAS as serve() does, so live scoring's small
    # matrix products cost what they cost in the gateway (no spinning BLAS worker threads).
    blas_pools = limit_blas_threads(args.blas_threads)
    info = cpu.detect()
    load_before = os.getloadavg()

    try:
        runner = event_loop_runner(args.event_loop)
    except RuntimeError as exc:
        print(f"micro: {exc}", file=sys.stderr)
        return 2

    def measure_all() -> list[MicroResult]:
        global DIM
        out = []
        for dim in dims:
            DIM = dim
            out += runner(run(batches, args.calls,
                              outcome_sample_fraction=args.outcome_sample_fraction,
                              coalesce=args.coalesce, repeats=args.repeats))
        return out
    results = measure_all()
    load_after = os.getloadavg()
    machine = (f"CPU: {info.model} ({info.cores} cores usable; {info.isa()}); "
               f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}.")
    print(machine)
    print(table(results))
    profile = None
    if args.profile:
        raw = (args.json.with_suffix(".py-spy.txt") if args.json
               else Path("micro.py-spy.txt"))
        profile = _profile(measure_all, raw)
        print(f"profile: {profile['status']}"
              + (f", {profile['samples']} busy samples: {profile['by_area']}"
                 if profile.get("samples") else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "label": args.label, "outcome_sample_fraction": args.outcome_sample_fraction,
            "dim": dims[0], "dims": list(dims), "coalesce": args.coalesce,
            "blas_threads": args.blas_threads, "repeats": args.repeats,
            "event_loop": args.event_loop,
            "blas_pools": [{k: p.get(k) for k in ("internal_api", "num_threads")}
                           for p in blas_pools],
            "cpu": {"model": info.model, "cores": info.cores,
                    "flags": sorted(info.flags)},
            "python": sys.version.split()[0],
            "loadavg_before": load_before, "loadavg_after": load_after,
            **({"profile": profile} if profile is not None else {}),
            "results": [asdict(r) for r in results]}, indent=2) + "\n")
    if args.markdown:
        from .report import replace_section

        command = "python -m clipserve.loadtest.micro " + " ".join(argv)
        replace_section(args.markdown, markdown(results, command=command, machine=machine,
                                                baseline=baseline, profile=profile),
                        SECTION_START, SECTION_END)
        print(f"wrote the micro section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
