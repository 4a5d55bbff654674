"""Start and stop a real Triton Inference Server (CPU) as a child process.

The ``tritonserver`` binary, its shared libraries and the Python backend come from the PyPI
wheel ``nvidia-pytriton`` (the ``triton`` extra); nothing else has to be installed. For the
integration tests and local development; in production Triton runs from its own image.

Three things must line up for ``backend: "python"`` models to load:

- ``LD_LIBRARY_PATH`` holds the wheel's ``nvidia_pytriton.libs/`` (``libtritonserver`` and
  the vendored libraries the binary and the stub link against).
- The backend directory's ``python/`` holds ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for the
  *running* Python (the wheel ships one per minor version). We assemble it in a temp dir.
- The running interpreter's bin dir is first on ``PATH``: the stub embeds Python and finds its
  prefix through ``python3`` on ``PATH``, so a venv there gives ``model.py`` the venv's
  packages (numpy, onnxruntime, clipserve).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import urllib.error
import urllib.request

from clipserve.procs import free_port, kill_group, start_group

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

# Python backend shared memory, per model instance. The backend's own default is 1 MiB
# growing by 1 MiB; one uint8 batch of 8 images at 224x224 is ~1.2 MiB, so 1 MiB steps mean a
# grow (ftruncate + remap) on the first big batch. 8 MiB + 8 MiB steps avoids that and still
# fits a container's default 64 MiB /dev/shm with a few instances.
SHM_DEFAULT_BYTES = 8 * 1024 * 1024
SHM_GROWTH_BYTES = 8 * 1024 * 1024

_READY_POLL_S = 0.25  # between readiness checks while starting
_RPC_TIMEOUT_S = 2.0  # per readiness RPC, so a wedged server cannot stall start()
_LOG_TAIL_LINES = 30  # of Triton's log in a start() error, besides its error lines
_LOG_ERROR_LINES = 20
_LOG_ERROR_LINE = re.compile(r"^E\d{4} ")  # glog format: E1122 10:19:34.106 ...
_GROUP_EXIT_WAIT_S = 5.0  # for the stubs to die after SIGKILL
# Triton's message when an endpoint cannot bind: "Socket '127.0.0.1:N' already in use".
_PORT_IN_USE = re.compile(r"Socket '[^']*:(\d+)' already in use")


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the Triton files shipped in the ``nvidia-pytriton`` wheel.

    Attributes:
        binary: the ``tritonserver`` executable.
        libs_dir: directory to put on ``LD_LIBRARY_PATH`` (``libtritonserver`` and friends).
        python_backend_dir: the wheel's ``backends/python`` (``libtriton_python.so`` and
            ``triton_python_backend_utils.py``; no stub).
        stub: ``triton_python_backend_stub`` built for this interpreter's Python version.
        python_libdir: directory holding this interpreter's ``libpythonX.Y.so``, or None for
            a statically linked interpreter. Put on ``LD_LIBRARY_PATH`` so the stub loads the
            same libpython as this interpreter and not another build of X.Y from /usr/lib.
    """

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    python_libdir: Path | None


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver and the Python backend in the installed ``nvidia-pytriton`` wheel.

    Uses ``importlib.util.find_spec`` so pytriton's own (heavy) modules are not imported.

    Returns:
        The paths, all checked to exist.

    Raises:
        RuntimeError: nvidia-pytriton is not installed, a file is missing, or the wheel has no
            stub for this Python version. The message names every path looked for.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tritonserver not found: the Python package 'pytriton' is not installed in "
            f"{sys.prefix}. Install it with: pip install 'clipserve[triton]' "
            "(or pip install nvidia-pytriton)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    dist = package_dir / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs_dir = dist / "python_backend_stubs"

    # A wheel install puts the vendored libraries next to the package; an editable (source)
    # install of pytriton keeps them under tritonserver/external_libs.
    libs_candidates = [package_dir.parent / "nvidia_pytriton.libs", dist / "external_libs"]
    libs_dir = next((p for p in libs_candidates if p.is_dir()), None)
    if libs_dir is None:
        raise RuntimeError(
            "nvidia-pytriton's shared libraries not found; looked for "
            + " and ".join(str(p) for p in libs_candidates)
        )

    required = {
        "tritonserver binary": dist / "bin" / "tritonserver",
        "Python backend library": dist / "backends" / "python" / "libtriton_python.so",
        "Python backend utils": dist / "backends" / "python" / "triton_python_backend_utils.py",
    }
    missing = [f"{what} at {path}" for what, path in required.items() if not path.is_file()]
    if missing:
        raise RuntimeError("incomplete nvidia-pytriton install; missing " + "; ".join(missing))

    stub = stubs_dir / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise RuntimeError(
            f"nvidia-pytriton has no Python backend stub for Python {version}: looked for "
            f"{stub}; stubs available for: {', '.join(available) or 'none'}. Run with one of "
            "those Python versions."
        )

    python_libdir = None
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        python_libdir = Path(sysconfig.get_config_var("LIBDIR"))

    return TritonInstall(
        binary=required["tritonserver binary"],
        libs_dir=libs_dir,
        python_backend_dir=dist / "backends" / "python",
        stub=stub,
        python_libdir=python_libdir,
    )


