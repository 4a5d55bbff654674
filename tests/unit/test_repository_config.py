"""config.pbtxt for both backends: the Python backend for the CPU tritonserver, and
onnxruntime_onnx (optionally with TensorRT) for NVIDIA's GPU images."""

import pytest

from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.export.repository import config_pbtxt

IMAGE = Sidecar(scale="ViT-B-32", precision="fp16", tower="image", embed_dim=512, source="x",
                image_size=224)
TEXT = Sidecar(scale="ViT-B-32", precision="int8", tower="text", embed_dim=512, source="x",
               context_length=77, quantization={"method": "int8-dynamic"})


def test_python_backend_image_config():
    text = config_pbtxt("ViT-B-32_fp16_image", Tower.IMAGE, IMAGE, "python", Precision.FP16)
    assert 'backend: "python"' in text and "platform" not in text
    assert 'name: "pixels" data_type: TYPE_UINT8 dims: [224, 224, 3]' in text
    assert 'name: "embedding" data_type: TYPE_FP32 dims: [512]' in text
    assert "dynamic_batching" in text and "KIND_CPU" in text


def test_onnxruntime_platform_with_tensorrt_only_where_tensorrt_runs_the_graph():
    fp16 = config_pbtxt("ViT-B-32_fp16_image", Tower.IMAGE, IMAGE, "onnxruntime", Precision.FP16,
                        tensorrt=True)
    assert 'platform: "onnxruntime_onnx"' in fp16 and "KIND_GPU" in fp16
    assert '"precision_mode" value: "FP16"' in fp16
    # Dynamic INT8 (MatMulInteger) has no TensorRT path: it must run on the CUDA EP instead.
    dynamic = config_pbtxt("ViT-B-32_int8_text", Tower.TEXT, TEXT, "onnxruntime", Precision.INT8,
                           tensorrt=True)
    assert "tensorrt" not in dynamic
    assert 'name: "input_ids" data_type: TYPE_INT32 dims: [77]' in dynamic
    # The CPU's static recipe has uint8 (asymmetric) activations, which TensorRT rejects.
    qdq = Sidecar(**{**TEXT.__dict__, "quantization": {"method": "int8-static-qdq"}})
    assert "tensorrt" not in config_pbtxt(
        "ViT-B-32_int8_text", Tower.TEXT, qdq, "onnxruntime", Precision.INT8, tensorrt=True)
    trt = Sidecar(**{**TEXT.__dict__, "quantization": {"method": "int8-tensorrt-qdq"}})
    assert '"precision_mode" value: "INT8"' in config_pbtxt(
        "ViT-B-32_int8_text", Tower.TEXT, trt, "onnxruntime", Precision.INT8, tensorrt=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid: python, onnxruntime"):
        config_pbtxt("x_fp32_image", Tower.IMAGE, IMAGE, "tensorflow", Precision.FP32)


# -- the serving policy: export flags -> config.pbtxt -> model.py ------------------------------

import argparse
import json

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from clipserve import config as flags
from clipserve.export import triton_model
from clipserve.export.config import ExportConfig
from clipserve.export.repository import ServingPolicy

TUNED = ServingPolicy(instances=2, max_queue_delay_us=500, preferred_batch_sizes=(4, 16),
                      model_warmup="random", warmup_batch_sizes=(1, 64), intra_op_threads=3,
                      inter_op_threads=2, allow_spinning=True)


def parsed(text: str) -> model_config_pb2.ModelConfig:
    """Parse as Triton does (its ModelConfig proto): an unknown field or a typo raises."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_policy_lands_in_tritons_own_fields(backend):
    config = parsed(config_pbtxt("ViT-B-32_fp16_image", Tower.IMAGE, IMAGE, backend,
                                 Precision.FP16, tensorrt=True, policy=TUNED))
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2
    warmups = {w.batch_size: w for w in config.model_warmup}
    assert sorted(warmups) == [1, config.max_batch_size]
    for sample in warmups.values():
        (name, data), = sample.inputs.items()
        assert name == config.input[0].name and data.data_type == config.input[0].data_type
        assert list(data.dims) == list(config.input[0].dims) and data.random_data


def test_python_backend_gets_onnxruntime_threads_and_spinning():
    params = parameters(parsed(config_pbtxt("s_fp16_image", Tower.IMAGE, IMAGE, "python",
                                            Precision.FP16, policy=TUNED)))
    assert params == {"runtime": "onnxruntime", "intra_op_threads": "3",
                      "inter_op_threads": "2", "allow_spinning": "1"}
    # Defaults: spinning off, sequential graph, all cores, Triton's warm-up with zeros.
    default = parsed(config_pbtxt("s_fp16_image", Tower.IMAGE, IMAGE, "python", Precision.FP16))
    assert parameters(default)["allow_spinning"] == "0"
    assert parameters(default)["inter_op_threads"] == "1"
    assert all(w.inputs["pixels"].zero_data for w in default.model_warmup)
    assert not default.dynamic_batching.preferred_batch_size


def test_openvino_and_gpu_configs_carry_only_what_their_runtime_takes():
    openvino = parameters(parsed(config_pbtxt(
        "s_fp16_image", Tower.IMAGE, IMAGE, "python", Precision.FP16, runtime="openvino",
        policy=TUNED)))
    assert openvino["intra_op_threads"] == "3"
    assert "allow_spinning" not in openvino and "inter_op_threads" not in openvino
    gpu = parameters(parsed(config_pbtxt("s_fp16_image", Tower.IMAGE, IMAGE, "onnxruntime",
                                         Precision.FP16, policy=TUNED)))
    # NVIDIA's onnxruntime backend's own names; it has no spinning parameter.
    assert gpu == {"intra_op_thread_count": "3", "inter_op_thread_count": "2"}


def test_text_towers_warm_up_with_zeros_and_warmup_can_be_off():
    text = parsed(config_pbtxt("s_int8_text", Tower.TEXT, TEXT, "python", Precision.INT8,
                               policy=TUNED))
    # random int32 would be out-of-vocabulary token ids and fail the warm-up (and the load)
    assert [w.inputs["input_ids"].zero_data for w in text.model_warmup] == [True, True]
    assert list(text.model_warmup[0].inputs["input_ids"].dims) == [77]
    off = ServingPolicy(model_warmup="none")
    assert not parsed(config_pbtxt("s_int8_text", Tower.TEXT, TEXT, "python", Precision.INT8,
                                   policy=off)).model_warmup


def export_config(argv, env):
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, ExportConfig)
    return flags.from_args(ExportConfig, parser.parse_args(argv), env)


def test_export_flags_and_env_vars_set_the_policy():
    config = export_config(["--preferred-batch-sizes", "8,32", "--instances", "2"],
                           {"CLIPSERVE_ALLOW_SPINNING": "1", "CLIPSERVE_MAX_QUEUE_DELAY_US": "100",
                            "CLIPSERVE_MODEL_WARMUP": "random", "CLIPSERVE_INTRA_OP_THREADS": "2",
                            "CLIPSERVE_INTER_OP_THREADS": "1"})
    assert config.serving_policy() == ServingPolicy(
        instances=2, max_queue_delay_us=100, preferred_batch_sizes=(8, 32),
        model_warmup="random", intra_op_threads=2, allow_spinning=True)
    assert export_config([], {}).serving_policy() == ServingPolicy()


@pytest.mark.parametrize("kwargs, message", [
    ({"preferred_batch_sizes": ("8", "x")}, "--preferred-batch-sizes: comma-separated integers"),
    ({"preferred_batch_sizes": ("128",)}, "1..64"),
    ({"warmup_batch_sizes": ("0",)}, "warmup_batch_sizes must lie in 1..64"),
    ({"model_warmup": "ones"}, "valid: zero, random, none"),
    ({"instances": 0}, "instances must be >= 1"),
    ({"max_queue_delay_us": -1}, "max_queue_delay_us must be >= 0"),
    ({"intra_op_threads": -2}, "must be >= 0"),
])
def test_bad_policy_flags_fail_the_export_at_start(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExportConfig(**kwargs)


class _Pb:
    """The slice of triton_python_backend_utils that initialize() uses."""

    class Logger:
        log_info = log_warn = staticmethod(lambda message: None)

    triton_string_to_numpy = staticmethod(lambda t: {"TYPE_UINT8": np.uint8}[t])


@pytest.mark.parametrize("spinning, inter, mode", [("0", "1", "ORT_SEQUENTIAL"),
                                                   ("1", "4", "ORT_PARALLEL")])
def test_model_py_builds_its_session_from_the_config(monkeypatch, tmp_path, spinning, inter, mode):
    seen = {}

    class Session:  # records what model.py hands onnxruntime
        def __init__(self, path, options, providers=None):
            seen["options"] = options

    monkeypatch.setattr(triton_model, "pb_utils", _Pb)
    monkeypatch.setattr(triton_model.ort, "InferenceSession", Session)
    text = config_pbtxt("s_fp16_image", Tower.IMAGE, IMAGE, "python", Precision.FP16,
                        policy=ServingPolicy(intra_op_threads=2, inter_op_threads=int(inter),
                                             allow_spinning=spinning == "1"))
    proto = parsed(text)
    config = {"name": proto.name,
              "input": [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": ["224", "224", "3"]}],
              "output": [{"name": "embedding", "data_type": "TYPE_FP32", "dims": ["512"]}],
              "parameters": {k: {"string_value": v} for k, v in parameters(proto).items()}}
    triton_model.TritonPythonModel().initialize({
        "model_config": json.dumps(config), "model_repository": str(tmp_path),
        "model_version": "1"})
    options = seen["options"]
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == int(inter)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == spinning
    assert options.execution_mode.name == mode
