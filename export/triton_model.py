"""Triton python-backend model that runs one clipserve tower with ONNX Runtime or OpenVINO.

Copied as ``<endpoint>/1/model.py`` by the export. It imports nothing from clipserve, only
numpy, onnxruntime and (when config.pbtxt asks for it and it is installed) openvino, so it runs
in any Python that Triton's stub uses. Tensor names and dtypes come from the parsed
config.pbtxt, the single source of truth. Triton's dynamic batcher hands ``execute`` several
requests at once; they run as one batch, and a malformed request gets its own error without
failing the others.

config.pbtxt parameters (all string values):
- ``runtime``: ``onnxruntime`` (default) or ``openvino``. OpenVINO reads the same model.onnx
  (QDQ int8 included). Where openvino cannot be imported or cannot compile the graph, the model
  logs why and runs onnxruntime instead, so a repository stays servable without it.
- ``intra_op_threads``: compute threads (0: all cores). OpenVINO: INFERENCE_NUM_THREADS.
- ``inter_op_threads`` (onnxruntime): threads across graph nodes; above 1 the session runs
  with ORT_PARALLEL, otherwise sequentially (default 1).
- ``allow_spinning`` (onnxruntime): ``1`` lets idle pool threads spin waiting for work
  (``session.intra_op.allow_spinning`` and ``session.inter_op.allow_spinning``); ``0``
  (default, as the export writes it) makes them sleep, leaving the cores to the gateway.
  OpenVINO has no such setting.
- ``openvino_precision_hint``: INFERENCE_PRECISION_HINT (``f32``, ``bf16``, ``f16``; empty:
  the runtime's default, which is bf16 on CPUs with native bf16, so FP32 endpoints set f32).
- ``openvino_streams``: NUM_STREAMS (default 1: Triton runs one batch per instance at a time).

The ``build_*`` functions are also used in-process by the export's measurements
(``clipserve.export.runtimes``), so what the export measured is what Triton serves.
"""

import json
import os

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton by clipserve.export.runtimes for the builders
    pb_utils = None

RUNTIMES = ("onnxruntime", "openvino")


def _parameter(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def build_onnxruntime(path, threads=0, providers=("CPUExecutionProvider",), inter_op_threads=1,
                      allow_spinning=False):
    """An onnxruntime session on ``path`` (threads 0: all cores). Returns a callable
    ``run(input_name, batch) -> first output``."""
    options = ort.SessionOptions()
    # 0 lets onnxruntime use every core; set lower when several instances share a node.
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = int(inter_op_threads)
    options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if int(inter_op_threads) > 1
                              else ort.ExecutionMode.ORT_SEQUENTIAL)
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = [p for p in providers if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), options, providers=available or None)

    def run(input_name, batch):
        return session.run(None, {input_name: batch})[0]
    return run


def openvino_config(precision_hint="", threads=0, streams="1"):
    """The CPU plugin properties for compile_model: precision hint, threads, streams."""
    config = {"NUM_STREAMS": str(streams or "1")}
    if precision_hint:
        config["INFERENCE_PRECISION_HINT"] = str(precision_hint)
    if int(threads) > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def build_openvino(path, precision_hint="", threads=0, streams="1"):
    """An OpenVINO CPU compiled model on the ONNX file ``path``. Returns a callable
    ``run(input_name, batch) -> first output`` (one infer request: calls are serial).
    Raises ImportError without openvino, RuntimeError where it cannot read or compile it."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  openvino_config(precision_hint, threads, streams))
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(input_name, batch):
        # copy: the request's output buffer is reused by the next inference
        return np.array(request.infer({input_name: batch})[output], copy=True)
    return run


def build_from_config(path, config):
    """The runner ``config`` (the parsed config.pbtxt, as Triton hands it to ``initialize``)
    asks for on the ONNX file ``path``: ``(runtime, run)``, with ``runtime`` what really runs
    (``onnxruntime`` where openvino was asked for but cannot load). Tests use it to compute
    the reference an endpoint must equal on whatever runtime the export chose for it.

    Raises:
        ValueError: an unknown ``runtime`` parameter.
    """
    threads = int(_parameter(config, "intra_op_threads", "0"))
    runtime = _parameter(config, "runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise ValueError(f"{config.get('name')}: parameter runtime must be one of "
                         f"{', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "openvino":
        try:
            return runtime, build_openvino(
                path, _parameter(config, "openvino_precision_hint", ""), threads,
                _parameter(config, "openvino_streams", "1"))
        except Exception as exc:  # not installed in this stub's Python, or cannot compile
            _log_warn(f"{config.get('name')}: runtime openvino unavailable "
                      f"({type(exc).__name__}: {exc}); falling back to onnxruntime")
    wanted = _parameter(config, "execution_providers", "CPUExecutionProvider").split(",")
    return "onnxruntime", build_onnxruntime(
        path, threads, wanted, int(_parameter(config, "inter_op_threads", "1")),
        _parameter(config, "allow_spinning", "0") == "1")


def _log_warn(message):
    if pb_utils is not None:
        pb_utils.Logger.log_warn(message)


def _log_info(message):
    if pb_utils is not None:
        pb_utils.Logger.log_info(message)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        (model_input,), (model_output,) = config["input"], config["output"]
        self.input_name = model_input["name"]
        self.output_name = model_output["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(model_input["data_type"])
        self.input_dims = tuple(int(d) for d in model_input["dims"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.runtime, self.run = build_from_config(path, config)
        _log_info(f"{config.get('name')}: serving with {self.runtime}")

    def _check(self, array):
        if array.dtype != self.input_dtype:
            return f"{self.input_name} must be {self.input_dtype}, got {array.dtype}"
        if array.ndim != len(self.input_dims) + 1 or any(
                want != -1 and want != got for want, got in zip(self.input_dims, array.shape[1:])):
            return (f"{self.input_name} must have shape [batch, "
                    f"{', '.join(map(str, self.input_dims))}], got {list(array.shape)}")
        return None

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = self._check(array)
            if problem:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
            else:
                arrays.append(array)
                owners.append(i)
        if arrays:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            try:
                out = self.run(self.input_name, batch)
            except Exception as exc:  # one bad run must not take the model down
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.runtime} failed: {exc}"))
                return responses
            start = 0
            for i, array in zip(owners, arrays):
                part = out[start:start + len(array)].astype(np.float32, copy=False)
                start += len(array)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.output_name, part)])
        return responses
