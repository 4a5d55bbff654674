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
