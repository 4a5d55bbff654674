"""``clipserve serve --workers 2`` on a real tritonserver: two gateway processes listen on the one
gRPC port and the one HTTP port, /metrics is one page whose counters are the sum of both
workers', only the parent starts Triton, and the workers go when the parent goes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

from clipserve.procs import free_port

from .test_gateway_cli import link_or_copy, tritons_on

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 180
GRPC_CALLS = 24  # each on its own connection, so the kernel spreads them over the workers
HTTP_CALLS = 6


def listeners(port: int) -> set[int]:
    """Pids with a listening TCP socket on ``port`` (from /proc/net/tcp{,6} and /proc/*/fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def children(pid: int) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(proc.name))
            except (OSError, IndexError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"clipserve serve exited while waiting for {what}:\n"
                        f"{process.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


def start(args: list[str], tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp)}  # where the per-serve metrics directory goes
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "clipserve.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def requests_by_worker(metrics_dir: Path, method: str, protocol: str) -> dict[int, float]:
    """OK calls of ``method`` counted in each worker's own file of the multiprocess directory."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        counts[pid] = sum(
            s.value for m in MultiProcessCollector.merge([str(path)], accumulate=True)
            for s in m.samples if s.name == "clipserve_requests_total"
            and s.labels.get("method") == method and s.labels.get("code") == "OK"
            and s.labels.get("protocol") == protocol)
    return counts


def test_two_workers_share_the_ports_and_metrics_sum_their_counters(repository, tmp_path):
    repo = tmp_path / "repo"  # a copy: the Triton check below must not see the session's one
    shutil.copytree(repository, repo, copy_function=link_or_copy)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    process = start(["--workers", "2", "--repository", str(repo), "--host", "127.0.0.1",
                     "--port", str(port), "--http-port", str(http_port),
                     "--metrics-port", str(metrics_port), "--shutdown-grace-s", "2"], tmp)
    try:
        wait_for(lambda: len(listeners(port)) == 2 and serving(port), START_TIMEOUT_S,
                 "two workers SERVING", process)
        workers = listeners(port)
        # The two listeners on the gRPC port are the parent's children, not the parent;
        # they also hold the HTTP port; only one tritonserver runs, the parent's child.
        assert process.pid not in workers and workers <= children(process.pid)
        wait_for(lambda: listeners(http_port) == workers, 30, "both workers on the HTTP port")
        assert len(tritons_on(repo)) == 1
        assert set(tritons_on(repo)) <= children(process.pid)

        for i in range(GRPC_CALLS):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = pb_grpc.EmbeddingServiceStub(channel).EmbedTexts(
                    pb.EmbedTextsRequest(texts=[f"a photo of the digit {i % 10}"]), timeout=30)
                assert len(response.embeddings) == 1
        for i in range(HTTP_CALLS):
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
                answer = client.post("/v1/embeddings", json={"input": [f"digit {i}"]})
                assert answer.status_code == 200, answer.text

        page = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        totals = {"grpc": 0.0, "http": 0.0}
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if (sample.name == "clipserve_requests_total"
                        and sample.labels.get("method") == "EmbedTexts"
                        and sample.labels.get("code") == "OK"):
                    totals[sample.labels["protocol"]] += sample.value
        assert totals == {"grpc": GRPC_CALLS, "http": HTTP_CALLS}
        assert page.count("# TYPE clipserve_requests_total counter") == 1  # one page

        # Both workers served some of those calls: the sum above adds two processes' counts.
        (metrics_dir,) = tmp.glob("clipserve-metrics-*")
        by_worker = requests_by_worker(metrics_dir, "EmbedTexts", "grpc")
        assert set(by_worker) == workers
        assert all(count > 0 for count in by_worker.values()), by_worker
        assert sum(by_worker.values()) == GRPC_CALLS
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert not tritons_on(repo), "tritonserver outlived clipserve serve"
    assert not any(alive(pid) for pid in workers), "a worker outlived clipserve serve"
    assert not list(tmp.glob("clipserve-metrics-*")), "the metrics directory was left behind"


def test_workers_exit_when_the_parent_is_killed(repository, tmp_path):
    # An external Triton that is not there: the workers start NOT_SERVING, which is enough.
    port, metrics_port = free_port(), free_port()
    process = start(["--workers", "2", "--repository", str(repository), "--host", "127.0.0.1",
                     "--port", str(port), "--metrics-port", str(metrics_port),
                     "--triton-url", f"127.0.0.1:{free_port()}"], tmp_path)
    try:
        wait_for(lambda: len(listeners(port)) == 2, START_TIMEOUT_S, "two workers listening",
                 process)
        workers = listeners(port)
        process.kill()  # SIGKILL: no chance to stop the workers itself
        process.wait()
        wait_for(lambda: not any(alive(pid) for pid in workers), 20,
                 "the workers to exit after their parent")
    finally:
        if process.poll() is None:
            process.kill()
        for pid in listeners(port):  # only if the test failed: do not leave them running
            os.kill(pid, signal.SIGKILL)
        process.communicate()