def _precompile_models(repository: Path) -> None:
    """Compile each ``<model>/<version>/model.py`` the stub would compile on its first load:
    that write into the model's directory makes a polling Triton reload every model once
    right after start. Best effort (a read-only repository: the stub cannot write either)."""
    import py_compile

    for path in repository.glob("*/*/model.py"):
        try:
            py_compile.compile(str(path), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError) as exc:
            log.debug("not precompiling %s: %s", path, exc)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"


def _log_excerpt(text: str) -> str:
    """Triton's error lines (they carry model.py exceptions), then the end of its log.

    The tail leaves out Triton's ASCII tables, which would fill it with one line per model.
    """
    lines = text.splitlines()
    errors = [line for line in lines if _LOG_ERROR_LINE.match(line)][-_LOG_ERROR_LINES:]
    tail = [line for line in lines if not line.startswith(("+", "|"))][-_LOG_TAIL_LINES:]
    return (
        "errors in Triton's log:\n" + "\n".join(errors or ["<none>"])
        + "\nend of Triton's log (tables left out):\n" + "\n".join(tail)
    )


class TritonProcess:
    """One ``tritonserver`` child process serving a model repository on 127.0.0.1.

    Usage::

        with TritonProcess(repo) as triton:
            client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

    Triton runs in its own process group (so its Python backend stubs can be killed with it)
    and writes stdout and stderr, including tracebacks from ``model.py``, to one log file.
    """

    def __init__(
        self,
        repository: Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        metrics_address: str = HOST,
        log_path: Path | None = None,
        repository_poll_s: int = 0,
        extra_args: Sequence[str] = (),
    ):
        """Describe the server; nothing starts until ``start()``.

        Args:
            repository: Triton model repository (``<model>/config.pbtxt``, ``<model>/1/...``).
            grpc_port, http_port, metrics_port: ports; 0 picks a free one.
            metrics_address: address Triton's Prometheus endpoint binds to: 127.0.0.1 by
                default, ``0.0.0.0`` to be scraped at the pod IP. gRPC and HTTP always stay
                on 127.0.0.1, so inference cannot bypass the gateway (and its API keys).
            log_path: file for Triton's output (appended to); default a file in the temp dir,
                deleted by ``stop()``.
            repository_poll_s: above 0, Triton polls the repository every that many seconds
                and loads, reloads and unloads models as their directories appear, change
                and go (``--model-control-mode=poll``); 0: the models found at start, fixed.
            extra_args: more ``tritonserver`` flags, appended last so they can override ours.
        """
        self.repository = Path(repository).resolve()
        self._requested_ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.metrics_address = metrics_address
        self._ports: dict[str, int] = {}
        self._user_log_path = Path(log_path).resolve() if log_path is not None else None
        self.log_path: Path | None = self._user_log_path
        self.repository_poll_s = int(repository_poll_s)
        self.extra_args = tuple(extra_args)
        self._install: TritonInstall | None = None
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._shm_prefix = ""
        self._log_offset = 0

    # -- addresses -------------------------------------------------------------------------

    def _port(self, name: str) -> int:
        if name not in self._ports:
            raise RuntimeError("TritonProcess has not been started; its ports are not chosen yet")
        return self._ports[name]

    @property
    def grpc_url(self) -> str:
        """gRPC endpoint as tritonclient.grpc wants it: ``127.0.0.1:PORT``."""
        return f"{HOST}:{self._port('grpc')}"

    @property
    def http_url(self) -> str:
        """HTTP endpoint as tritonclient.http wants it: ``127.0.0.1:PORT`` (no scheme)."""
        return f"{HOST}:{self._port('http')}"

    @property
    def metrics_url(self) -> str:
        """Full Prometheus scrape URL: ``http://ADDRESS:PORT/metrics`` (127.0.0.1 when the
        metrics bind to every interface)."""
        host = HOST if self.metrics_address in ("0.0.0.0", "::", "") else self.metrics_address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port('metrics')}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver (also its process group id), or None if not started."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> None:
        """Launch tritonserver and wait until the server and every model are ready.

        If Triton exits because a port we picked was taken in the meantime, it is relaunched
        once with fresh ports.

        Args:
            timeout_s: how long to wait for readiness, per launch.

        Raises:
            RuntimeError: already started; Triton exited early (e.g. a model failed to load);
                or not ready within ``timeout_s``. The message holds Triton's error lines
                (model.py exceptions included) and the end of its log. The process is stopped
                and the temp dir removed before raising.
        """
        if self._proc is not None:
            raise RuntimeError("TritonProcess already started")
        if self._install is None:
            self._install = find_tritonserver()
        for attempt in (1, 2):
            try:
                self._launch()
                self._wait_ready(timeout_s)
                return
            except RuntimeError:
                retry = attempt == 1 and not self.is_running() and self._lost_picked_port()
                self.stop()
                if not retry:
                    raise
            except BaseException:
                # Ctrl-C or an OS error while starting: never leave a Triton running.
                self.stop()
                raise

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop tritonserver: SIGTERM, wait up to ``grace_s``, then SIGKILL. Idempotent.

        Also kills whatever is left in its process group (Python backend stubs), removes its
        shared memory regions and the temp dir.

        Args:
            grace_s: seconds Triton gets to finish in-flight requests and unload models.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL tritonserver and its stubs now, as a crash would (for fault tests).

        Then cleans up like ``stop()``; calling ``stop()`` afterwards is harmless.
        """
        self._cleanup()

    def is_running(self) -> bool:
        """True while the tritonserver process exists (not necessarily ready)."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "TritonProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _lost_picked_port(self) -> bool:
        """True if Triton failed to bind a port we picked (someone took it since)."""
        taken = {int(port) for port in _PORT_IN_USE.findall(self._launch_log())}
        picked = {self._ports[name] for name, port in self._requested_ports.items() if port == 0}
        return bool(taken & picked)

    def _launch(self) -> None:
        install = self._install
        self._workdir = Path(tempfile.mkdtemp(prefix="clipserve-triton-"))
        backend_dir = self._workdir / "backends"
        python_dir = backend_dir / "python"
        python_dir.mkdir(parents=True)
        # Triton loads <backend-directory>/python/libtriton_python.so and the backend runs
        # the stub from that same directory, so the three files must sit together.
        for source in sorted(install.python_backend_dir.glob("*.py")) + [
            install.python_backend_dir / "libtriton_python.so",
            install.stub,
        ]:
            (python_dir / source.name).symlink_to(source)

        if self._user_log_path is None:
            self.log_path = self._workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The file may hold earlier runs; errors are reported from this launch's part only.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

        self._ports = {
            name: port or free_port(HOST) for name, port in self._requested_ports.items()
        }
        # Python backend shm regions are named <prefix><uuid>. A prefix of our own lets
        # _cleanup() find and unlink the regions of a Triton that was killed.
        self._shm_prefix = f"clipserve_{os.getpid()}_{secrets.token_hex(4)}_"

        if self.repository_poll_s > 0:
            _precompile_models(self.repository)
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self._ports['grpc']}",
            f"--http-address={HOST}",
            f"--http-port={self._ports['http']}",
            f"--metrics-address={self.metrics_address}",
            f"--metrics-port={self._ports['metrics']}",
            # Ready means every model is ready, and a model that fails to load ends the
            # process, so start() fails in seconds instead of waiting out its timeout.
            "--strict-readiness=true",
            "--exit-on-error=true",
            # config.pbtxt is the single source of truth; Triton must not fill in fields.
            "--disable-auto-complete-config",
            # Shorter than stop()'s default grace, so Triton shuts down its stubs and shm
            # itself before we resort to SIGKILL.
            "--exit-timeout-secs=5",
            "--backend-config=python,shm-region-prefix-name=" + self._shm_prefix,
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            # Poll, not explicit: Triton itself follows the directory (added, changed and
            # removed models, the same for an external Triton given these flags), and an
            # unload waits for the model's in-flight requests; the gateway only reads.
            *(("--model-control-mode=poll", f"--repository-poll-secs={self.repository_poll_s}")
              if self.repository_poll_s > 0 else ()),
            *self.extra_args,
        ]

        env = dict(os.environ)
        lib_dirs = [str(install.libs_dir)]
        if install.python_libdir is not None:
            lib_dirs.append(str(install.python_libdir))
        if env.get("LD_LIBRARY_PATH"):
            lib_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])

        with open(self.log_path, "ab") as log_file:
            log_file.write(("$ " + " ".join(args) + "\n").encode())
            log_file.flush()
            # Own process group: kill() and stop() can take the stubs down with it, and a
            # Ctrl-C in the terminal reaches us, not Triton.
            self._proc = start_group(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {code} before it was ready; "
                    + self._failure_details()
                )
            if self._all_ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tritonserver not ready after {timeout_s:.0f} s; " + self._failure_details()
                )
            time.sleep(_READY_POLL_S)

    def _launch_log(self) -> str:
        return _read_from(self.log_path, self._log_offset)

    def _failure_details(self) -> str:
        if self._user_log_path is not None:
            where = f"full log: {self.log_path}"
        else:
            where = "its log is deleted with the temp dir; pass log_path to keep it"
        return f"{where}\n{_log_excerpt(self._launch_log())}"

    def _all_ready(self) -> bool:
        # Plain HTTP, so tritonclient stays confined to the gateway's client module. Under
        # --strict-readiness the server is ready only once every model in the repository is.
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=_RPC_TIMEOUT_S) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _cleanup(self) -> None:
        proc = self._proc
        if proc is not None:
            # SIGKILL the whole group: tritonserver if still alive and any stub it left. The
            # stubs are Triton's children, not ours: wait for them too, or they may still be
            # writing into the temp dir (e.g. __pycache__) while we delete it.
            if not kill_group(proc, _GROUP_EXIT_WAIT_S):
                log.warning("processes of tritonserver's group %d still exist", proc.pid)
            self._proc = None
        if self._shm_prefix:
            # A killed Triton cannot unlink its regions; they would pin RAM until reboot.
            for region in Path("/dev/shm").glob(self._shm_prefix + "*"):
                region.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


async def start_child(config) -> "TritonProcess":
    """Start the gateway's child tritonserver on ``config.repository`` (a ServerConfig) and
    wait until every model is ready (or raise with Triton's log excerpt). Triton's own
    /metrics binds ``triton_metrics_address`` (loopback unless configured); its gRPC/HTTP stay
    on loopback so inference cannot bypass the gateway's keys."""
    import asyncio

    triton = TritonProcess(Path(config.repository), metrics_port=config.triton_metrics_port,
                           metrics_address=config.triton_metrics_address,
                           repository_poll_s=config.triton_repository_poll_s)
    log.info("starting tritonserver on %s", config.repository)
    await asyncio.to_thread(triton.start, config.triton_start_timeout_s)
    log.info("tritonserver ready at %s; its metrics at %s", triton.grpc_url, triton.metrics_url)
    return triton
