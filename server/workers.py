"""``clipserve serve --workers N``: N gateway processes on one port, one tritonserver, one /metrics.

The gateway is one Python process per event loop; with N workers it can use N cores. The
parent (the supervisor) does not serve calls. It:

1. makes a fresh temporary directory and sets ``PROMETHEUS_MULTIPROC_DIR`` to it, so every
   worker's prometheus_client writes its samples there (its multiprocess mode);
2. starts the tritonserver child when no ``triton_url`` is given (only the parent owns it;
   the workers connect to it as to an external Triton);
3. picks the ports asked as 0, so every worker binds the same ones;
4. starts N workers (multiprocessing, spawn). Each is a normal :class:`~.app.Gateway` that
   binds the gRPC, health and HTTP ports with SO_REUSEPORT (the kernel spreads connections
   over them) and serves no /metrics of its own. A worker asks the kernel for SIGTERM when
   its parent dies (``PR_SET_PDEATHSIG``), so none outlives a parent killed by SIGKILL;
5. serves /metrics itself from a :class:`prometheus_client.multiprocess.MultiProcessCollector`
   over that directory: one page, counters and histograms summed over the workers (also the
   ones that have exited, so totals never go backwards); gauges per their
   ``multiprocess_mode`` (see :mod:`.metrics`);
6. forwards SIGHUP (reload) to the workers; on SIGTERM/SIGINT stops them (each drains its calls
   for shutdown_grace_s), then Triton, and removes the directory. A worker that exits on its
   own stops the whole server with exit code 1: the orchestrator restarts it whole, instead of
   it running on with fewer cores than it was sized for.

Each worker keeps its own in-memory state: the ReportOutcome store (an outcome must come back
over the same connection as its call, or it may reach a worker that does not hold the
prediction), the label-embedding cache and the live calibration window.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from clipserve.cpu import available_cores
from clipserve.procs import free_port

from .config import ServerConfig

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def effective_workers(config: ServerConfig) -> int:
    """config.workers, 0 resolved to the cores this container may use (affinity mask, capped by
    the cgroup CPU quota)."""
    return config.workers or available_cores()


def worker_config(config: ServerConfig, triton_url: str) -> ServerConfig:
    """What each worker runs: the parent's config with its Triton, its ports fixed (0 picked
    once here, so all workers bind the same) and one worker."""
    def fixed(port: int | None) -> int | None:
        return free_port(config.host) if port == 0 else port

    return dataclasses.replace(config, triton_url=triton_url, port=fixed(config.port),
                               health_port=fixed(config.health_port),
                               http_port=fixed(config.http_port), workers=1)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (Linux); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def _worker_main(config: ServerConfig, index: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    from .app import run_loop

    try:
        code = run_loop(config, worker=True)
    except (ValueError, RuntimeError) as exc:
        logging.getLogger("clipserve.server").error("%s", exc)
        code = 1
    sys.exit(code)


class Supervisor:
    """The parent of ``--workers N`` (see the module docstring)."""

    def __init__(self, config: ServerConfig, workers: int):
        self.config = config
        self.workers = workers
        self.metrics_dir: Path | None = None
        self.metrics_port: int | None = None
        self.port: int | None = None
        self._triton = None
        self._metrics_http = None
        self._procs: list[multiprocessing.Process] = []
        self._previous_env: str | None = None

    async def start(self) -> None:
        """Metrics directory, Triton, workers, /metrics.

        Raises:
            RuntimeError: the tritonserver child failed, or /metrics cannot be bound.
        """
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        config = self.config
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="clipserve-metrics-"))
        self._previous_env = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = str(self.metrics_dir)  # inherited by the workers
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.host,
                                                  registry=registry)
        self.metrics_port = self._metrics_http.server_port
        triton_url = config.triton_url or await self._start_triton()
        child = worker_config(config, triton_url)
        self.port = child.port
        context = multiprocessing.get_context("spawn")
        for index in range(self.workers):
            # Started from this (the main) thread: PR_SET_PDEATHSIG fires when the thread
            # that created the child ends, and this one ends with the process.
            proc = context.Process(target=_worker_main, args=(child, index, os.getpid()),
                                   name=f"clipserve-worker-{index}", daemon=True)
            proc.start()
            self._procs.append(proc)
        log.info("%d gateway workers (pids %s) on gRPC %s:%d%s; metrics of all of them on "
                 "%s:%d", self.workers, ", ".join(str(p.pid) for p in self._procs),
                 config.host, child.port,
                 f", HTTP {config.host}:{child.http_port}" if child.http_port is not None else "",
                 config.host, self.metrics_port)

    async def _start_triton(self) -> str:
        from .triton_process import start_child

        self._triton = await start_child(self.config)
        return self._triton.grpc_url

    def reload(self) -> None:
        """SIGHUP each worker (each re-reads the routing file, keys and sidecars)."""
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    def exited(self) -> list[multiprocessing.Process]:
        """Workers that are no longer running."""
        return [p for p in self._procs if not p.is_alive()]

    async def stop(self) -> None:
        """SIGTERM the workers, wait for their drain (shutdown_grace_s and a margin), SIGKILL
        what is left; then Triton, /metrics and the metrics directory. Idempotent."""
        from prometheus_client import multiprocess

        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace_s + 10.0
        while any(p.is_alive() for p in self._procs):
            if asyncio.get_running_loop().time() > deadline:
                for proc in self._procs:
                    if proc.is_alive():
                        log.warning("worker %d did not stop in time; killing it", proc.pid)
                        proc.kill()
                break
            await asyncio.sleep(0.05)
        for proc in self._procs:
            proc.join(5)
            if self.metrics_dir is not None:
                multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
        self._procs = []
        if self._triton is not None:
            await asyncio.to_thread(self._triton.stop)
            self._triton = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
            if self._previous_env is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = self._previous_env


async def serve_workers(config: ServerConfig, workers: int) -> int:
    """Run ``workers`` gateway processes until SIGTERM/SIGINT (0) or until one exits on its
    own (1)."""
    supervisor = Supervisor(config, workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await supervisor.start()
        loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
        while not stop.is_set():
            gone = supervisor.exited()
            if gone:
                log.error("worker %s exited with code %s; stopping the server",
                          gone[0].pid, gone[0].exitcode)
                code = 1
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL_S)
        if code == 0:
            log.info("shutting down %d workers: each drains its calls for up to %.1f s",
                     workers, config.shutdown_grace_s)
    finally:
        await supervisor.stop()
    return code
