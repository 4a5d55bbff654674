"""CPU runtimes for an exported tower: ONNX Runtime and OpenVINO, in-process, built exactly as
Triton's model.py builds them (the builders live in :mod:`.triton_model`, which must stay
self-contained), plus the choice between them by measurement on the exporting machine.

What each precision asks of OpenVINO (:func:`runtime_options`): ``bf16`` runs the FP32 graph
with ``INFERENCE_PRECISION_HINT=bf16`` (matmuls and most activations in bfloat16; the CPU
plugin keeps normalisations/softmax in f32 where it judges bf16 unsafe). Every other precision
runs with the hint ``f32``, so the graph's own precision decides (QDQ int8 ops execute as int8,
everything the recipe kept float stays f32) - without it, OpenVINO's default on a bf16-capable
CPU would silently turn an "fp32" endpoint into bf16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipserve import calibration as cal
from clipserve.endpoints import Precision
from clipserve.export import triton_model

RUNTIMES = triton_model.RUNTIMES
RUNTIME_CHOICES = ("auto",) + RUNTIMES
# OpenVINO's share of throughput over onnxruntime's that makes "auto" switch runtimes: below
# it the two are within this machine's run-to-run noise and onnxruntime (always present) wins.
SWITCH_MARGIN = 1.05
# Embedding cosine (min over the sample) OpenVINO must keep against onnxruntime on the same
# file for "auto" to pick it: a runtime that computes something else is not a faster runtime.
# bf16 is compared against the FP32 graph under onnxruntime, hence its looser bound.
MIN_AGREEMENT = {Precision.BF16: 0.995}
DEFAULT_AGREEMENT = 0.998


class RuntimeUnavailable(RuntimeError):
    """The requested runtime cannot run this file here (not installed, or cannot compile)."""


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not importable."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


def runtime_options(runtime: str, precision: Precision | str, threads: int = 0,
                    inter_op_threads: int = 1, allow_spinning: bool = False) -> dict:
    """config.pbtxt parameters (string values) that make Triton's model.py run ``precision``
    with ``runtime``: runtime, its thread parameters (``ServingPolicy.runtime_parameters``:
    intra_op_threads; for onnxruntime inter_op_threads and allow_spinning) and, for openvino,
    precision hint and streams.

    Raises:
        ValueError: unknown runtime, or bf16 with onnxruntime (it has no bf16 CPU kernels for
            the FP32 graph, so the endpoint would be FP32 under a bf16 name).
    """
    precision = Precision(precision)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and precision is Precision.BF16:
        raise ValueError("bf16 needs runtime openvino (onnxruntime's CPU provider would run the "
                         "FP32 graph in float32)")
    from clipserve.export.repository import ServingPolicy

    threading = ServingPolicy(intra_op_threads=threads, inter_op_threads=inter_op_threads,
                              allow_spinning=allow_spinning)
    options = {"runtime": runtime, **threading.runtime_parameters(runtime)}
    if runtime == "openvino":
        options["openvino_precision_hint"] = "bf16" if precision is Precision.BF16 else "f32"
        options["openvino_streams"] = "1"
    return options


def candidates(precision: Precision | str) -> tuple[str, ...]:
    """Runtimes that can serve ``precision`` at all: bf16 only OpenVINO; the rest both."""
    return ("openvino",) if Precision(precision) is Precision.BF16 else RUNTIMES


class Session:
    """One runtime on one ONNX file, with the slice of onnxruntime's InferenceSession API that
    :mod:`.evaluate` uses (``run(None, feeds)``, ``get_inputs()[0].name``)."""

    class _Input:
        def __init__(self, name):
            self.name = name

    def __init__(self, path: Path, runtime: str, options: dict):
        import onnx

        self.runtime, self.options = runtime, dict(options)
        self._input = onnx.load(str(path), load_external_data=False).graph.input[0].name
        threads = int(options.get("intra_op_threads", "0"))
        try:
            if runtime == "openvino":
                self._run = triton_model.build_openvino(
                    path, options.get("openvino_precision_hint", ""), threads,
                    options.get("openvino_streams", "1"))
            else:
                self._run = triton_model.build_onnxruntime(
                    path, threads, inter_op_threads=int(options.get("inter_op_threads", "1")),
                    allow_spinning=options.get("allow_spinning", "0") == "1")
        except ImportError as exc:
            raise RuntimeUnavailable(f"{runtime} is not installed here ({exc}); "
                                     "pip install 'clipserve[openvino]'") from exc
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses on unsupported ops
            raise RuntimeUnavailable(f"{runtime} cannot run {Path(path).name}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc

    def get_inputs(self):
        return [self._Input(self._input)]

    def run(self, output_names, feeds: dict):
        """Like InferenceSession.run: ``[embedding]`` for ``{input_name: batch}``."""
        (name, batch), = feeds.items()
        return [self._run(name, batch)]


def make_session(path, runtime: str = "onnxruntime", precision: Precision | str = Precision.FP32,
                 threads: int = 0, **threading) -> Session:
    """A CPU session of ``runtime`` configured for ``precision`` as the endpoint will be
    (``threading``: inter_op_threads, allow_spinning; see :func:`runtime_options`).

    Raises:
        RuntimeUnavailable: the runtime is missing or cannot compile the file.
        ValueError: see :func:`runtime_options`.
    """
    return Session(Path(path), runtime, runtime_options(runtime, precision, threads, **threading))


def _throughput(session, batch: np.ndarray, seconds: float) -> float:
    from clipserve.export import evaluate

    return evaluate.throughput(session, batch, seconds)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cal.cosine_rows(a, b).min())


def choose_runtime(onnx_path, precision: Precision | str, sample_batch: np.ndarray,
                   seconds: float = 1.0, threads: int = 0, reference_path=None,
                   allowed=RUNTIMES, **threading) -> tuple[str, dict]:
    """Pick the faster runtime for one endpoint by measuring each candidate here.

    Each candidate runs ``sample_batch`` for about ``seconds`` (evaluate.throughput) and its
    embeddings are compared with onnxruntime on ``reference_path`` (default ``onnx_path``; for
    bf16 pass the FP32 file, which is the same file). OpenVINO wins if it agrees (min cosine
    >= MIN_AGREEMENT) and is at least SWITCH_MARGIN times faster.

    Returns:
        (runtime, info) with info = {"chosen", "why", "candidates": {runtime: {"items_per_s",
        "min_cosine_to_ort"} or {"error"}}, "batch", "seconds", "threads", "openvino"}.

    Raises:
        RuntimeUnavailable: no allowed candidate can run the file (e.g. bf16 without openvino).
    """
    precision = Precision(precision)
    pool = [r for r in candidates(precision) if r in allowed]
    reference = make_session(reference_path or onnx_path, "onnxruntime", Precision.FP32,
                             threads, **threading)
    name = reference.get_inputs()[0].name
    ref_out = reference.run(None, {name: sample_batch})[0]
    figures, errors = {}, {}
    for runtime in pool:
        try:
            session = make_session(onnx_path, runtime, precision, threads, **threading)
            out = session.run(None, {name: sample_batch})[0]
            figures[runtime] = {"items_per_s": round(_throughput(session, sample_batch, seconds), 2),
                                "min_cosine_to_ort": round(_min_cosine(out, ref_out), 6)}
        except RuntimeUnavailable as exc:
            errors[runtime] = str(exc)
    info = {"candidates": {**figures, **{r: {"error": e} for r, e in errors.items()}},
            "batch": int(len(sample_batch)), "seconds": seconds, "threads": threads,
            "openvino": openvino_version(), "margin": SWITCH_MARGIN}
    if not figures:
        raise RuntimeUnavailable(f"{precision.value}: no runtime can serve {Path(onnx_path).name} "
                                 f"here: {'; '.join(f'{r}: {e}' for r, e in errors.items())}")
    bound = MIN_AGREEMENT.get(precision, DEFAULT_AGREEMENT)
    ov, ort_ = figures.get("openvino"), figures.get("onnxruntime")
    if ov is None:
        chosen, why = "onnxruntime", "openvino unavailable: " + errors.get("openvino", "not allowed")
    elif ov["min_cosine_to_ort"] < bound:
        if ort_ is None:
            raise RuntimeUnavailable(
                f"{precision.value}: openvino disagrees with onnxruntime FP32 (min cosine "
                f"{ov['min_cosine_to_ort']:.6f} < {bound})")
        chosen, why = "onnxruntime", (f"openvino disagrees (min cosine "
                                      f"{ov['min_cosine_to_ort']:.6f} < {bound})")
    elif ort_ is None:
        chosen, why = "openvino", "the only runtime for this precision"
    elif ov["items_per_s"] >= SWITCH_MARGIN * ort_["items_per_s"]:
        chosen, why = "openvino", (f"{ov['items_per_s']:.1f} vs {ort_['items_per_s']:.1f} items/s "
                                   f"({ov['items_per_s'] / ort_['items_per_s']:.2f}x)")
    else:
        chosen, why = "onnxruntime", (f"openvino not >= {SWITCH_MARGIN}x faster "
                                      f"({ov['items_per_s']:.1f} vs {ort_['items_per_s']:.1f} "
                                      "items/s)")
    info.update(chosen=chosen, why=why)
    return chosen, info


def bf16_plan(cpu, allow_emulated: bool, backend: str = "python") -> tuple[bool, str]:
    """Whether to export bf16 here, and the reason, from :class:`clipserve.cpu.CpuInfo`.

    bf16 runs on the CPU through OpenVINO (Triton's python backend, or NVIDIA's openvino
    backend with HINT_BF16). Without AVX512_BF16/AMX
    the CPU plugin emulates it through f32 conversions: slower than fp32 and no more faithful,
    so it is skipped unless ``allow_emulated``. On ``--backend onnxruntime`` (NVIDIA's GPU
    images) there is no bf16 path: Triton's TensorRT accelerator takes precision_mode FP32,
    FP16 or INT8 only, and the CUDA EP would run the FP32 graph in float32.
    """
    if backend not in ("python", "openvino"):
        return False, ("bf16 is served by OpenVINO (the python backend, or NVIDIA's openvino "
                       "backend); Triton's onnxruntime backend has no bf16 mode (TensorRT "
                       "precision_mode: FP32/FP16/INT8)")
    if openvino_version() is None:
        return False, "bf16 needs OpenVINO (pip install 'clipserve[openvino]')"
    if cpu.amx:
        return True, "bf16 native on this CPU (AMX)"
    if cpu.bf16_native:
        return True, ("bf16 native on this CPU (AVX512_BF16, no AMX: at most 2x the fp32 peak; "
                      "on the AMX-less Xeon in BENCHMARKS.md OpenVINO ran it slower than f32)")
    if allow_emulated:
        return True, "bf16 emulated on this CPU (no AVX512_BF16/AMX): slower than fp32, as asked"
    return False, ("this CPU has no AVX512_BF16 or AMX: bf16 would be emulated and slower than "
                   "fp32; skipped (--allow-emulated-bf16 exports it anyway)")



def plan_runtime(requested: str, onnx_path, precision: Precision | str, sample_batch: np.ndarray,
                 seconds: float = 1.0, threads: int = 0, **threading) -> tuple[str, dict, dict]:
    """The runtime of one python-backend endpoint, as ``clipserve export --runtime`` asks.

    Args:
        requested: "auto" (measure with :func:`choose_runtime`), "onnxruntime" or "openvino"
            (used as given, except bf16, which always runs on openvino).
        onnx_path: the endpoint's model.onnx; sample_batch, seconds: the measurement's input
            and duration; threads: intra-op threads of the served endpoint (0: all cores);
            threading: its inter_op_threads and allow_spinning (measured as served).

    Returns:
        (runtime, config.pbtxt parameters, info for the sidecar's quantization["runtime"]).

    Raises:
        RuntimeUnavailable: the runtime cannot run the file here (bf16 without openvino);
            openvino asked for another precision but unable falls back to onnxruntime.
    """
    precision = Precision(precision)
    if requested == "auto":
        runtime, info = choose_runtime(onnx_path, precision, sample_batch, seconds, threads,
                                       **threading)
        why = f"auto: {runtime}, {info['why']}"
    else:
        runtime = "openvino" if precision is Precision.BF16 else requested
        why = f"--runtime {requested}"
        try:
            make_session(onnx_path, runtime, precision, threads, **threading)  # fails here
        except RuntimeUnavailable as exc:
            if runtime == "onnxruntime" or precision is Precision.BF16:
                raise
            runtime, why = "onnxruntime", f"--runtime {requested} unavailable ({exc})"
        info = {"chosen": runtime, "why": why, "openvino": openvino_version()}
    options = runtime_options(runtime, precision, threads, **threading)
    options["runtime_choice"] = why
    return runtime, options, info
