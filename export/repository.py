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
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clipserve.endpoints import (EMBEDDING_OUTPUT, IMAGE_INPUT, TEXT_INPUT, Precision,
                                 Sidecar, Tower, TOKENIZER_FILENAME, endpoint_name)

from clipserve.export.config import BACKENDS
MAX_BATCH_SIZE = 64
# Long enough to gather concurrent single-image requests into a batch on a CPU, short
# against the tens of milliseconds a ViT-B image takes.
MAX_QUEUE_DELAY_US = 2000
TEMPLATE = Path(__file__).parent / "triton_model.py"


def _parameter(key: str, value) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"config.pbtxt parameter {key}={text!r}: no quotes, backslashes or "
                         "newlines")
    return f'parameters {{ key: "{key}" value: {{ string_value: "{text}" }} }}'


def config_pbtxt(name: str, tower: Tower, sidecar: Sidecar, backend: str,
                 precision: Precision, tensorrt: bool = False, instances: int = 1,
                 runtime: str = "onnxruntime", runtime_options: dict | None = None) -> str:
    """The config.pbtxt text of one endpoint.

    Args:
        runtime, runtime_options: with the python backend, which runtime model.py runs and its
            string parameters (``runtimes.runtime_options``: intra_op_threads, openvino
            precision hint and streams, plus anything informative such as ``runtime_choice``).

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
    lines += [
        f"max_batch_size: {MAX_BATCH_SIZE}",
        f'input [ {{ name: "{input_name}" data_type: {dtype} dims: {dims} }} ]',
        f'output [ {{ name: "{EMBEDDING_OUTPUT}" data_type: TYPE_FP32 dims: [{sidecar.embed_dim}] }} ]',
        f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}",
    ]
    if backend == "python":
        lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
        params = {"runtime": runtime, "intra_op_threads": "0", **(runtime_options or {})}
        lines += [_parameter(key, value) for key, value in params.items()]
    elif runtime != "onnxruntime":
        raise ValueError(f"runtime {runtime!r} needs --backend python (the onnxruntime backend "
                         "is onnxruntime itself; NVIDIA's OpenVINO backend: k8s/overlays/cpu)")
    else:
        lines.append(f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]")
        trt_mode = {Precision.FP32: "FP32", Precision.FP16: "FP16"}.get(precision)
        if precision is Precision.INT8 and sidecar.quantization.get("method") == "int8-static-qdq":
            trt_mode = "INT8"
        if tensorrt and trt_mode:
            lines.append(
                "optimization { execution_accelerators { gpu_execution_accelerator: [ { "
                f'name: "tensorrt" parameters {{ key: "precision_mode" value: "{trt_mode}" }} '
                'parameters { key: "max_workspace_size_bytes" value: "1073741824" } } ] } }')
    return "\n".join(lines) + "\n"


def write_endpoint(repository: Path, onnx_path: Path, sidecar: Sidecar, backend: str = "python",
                   tensorrt: bool = False, tokenizer_json: Path | None = None,
                   runtime: str = "onnxruntime", runtime_options: dict | None = None) -> Path:
    """Create ``<repository>/<endpoint>/`` with config, model, sidecar (and tokenizer for
    text towers). Replaces an existing endpoint of the same name. ``runtime`` and
    ``runtime_options`` go to config.pbtxt (see :func:`config_pbtxt`)."""
    tower, precision = Tower(sidecar.tower), Precision(sidecar.precision)
    name = endpoint_name(sidecar.scale, precision, tower)
    endpoint = Path(repository) / name
    if endpoint.exists():
        shutil.rmtree(endpoint)
    (endpoint / "1").mkdir(parents=True)
    shutil.copyfile(onnx_path, endpoint / "1" / "model.onnx")
    if backend == "python":
        shutil.copyfile(TEMPLATE, endpoint / "1" / "model.py")
    (endpoint / "config.pbtxt").write_text(
        config_pbtxt(name, tower, sidecar, backend, precision, tensorrt,
                     runtime=runtime, runtime_options=runtime_options))
    sidecar.write(endpoint)
    if tower is Tower.TEXT:
        if tokenizer_json is None:
            raise ValueError(f"{name}: a text endpoint needs its tokenizer.json")
        shutil.copyfile(tokenizer_json, endpoint / TOKENIZER_FILENAME)
    return endpoint
