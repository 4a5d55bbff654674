"""config.pbtxt for NVIDIA's Triton OpenVINO backend, checked offline (no NVIDIA image here):
parsed strictly as Triton's ModelConfig protobuf, every parameter one the backend accepts with
a value its parser takes (src/openvino.cc ParseParameterHelper), and the exported ONNX loaded
the way the backend loads it (read, u8 input with layout N..., ov::set_batch(max_batch_size),
compile with the parameters' properties) by the OpenVINO installed here."""

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from clipserve import cpu
from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.export import openvino_backend, repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

IMAGE = Sidecar(scale="s", precision="bf16", tower="image", embed_dim=16, source="x",
                image_size=8)
TEXT = Sidecar(scale="s", precision="int8", tower="text", embed_dim=16, source="x",
               context_length=77)


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())  # unknown fields raise


def params(config) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


def check_backend_accepts(values: dict) -> None:
    """What the backend's parser would reject (mirrors ParseParameterHelper/ParseBoolParameter)."""
    assert set(values) <= openvino_backend.ACCEPTED_KEYS, set(values) - openvino_backend.ACCEPTED_KEYS
    for key, value in values.items():
        low = value.lower()
        if key in ("INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS"):
            assert value.isdigit(), (key, value)
        elif key == "HINT_BF16":
            assert low == "yes", value
        elif key == "NUM_STREAMS":
            assert low in ("auto", "numa") or value.isdigit(), value
        elif key == "PERFORMANCE_HINT":
            assert low in ("latency", "throughput", "cumulative_throughput"), value
        elif key in ("ENABLE_BATCH_PADDING", "SKIP_OV_DYNAMIC_BATCHSIZE", "RESHAPE_IO_LAYERS"):
            assert low in ("yes", "no"), value


@pytest.mark.parametrize("precision, bf16", [(Precision.BF16, True), (Precision.FP32, False),
                                             (Precision.INT8, False)])
def test_image_config_parses_and_uses_only_accepted_parameters(precision, bf16):
    note = openvino_backend.precision_note(precision, cpu.from_flags(["avx512f", "avx512_bf16"]))
    text = repository.config_pbtxt(f"s_{precision.value}_image", Tower.IMAGE, IMAGE, "openvino",
                                   precision, runtime_options={"note": note})
    config = parse(text)
    assert config.backend == "openvino" and not config.platform
    assert config.default_model_filename == "model.onnx"  # the exported file, not IR
    assert config.max_batch_size == openvino_backend.MAX_BATCH_SIZE
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixels", model_config_pb2.TYPE_UINT8,
                                                         [8, 8, 3])
    assert (out.name, out.data_type, list(out.dims)) == ("embedding", model_config_pb2.TYPE_FP32,
                                                         [16])
    # The backend fixes the batch at max_batch_size: padding must be on, full batches preferred.
    assert list(config.dynamic_batching.preferred_batch_size) == [config.max_batch_size]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    values = params(config)
    check_backend_accepts(values)
    assert values["ENABLE_BATCH_PADDING"] == "YES"
    assert ("HINT_BF16" in values) is bf16
    assert "INFERENCE_NUM_THREADS" not in values  # 0 = every core, the backend's default
    if not bf16:  # the backend cannot ask for f32: the config says what it computes in
        assert text.startswith("# clipserve export --backend openvino:") and "bf16" in text


def test_text_config_and_thread_setting():
    text = openvino_backend.config_pbtxt("s_int8_text", Tower.TEXT, TEXT, Precision.INT8,
                                         threads=2, streams="AUTO", hint="throughput")
    config = parse(text)
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input_ids", model_config_pb2.TYPE_INT32,
                                                         [77])
    values = params(config)
    check_backend_accepts(values)
    assert values["INFERENCE_NUM_THREADS"] == "2" and values["NUM_STREAMS"] == "AUTO"
    assert values["PERFORMANCE_HINT"] == "THROUGHPUT"


@pytest.mark.parametrize("kwargs, message", [({"threads": -1}, "threads"),
                                             ({"hint": "fast"}, "PERFORMANCE_HINT"),
                                             ({"streams": "many"}, "NUM_STREAMS")])
def test_bad_settings_are_refused_with_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        openvino_backend.parameters(Precision.FP32, **kwargs)


def test_precision_note_follows_the_cpu():
    native = cpu.from_flags(["avx512f", "avx512_bf16"])
    assert "bf16" in openvino_backend.precision_note(Precision.FP32, native)
    assert "f32" in openvino_backend.precision_note(Precision.FP32, cpu.from_flags(["avx2"]))
    assert "emulated" in openvino_backend.precision_note(Precision.BF16, cpu.from_flags(["avx2"]))


def tiny_image_onnx(path):
    """uint8 [batch, 8, 8, 3] -> float -> flatten -> MatMul -> [batch, 16]."""
    w = np.random.default_rng(0).standard_normal((192, 16)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 192]), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return w


def test_exported_endpoint_loads_the_way_the_backend_loads_it(tmp_path):
    ov = pytest.importorskip("openvino")
    source = tmp_path / "tiny.onnx"
    w = tiny_image_onnx(source)
    endpoint = repository.write_endpoint(tmp_path / "repo", source, IMAGE, backend="openvino")
    assert sorted(p.name for p in (endpoint / "1").iterdir()) == ["model.onnx"]  # no model.py
    config = parse((endpoint / "config.pbtxt").read_text())
    values = params(config)
    # src/openvino.cc: read_model(default_model_filename), PrePostProcessor input element type
    # from data_type and layout N..., ov::set_batch(max_batch_size), compile with the
    # properties ParseParameterHelper maps the parameters to.
    core = ov.Core()
    model = core.read_model(str(endpoint / "1" / config.default_model_filename))
    ppp = ov.preprocess.PrePostProcessor(model)
    ppp.input("pixels").tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("N..."))
    model = ppp.build()
    ov.set_batch(model, config.max_batch_size)
    properties = {"PERFORMANCE_HINT": values["PERFORMANCE_HINT"],
                  "NUM_STREAMS": values["NUM_STREAMS"]}
    if values.get("HINT_BF16") == "YES":
        properties["INFERENCE_PRECISION_HINT"] = "bf16"
    compiled = core.compile_model(model, "CPU", properties)
    # One lone image, padded to the fixed batch as ENABLE_BATCH_PADDING does.
    pixels = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    padded = np.concatenate([pixels, np.zeros((config.max_batch_size - 1, 8, 8, 3), np.uint8)])
    out = compiled.create_infer_request().infer({"pixels": padded})[compiled.output(0)]
    assert out.shape == (config.max_batch_size, 16)
    want = pixels.reshape(1, -1).astype(np.float32) @ w
    cosine = float((out[0] @ want[0]) / np.linalg.norm(out[0]) / np.linalg.norm(want[0]))
    assert cosine > 0.99  # bf16 matmul against the float32 reference
