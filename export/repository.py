"""Write the Triton model repository: one model per scale x precision x tower.

Serving policy (batch limits, dynamic batching, instances) lives in each config.pbtxt. Two
backends:
- ``python`` (default): Triton's Python backend running onnxruntime or OpenVINO via
  ``model.py`` (config.pbtxt parameter ``runtime``; see :mod:`.runtimes`). It is what runs on
  the CPU ``tritonserver`` that the ``nvidia-pytriton`` wheel ships.
- ``onnxruntime``: ``platform: "onnxruntime_onnx"`` for NVIDIA's Triton images on GPUs,
  optionally with the TensorRT accelerator where TensorRT can run the graph (FP32, FP16 and
  static QDQ INT8; dynamic INT8 and INT4 use ops TensorRT lacks and run on the CUDA EP).
- ``openvino``: ``backend: "openvino"``, NVIDIA's OpenVINO backend on CPUs (its config:
  :mod:`.openvino_backend`).

How Triton runs each model on the CPU (threads, spinning, instances, batching delay, preferred
batch sizes, warm-up) is a :class:`ServingPolicy`, set by export flags and written into the
config; model.py reads it from there and hard-codes none of it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipserve.endpoints import (EMBEDDING_OUTPUT, IMAGE_INPUT, TEXT_INPUT, Precision,
                                 Sidecar, Tower, TOKENIZER_FILENAME, endpoint_name)

from clipserve.export.config import BACKENDS, MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, WARMUP_DATA

TEMPLATE = Path(__file__).parent / "triton_model.py"


@dataclass(frozen=True)
class ServingPolicy:
    """How Triton runs every exported model (from ``ExportConfig.serving_policy()``).

    Attributes:
        instances: model instances per endpoint (``instance_group`` count; each one a python
            stub process with its own session on the CPU, a copy of the model on the GPU).
        max_queue_delay_us: the dynamic batcher's wait for more requests.
        preferred_batch_sizes: batch sizes the dynamic batcher sends without waiting out
            the delay; empty: Triton's default (max_batch_size).
        model_warmup: ``zero`` or ``random`` (``random_data``; image towers only: random int32
            would be out-of-vocabulary token ids, so text towers always warm up with zeros),
            or ``none``: Triton runs these samples on every instance before the model is READY.
        warmup_batch_sizes: batch sizes of the warm-up samples.
        intra_op_threads: onnxruntime intra-op threads (0: one per core); OpenVINO:
            INFERENCE_NUM_THREADS. GPU onnxruntime backend: ``intra_op_thread_count``.
        inter_op_threads: onnxruntime inter-op threads; above 1 the graph runs with
            ORT_PARALLEL (with sequential execution onnxruntime ignores it). Not used by
            OpenVINO (its analogue is streams). GPU backend: ``inter_op_thread_count``.
        allow_spinning: onnxruntime's ``session.intra_op.allow_spinning`` and
            ``session.inter_op.allow_spinning``. Off by default: spinning worker threads burn
            the cores the gateway needs between batches. OpenVINO has no such setting (its CPU
            plugin's TBB threads are not configurable this way), NVIDIA's onnxruntime backend
            takes no such parameter, so it is written for python-backend onnxruntime only.
    """

    instances: int = 1
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    preferred_batch_sizes: tuple[int, ...] = ()
    model_warmup: str = "zero"
    warmup_batch_sizes: tuple[int, ...] = (1, MAX_BATCH_SIZE)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False

    def __post_init__(self):
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.model_warmup not in WARMUP_DATA:
            raise ValueError(f"unknown model_warmup {self.model_warmup!r}; valid: "
                             f"{', '.join(WARMUP_DATA)}")
        for what, sizes in (("preferred_batch_sizes", self.preferred_batch_sizes),
                            ("warmup_batch_sizes", self.warmup_batch_sizes)):
            bad = [b for b in sizes if not 1 <= int(b) <= MAX_BATCH_SIZE]
            if bad:
                raise ValueError(f"{what} must lie in 1..{MAX_BATCH_SIZE} (max_batch_size), "
                                 f"got {', '.join(map(str, bad))}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("intra_op_threads and inter_op_threads must be >= 0 (0: the "
                             "runtime's default)")

    def runtime_parameters(self, runtime: str) -> dict:
        """The python-backend config.pbtxt parameters (string values) for ``runtime``'s
        threads: intra_op_threads always; inter_op_threads and allow_spinning for
        onnxruntime only (OpenVINO has neither)."""
        params = {"intra_op_threads": str(int(self.intra_op_threads))}
        if runtime == "onnxruntime":
            params["inter_op_threads"] = str(int(self.inter_op_threads))
            params["allow_spinning"] = "1" if self.allow_spinning else "0"
        return params


def _parameter(key: str, value) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"config.pbtxt parameter {key}={text!r}: no quotes, backslashes or "
                         "newlines")
    return f'parameters {{ key: "{key}" value: {{ string_value: "{text}" }} }}'


def config_pbtxt(name: str, tower: Tower, sidecar: Sidecar, backend: str,
                 precision: Precision, tensorrt: bool = False, instances: int = 1,
                 runtime: str = "onnxruntime", runtime_options: dict | None = None,
                 policy: ServingPolicy | None = None) -> str:
    """The config.pbtxt text of one endpoint.

    Args:
        runtime, runtime_options: with the python backend, which runtime model.py runs and its
            string parameters (``runtimes.runtime_options``: threads, spinning, openvino
            precision hint and streams, plus anything informative such as ``runtime_choice``);
            thread parameters it lacks come from ``policy``.
        instances: kept for callers that set only the instance count; ``policy.instances``
            wins where a policy is given.
        policy: batching, instances, warm-up and threads (default: ServingPolicy()).

    Raises:
        ValueError: unknown backend; a runtime other than onnxruntime on the onnxruntime
            backend; a parameter value with a quote, backslash or newline.
    """
    if backend == "openvino":  # NVIDIA's OpenVINO backend: its own parameters, no model.py
        from clipserve.export import openvino_backend

        return openvino_backend.config_pbtxt(name, tower, sidecar, precision,
                                             instances=instances,
                                             note=(runtime_options or {}).get("note", ""))
    if tower is Tower.IMAGE:
        input_name, dtype = IMAGE_INPUT, "TYPE_UINT8"
        dims = [sidecar.image_size, sidecar.image_size, 3]
    else:
        input_name, dtype, dims = TEXT_INPUT, "TYPE_INT32", [sidecar.context_length]
    lines = [f'name: "{name}"']
    if backend == "python":
        lines.append('backend: "python"')
    elif backend == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    else:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    policy = policy or ServingPolicy(instances=instances)
    preferred = (f"preferred_batch_size: [{', '.join(map(str, policy.preferred_batch_sizes))}] "
                 if policy.preferred_batch_sizes else "")
    lines += [
        f"max_batch_size: {MAX_BATCH_SIZE}",
        f'input [ {{ name: "{input_name}" data_type: {dtype} dims: {dims} }} ]',
        f'output [ {{ name: "{EMBEDDING_OUTPUT}" data_type: TYPE_FP32 dims: [{sidecar.embed_dim}] }} ]',
        f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: "
        f"{policy.max_queue_delay_us} }}",
    ]
    lines += warmup_lines(input_name, dtype, dims, tower, policy)
    if backend == "python":
        lines.append(f"instance_group [ {{ count: {policy.instances} kind: KIND_CPU }} ]")
        params = {"runtime": runtime, **policy.runtime_parameters(runtime),
                  **(runtime_options or {})}
        lines += [_parameter(key, value) for key, value in params.items()]
    elif runtime != "onnxruntime":
        raise ValueError(f"runtime {runtime!r} needs --backend python (the onnxruntime backend "
                         "is onnxruntime itself; NVIDIA's OpenVINO backend: k8s/overlays/cpu)")
    else:
        lines.append(f"instance_group [ {{ count: {policy.instances} kind: KIND_GPU }} ]")
        # NVIDIA's onnxruntime backend names its thread settings thus (its README, "Model
        # Config Options"); it has no spinning parameter.
        lines += [_parameter("intra_op_thread_count", policy.intra_op_threads),
                  _parameter("inter_op_thread_count", policy.inter_op_threads)]
        trt_mode = {Precision.FP32: "FP32", Precision.FP16: "FP16"}.get(precision)
        # TensorRT's explicit int8 takes symmetric Q/DQ only (quantize.to_int8_tensorrt);
        # the CPU recipes (uint8 activations, or dynamic MatMulInteger) run on the CUDA EP.
        if precision is Precision.INT8 and sidecar.quantization.get("method") == \
                "int8-tensorrt-qdq":
            trt_mode = "INT8"
        if tensorrt and trt_mode:
            lines.append(
                "optimization { execution_accelerators { gpu_execution_accelerator: [ { "
                f'name: "tensorrt" parameters {{ key: "precision_mode" value: "{trt_mode}" }} '
                'parameters { key: "max_workspace_size_bytes" value: "1073741824" } } ] } }')
    return "\n".join(lines) + "\n"


def warmup_lines(input_name: str, dtype: str, dims: list[int], tower: Tower,
                 policy: ServingPolicy) -> list[str]:
    """The ``model_warmup`` entries: one sample per warm-up batch size, which Triton runs on
    every instance before it reports the model READY (any backend, the python one included:
    its log shows ``running warmup sample``). A sample of batch N reaches model.py as N
    requests of one item in one ``execute``, which runs them as one batch of N."""
    if policy.model_warmup == "none" or not policy.warmup_batch_sizes:
        return []
    data = "random_data" if policy.model_warmup == "random" and tower is Tower.IMAGE \
        else "zero_data"
    samples = [
        f'{{ name: "{data.split("_")[0]}_batch{size}" batch_size: {size} inputs {{ key: '
        f'"{input_name}" value: {{ data_type: {dtype} dims: {dims} {data}: true }} }} }}'
        for size in dict.fromkeys(policy.warmup_batch_sizes)]
    return ["model_warmup [ " + ", ".join(samples) + " ]"]


def write_endpoint(repository: Path, onnx_path: Path, sidecar: Sidecar, backend: str = "python",
                   tensorrt: bool = False, tokenizer_json: Path | None = None,
                   runtime: str = "onnxruntime", runtime_options: dict | None = None,
                   policy: ServingPolicy | None = None,
                   finish: Callable[[Path], None] | None = None) -> Path:
    """Create ``<repository>/<endpoint>/`` with config, model, sidecar (and tokenizer for
    text towers). ``runtime``, ``runtime_options`` and ``policy`` go to config.pbtxt (see
    :func:`config_pbtxt`); ``finish`` adds more files (an OOD state) to the directory before
    it appears.

    The repository may be served (Triton polling it, see ``triton_repository_poll_s``): the
    endpoint is built in a staging directory beside the repository and renamed into place, so
    Triton and the gateway never see a half-written model, and the other endpoints are not
    touched. An existing endpoint of the same name is replaced (swapped out by rename, then
    deleted). Returns the endpoint's directory."""
    tower, precision = Tower(sidecar.tower), Precision(sidecar.precision)
    name = endpoint_name(sidecar.scale, precision, tower)
    repository = Path(repository)
    endpoint = repository / name
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.{name}.",
                                    dir=_staging_parent(repository)))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(onnx_path, staging / "1" / "model.onnx")
        if backend == "python":
            shutil.copyfile(TEMPLATE, staging / "1" / "model.py")
            precompile_model_py(staging / "1" / "model.py")
        sidecar.write(staging)
        if tower is Tower.TEXT:
            if tokenizer_json is None:
                raise ValueError(f"{name}: a text endpoint needs its tokenizer.json")
            shutil.copyfile(tokenizer_json, staging / TOKENIZER_FILENAME)
        if finish is not None:
            finish(staging)
        # Last: a polling Triton that sees a staging directory inside the repository (see
        # _staging_parent) finds no config, or one naming another directory, and skips it.
        (staging / "config.pbtxt").write_text(
            config_pbtxt(name, tower, sidecar, backend, precision, tensorrt,
                         runtime=runtime, runtime_options=runtime_options, policy=policy))
        staging.chmod(0o755)  # mkdtemp makes it 0700; Triton may run as another user
        publish_directory(staging, endpoint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return endpoint


def precompile_model_py(path: Path) -> None:
    """Write ``model.py``'s ``__pycache__`` entry now. Triton's python stub writes it on the
    first load otherwise, which a polling Triton (``--model-control-mode=poll``) sees as a
    change to the model and answers with a reload of every model right after it loaded it.
    Hash-checked, so it stays valid when the directory is copied (new mtimes); written for
    this interpreter's tag: a stub of another Python version still writes its own (one
    reload, harmless)."""
    import py_compile

    try:
        py_compile.compile(str(path), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    except (py_compile.PyCompileError, OSError) as exc:
        raise ValueError(f"cannot compile {path}: {exc}") from exc


def _staging_parent(repository: Path) -> Path:
    """Where endpoints are built before the rename: beside the repository, since Triton takes
    every directory inside it for a model; inside it (a hidden name) only where the repository
    is a mount point, so the rename stays on one file system."""
    resolved = repository.resolve()
    if resolved.parent.stat().st_dev == resolved.stat().st_dev:
        return resolved.parent
    return resolved


def publish_directory(source: Path, target: Path) -> None:
    """Move the complete directory ``source`` to ``target`` (same file system) by rename; an
    existing ``target`` is first renamed aside and deleted after, so ``target`` is never
    partly written (it is absent for the instant between the two renames)."""
    source, target = Path(source), Path(target)
    if not target.exists():
        source.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=source.parent))
    target.rename(retired / target.name)
    source.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
