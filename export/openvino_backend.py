"""config.pbtxt for NVIDIA's Triton OpenVINO backend (``backend: "openvino"``), written by
``clipserve export --backend openvino`` for the k8s/overlays/cpu-openvino overlay.

The backend (github.com/triton-inference-server/openvino_backend, src/openvino.cc) reads the
exported model.onnx itself (``default_model_filename: "model.onnx"``; QDQ int8 included) and
takes its OpenVINO settings from these config.pbtxt string parameters, the only ones it accepts
(any other key fails the model load with "not yet supported by openvino backend"):

- ``INFERENCE_NUM_THREADS`` (non-negative integer), ``NUM_STREAMS`` (AUTO, NUMA or an integer),
  ``PERFORMANCE_HINT`` (LATENCY, THROUGHPUT, CUMULATIVE_THROUGHPUT), ``COMPILATION_NUM_THREADS``;
- ``HINT_BF16``: only ``YES`` is valid (INFERENCE_PRECISION_HINT=bf16). There is no way to ask
  for f32: the CPU plugin's default applies, which is bf16 on CPUs with native bf16 (this
  project's Xeon with AVX512_BF16 reports it; AMX parts too). So on such a CPU the backend's
  fp32 and int8 endpoints compute their float parts in bf16, unlike the python backend's
  (which sets ``f32``); :func:`precision_note` says so and the export measures each endpoint
  under the same default;
- ``ENABLE_BATCH_PADDING``, ``SKIP_OV_DYNAMIC_BATCHSIZE``, ``RESHAPE_IO_LAYERS``,
  ``TARGET_DEVICE``, ``CPU_EXTENSION_PATH``.

Batching: with ``max_batch_size > 0`` the backend fixes the model's batch at max_batch_size
(``ov::set_batch``) and fails any other batch size unless ``ENABLE_BATCH_PADDING`` is YES, which
pads up to it. So these endpoints use a small max_batch_size (:data:`MAX_BATCH_SIZE`), padding
on, and the dynamic batcher prefers full batches; the gateway reads max_batch_size from this
file and splits larger calls into chunks of it.
"""

from __future__ import annotations

from clipserve.endpoints import (EMBEDDING_OUTPUT, IMAGE_INPUT, TEXT_INPUT, Precision, Sidecar,
                                 Tower)

# Every execution runs (and pays for) this many items: small enough that a lone request's
# padding costs little on a CPU, large enough for the matmuls to reach the cores' peak.
MAX_BATCH_SIZE = 8
MAX_QUEUE_DELAY_US = 2000
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# The parameter keys the backend accepts (src/openvino.cc ParseParameters); anything else
# fails its model load.
ACCEPTED_KEYS = frozenset({"INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS", "HINT_BF16",
                           "NUM_STREAMS", "PERFORMANCE_HINT", "SKIP_OV_DYNAMIC_BATCHSIZE",
                           "ENABLE_BATCH_PADDING", "RESHAPE_IO_LAYERS", "TARGET_DEVICE",
                           "CPU_EXTENSION_PATH"})


def parameters(precision: Precision, threads: int = 0, streams: str = "1",
               hint: str = "LATENCY") -> dict[str, str]:
    """The backend's parameters for one endpoint.

    Args:
        precision: bf16 adds HINT_BF16=YES; other precisions leave the CPU plugin's default.
        threads: INFERENCE_NUM_THREADS (0: left out, the backend uses every core).
        streams: NUM_STREAMS; "1" because Triton hands one instance one batch at a time (more
            instances, not streams, give concurrency here).
        hint: PERFORMANCE_HINT.

    Raises:
        ValueError: a negative thread count, an unknown hint or a bad stream count.
    """
    if int(threads) < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if hint.upper() not in PERFORMANCE_HINTS:
        raise ValueError(f"unknown PERFORMANCE_HINT {hint!r}; valid: {', '.join(PERFORMANCE_HINTS)}")
    if not (str(streams).isdigit() or str(streams).upper() in ("AUTO", "NUMA")):
        raise ValueError(f"NUM_STREAMS must be AUTO, NUMA or an integer, got {streams!r}")
    params = {"PERFORMANCE_HINT": hint.upper(), "NUM_STREAMS": str(streams).upper(),
              "ENABLE_BATCH_PADDING": "YES"}
    if int(threads) > 0:
        params["INFERENCE_NUM_THREADS"] = str(int(threads))
    if Precision(precision) is Precision.BF16:
        params["HINT_BF16"] = "YES"
    return params


def precision_note(precision: Precision, cpu) -> str:
    """What the backend computes ``precision`` in on :class:`clipserve.cpu.CpuInfo` ``cpu``."""
    precision = Precision(precision)
    if precision is Precision.BF16:
        return "bf16 (HINT_BF16=YES)" + ("" if cpu.bf16_native else ", emulated on this CPU")
    if cpu.bf16_native:
        return (f"{precision.value} graph, float parts in bf16: NVIDIA's openvino backend cannot "
                "ask for f32 and the CPU plugin defaults to bf16 on this CPU")
    return f"{precision.value} graph, float parts in f32 (the CPU plugin's default here)"


def config_pbtxt(name: str, tower: Tower, sidecar: Sidecar, precision: Precision,
                 threads: int = 0, streams: str = "1", hint: str = "LATENCY",
                 instances: int = 1, note: str = "") -> str:
    """The config.pbtxt text of one endpoint for NVIDIA's openvino backend (see the module
    docstring); ``note`` goes in a comment line (what the endpoint computes in)."""
    if tower is Tower.IMAGE:
        input_name, dtype = IMAGE_INPUT, "TYPE_UINT8"
        dims = [sidecar.image_size, sidecar.image_size, 3]
    else:
        input_name, dtype, dims = TEXT_INPUT, "TYPE_INT32", [sidecar.context_length]
    note = " ".join(note.split())  # one comment line
    lines = [f"# clipserve export --backend openvino: {note}" if note else None,
             f'name: "{name}"', 'backend: "openvino"', 'default_model_filename: "model.onnx"',
             f"max_batch_size: {MAX_BATCH_SIZE}",
             f'input [ {{ name: "{input_name}" data_type: {dtype} dims: {dims} }} ]',
             f'output [ {{ name: "{EMBEDDING_OUTPUT}" data_type: TYPE_FP32 '
             f"dims: [{sidecar.embed_dim}] }} ]",
             f"dynamic_batching {{ preferred_batch_size: [{MAX_BATCH_SIZE}] "
             f"max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}",
             f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
    for key, value in parameters(precision, threads, streams, hint).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(line for line in lines if line is not None) + "\n"
