"""The peer server for the benchmark: infinity-emb, in a virtualenv of its own.

Three separate pieces: :func:`ensure_venv` installs it (cached; a project dependency it is not),
:func:`ensure_model_dir` writes a random-weight Hugging Face CLIP directory with the same
architecture as the clipserve export (``peer_model.py``, run by the peer's interpreter), and
:class:`PeerServer` runs ``infinity_emb v2`` on 127.0.0.1 and stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from clipserve.procs import free_port, start_group, stop_group

HOST = "127.0.0.1"
# Pinned: the versions known to install and serve CLIP on this CPU. torch first, from the local
# wheel, so infinity-emb does not pull a different build; aiohttp because infinity-emb's image
# path imports it and its [server] extra does not bring it.
TORCH_REQUIREMENT = "torch==2.13.0"
PEER_REQUIREMENTS = ("infinity-emb[server,torch]==0.0.78", "aiohttp")
READY_MARKER = ".clipserve-peer-ready"



class PeerError(RuntimeError):
    """The peer could not be installed, built or started; the message says which step."""


def _run(cmd: list[str], log_path: Path, timeout_s: float, what: str) -> None:
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True,
                           timeout=timeout_s)
        except subprocess.CalledProcessError as exc:
            raise PeerError(f"{what} failed (exit {exc.returncode}); see {log_path}") from None
        except subprocess.TimeoutExpired:
            raise PeerError(f"{what} took more than {timeout_s:.0f} s; see {log_path}") from None


def ensure_venv(venv: Path, log_path: Path, timeout_s: float = 1800.0) -> Path:
    """Create ``venv`` with infinity-emb installed unless a finished one is there.

    Returns:
        The venv's python.

    Raises:
        PeerError: venv creation or an install step failed.
    """
    venv = Path(venv)
    python = venv / "bin" / "python"
    wanted = json.dumps([TORCH_REQUIREMENT, *PEER_REQUIREMENTS])
    marker = venv / READY_MARKER
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not python.exists():
        _run([base, "-m", "venv", str(venv)], log_path, 300, "creating the peer virtualenv")
    _run([str(python), "-m", "pip", "install", "-q", TORCH_REQUIREMENT], log_path, timeout_s,
         f"pip install {TORCH_REQUIREMENT} (peer)")
    _run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], log_path, timeout_s,
         f"pip install {' '.join(PEER_REQUIREMENTS)} (peer)")
    marker.write_text(wanted)
    return python


def bpe_path() -> Path:
    """open_clip's BPE merges file (the export extra installs open_clip)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise PeerError("open_clip is not installed; its BPE file builds the peer's tokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise PeerError(f"open_clip's BPE file is missing at {path}")
    return path


def ensure_model_dir(python: Path, out: Path, arch: str, log_path: Path,
                     seed: int = 0) -> Path:
    """A random-weight HF CLIP directory for ``arch`` at ``out`` (cached by a marker file).

    Raises:
        PeerError: the build script failed.
    """
    marker = out / "clipserve-peer.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"arch": arch, "seed": seed}:
        return out
    script = Path(__file__).with_name("peer_model.py")
    _run([str(python), str(script), str(out), "--bpe", str(bpe_path()), "--arch", arch,
          "--seed", str(seed)], log_path, 900, f"building the peer's {arch} model directory")
    return out


class PeerServer:
    """``infinity_emb v2`` serving one model directory on 127.0.0.1, offline.

    Args:
        python: the peer venv's interpreter.
        model_dir: HF directory from :func:`ensure_model_dir`.
        log_path: the server's stdout/stderr.
        dtype: infinity's ``--dtype`` (float32, int8, ...).
        batch_size: infinity's ``--batch-size`` (its own dynamic batcher).
    """

    MODEL_NAME = "clip-peer"

    def __init__(self, python: Path, model_dir: Path, log_path: Path, dtype: str = "float32",
                 batch_size: int = 32):
        self.python, self.model_dir, self.log_path = Path(python), Path(model_dir), log_path
        self.dtype, self.batch_size = dtype, batch_size
        self.port = free_port(HOST)
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout_s: float = 600.0) -> None:
        """Start and wait for ``/health``.

        Raises:
            PeerError: it exited or did not become healthy in time (with its log's tail).
        """
        cli = self.python.parent / "infinity_emb"
        cmd = [str(cli), "v2", "--model-id", str(self.model_dir), "--served-model-name",
               self.MODEL_NAME, "--engine", "torch", "--device", "cpu", "--dtype", self.dtype,
               "--batch-size", str(self.batch_size), "--host", HOST, "--port", str(self.port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        self._proc = start_group(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise PeerError(f"infinity_emb exited with {self._proc.returncode} while "
                                f"starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise PeerError(f"infinity_emb not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server's log, deprecation noise left out."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in text if "Deprecat" not in line][-lines:])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM its process group, then SIGKILL after ``grace_s``. Idempotent."""
        stop_group(self._proc, grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
