"""The CPU runtimes: OpenVINO against onnxruntime FP32 for every precision, the runtime choice,
the fallback to onnxruntime where openvino is missing, config.pbtxt parameters, and the
bf16 plan on faked CPUs."""

import builtins
import json
import sys
import types

import numpy as np
import pytest

from clipserve import calibration as cal
from clipserve import cpu
from clipserve.endpoints import Precision, Sidecar, Tower
from clipserve.export import evaluate, quantize, repository, runtimes, train, triton_model
from clipserve.export import onnx_export as ox

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """digits-s (random init) towers at every precision's ONNX file, like the export makes."""
    import open_clip
    import torch

    train.register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("digits-s").eval()
    shapes = ox.tower_shapes(model)
    out = tmp_path_factory.mktemp("variants")
    files = {}
    for tower in Tower:
        fp32 = ox.export_tower(model, tower, shapes, out / f"fp32_{tower.value}.onnx")
        calib = ox.random_inputs(tower, shapes, 48, seed=5)
        files[Precision.FP32, tower] = files[Precision.BF16, tower] = fp32
        files[Precision.FP16, tower] = out / f"fp16_{tower.value}.onnx"
        quantize.to_fp16(fp32, files[Precision.FP16, tower])
        files[Precision.INT8, tower] = out / f"int8_{tower.value}.onnx"
        quantize.to_int8_static(fp32, files[Precision.INT8, tower],
                                evaluate.make_session(fp32).get_inputs()[0].name,
                                [calib[i:i + 16] for i in range(0, 48, 16)])
        files["int8-dynamic", tower] = out / f"int8dyn_{tower.value}.onnx"
        quantize.to_int8_dynamic(fp32, files["int8-dynamic", tower])
        files[Precision.INT4, tower] = out / f"int4_{tower.value}.onnx"
        quantize.to_int4(fp32, files[Precision.INT4, tower])
    return files, shapes


# Min cosine of OpenVINO on each precision's file against onnxruntime on the FP32 file, over 32
# random inputs of a random-init digits-s. Measured here (image / text): fp32 1.000000 /
# 1.000000, fp16 1.000000 / 0.999999, bf16 0.999976 / 0.999877, int8 static 0.99986 / 0.99585,
# int8 dynamic 0.99993 / 0.99717, int4 0.9927 / 0.8994. Why each bound:
# - fp32: the same float32 arithmetic in another order (hint f32), rounding only.
# - fp16: float16 weights, but OpenVINO computes in f32 under the f32 hint.
# - bf16: 8 mantissa bits in matmul inputs (relative error ~2^-9 per product, averaging out
#   over long dot products, float32 accumulation): the 0.999 target.
# - int8/int4: bounded by the quantization itself (onnxruntime on the same file is as far from
#   FP32; random-init text embeddings suffer most from 4-bit blocks), so these are loose and
#   SAME_FILE below checks that OpenVINO adds almost nothing to it.
BOUNDS = {Precision.FP32: 0.99999, Precision.FP16: 0.9999, Precision.BF16: 0.999,
          Precision.INT8: 0.99, "int8-dynamic": 0.99, Precision.INT4: 0.85}
# OpenVINO vs onnxruntime on the same quantized file: the same integer arithmetic up to
# requantization rounding (measured >= 0.9998 static, 0.9982 dynamic, 0.99995 int4).
SAME_FILE = {Precision.INT8: 0.999, "int8-dynamic": 0.995, Precision.INT4: 0.999}


@pytest.mark.parametrize("key", list(BOUNDS))
@pytest.mark.parametrize("tower", list(Tower))
def test_openvino_parity_per_precision(variants, key, tower):
    files, shapes = variants
    precision = key if isinstance(key, Precision) else Precision.INT8  # int8-dynamic
    inputs = ox.random_inputs(tower, shapes, 32, seed=11)
    reference = evaluate.embed(evaluate.make_session(files[Precision.FP32, tower]), inputs)
    session = runtimes.make_session(files[key, tower], "openvino", precision, threads=2)
    got = evaluate.embed(session, inputs, batch_size=8)
    assert got.shape == reference.shape and np.isfinite(got).all()
    cos = cal.cosine_rows(got, reference)
    assert cos.min() >= BOUNDS[key], (key, tower, cos.min())
    if key is Precision.FP32:  # hint f32: not silently bf16 (would be ~0.999, not 1 - 1e-6)
        assert cos.min() >= 0.999999
    if key in SAME_FILE:
        same = evaluate.embed(evaluate.make_session(files[key, tower]), inputs)
        assert cal.cosine_rows(got, same).min() >= SAME_FILE[key]


def test_bf16_hint_really_changes_the_arithmetic(variants):
    files, shapes = variants
    inputs = ox.random_inputs(Tower.IMAGE, shapes, 8, seed=2)
    f32 = runtimes.make_session(files[Precision.FP32, Tower.IMAGE], "openvino", "fp32", 1)
    bf16 = runtimes.make_session(files[Precision.BF16, Tower.IMAGE], "openvino", "bf16", 1)
    a, b = (s.run(None, {"pixels": inputs})[0] for s in (f32, bf16))
    assert not np.array_equal(a, b)  # the hint reached the plugin
    assert cal.cosine_rows(a, b).min() < 0.999999


def fake_speed(monkeypatch, speeds):
    monkeypatch.setattr(runtimes, "_throughput", lambda session, batch, s: speeds[session.runtime])


@pytest.mark.parametrize("speeds, want", [
    ({"onnxruntime": 10.0, "openvino": 20.0}, "openvino"),
    ({"onnxruntime": 10.0, "openvino": 10.2}, "onnxruntime"),  # within SWITCH_MARGIN
    ({"onnxruntime": 20.0, "openvino": 10.0}, "onnxruntime"),
])
def test_choose_runtime_picks_the_faster_that_agrees(variants, monkeypatch, speeds, want):
    files, shapes = variants
    fake_speed(monkeypatch, speeds)
    batch = ox.random_inputs(Tower.IMAGE, shapes, 4)
    runtime, info = runtimes.choose_runtime(files[Precision.FP32, Tower.IMAGE], "fp32", batch, 0.01, 1)
    assert runtime == info["chosen"] == want
    assert info["candidates"]["openvino"]["items_per_s"] == speeds["openvino"]
    assert info["candidates"]["openvino"]["min_cosine_to_ort"] >= 0.99999
    assert str(speeds[want]) in info["why"] or "not >=" in info["why"]


def test_choose_runtime_rejects_a_runtime_that_disagrees(variants, monkeypatch):
    files, shapes = variants
    fake_speed(monkeypatch, {"onnxruntime": 1.0, "openvino": 100.0})
    monkeypatch.setattr(runtimes, "_min_cosine", lambda a, b: 0.5)
    batch = ox.random_inputs(Tower.IMAGE, shapes, 4)
    runtime, info = runtimes.choose_runtime(files[Precision.FP32, Tower.IMAGE], "fp32", batch, 0.01, 1)
    assert runtime == "onnxruntime" and "disagrees" in info["why"]
    with pytest.raises(runtimes.RuntimeUnavailable, match="disagrees"):
        runtimes.choose_runtime(files[Precision.BF16, Tower.IMAGE], "bf16", batch, 0.01, 1)


def test_bf16_is_openvino_only(variants):
    files, shapes = variants
    assert runtimes.candidates("bf16") == ("openvino",)
    with pytest.raises(ValueError, match="bf16 needs runtime openvino"):
        runtimes.runtime_options("onnxruntime", "bf16")
    runtime, options, info = runtimes.plan_runtime(
        "onnxruntime", files[Precision.BF16, Tower.TEXT], "bf16",
        ox.random_inputs(Tower.TEXT, shapes, 2), 0.01, 1)
    assert runtime == "openvino" and options["openvino_precision_hint"] == "bf16"
    assert runtimes.runtime_options("openvino", "int8")["openvino_precision_hint"] == "f32"


@pytest.fixture
def no_openvino(monkeypatch):
    """Make `import openvino` fail as it does where the package is not installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino' (simulated)")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_without_openvino_the_export_falls_back(variants, no_openvino):
    files, shapes = variants
    batch = ox.random_inputs(Tower.IMAGE, shapes, 4)
    assert runtimes.openvino_version() is None
    with pytest.raises(runtimes.RuntimeUnavailable, match="not installed"):
        runtimes.make_session(files[Precision.FP32, Tower.IMAGE], "openvino")
    runtime, info = runtimes.choose_runtime(files[Precision.FP32, Tower.IMAGE], "fp32", batch, 0.01, 1)
    assert runtime == "onnxruntime" and "openvino unavailable" in info["why"]
    runtime, options, _ = runtimes.plan_runtime("openvino", files[Precision.INT8, Tower.IMAGE],
                                                "int8", batch, 0.01, 1)
    assert runtime == options["runtime"] == "onnxruntime" and "unavailable" in options["runtime_choice"]
    with pytest.raises(runtimes.RuntimeUnavailable):
        runtimes.plan_runtime("auto", files[Precision.BF16, Tower.IMAGE], "bf16", batch, 0.01, 1)
    ok, why = runtimes.bf16_plan(cpu.from_flags(["avx512_bf16"]), allow_emulated=True)
    assert not ok and "needs OpenVINO" in why


class FakePbUtils(types.ModuleType):
    """The slice of triton_python_backend_utils that model.py's initialize/execute use."""

    def __init__(self):
        super().__init__("triton_python_backend_utils")
        self.logged = []
        utils = self

        class Logger:
            @staticmethod
            def log_warn(message):
                utils.logged.append(("warn", message))

            @staticmethod
            def log_info(message):
                utils.logged.append(("info", message))

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, array

            def as_numpy(self):
                return self.array

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error = list(output_tensors), error

        self.Logger, self.Tensor, self.InferenceResponse = Logger, Tensor, InferenceResponse
        self.TritonError = str
        self.triton_string_to_numpy = lambda t: {"TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32}[t]
        self.get_input_tensor_by_name = lambda request, name: request[name]


def load_model(monkeypatch, tmp_path, onnx_file, parameters):
    """Run model.py's initialize as Triton would, on an endpoint directory in tmp_path."""
    pb = FakePbUtils()
    monkeypatch.setattr(triton_model, "pb_utils", pb)
    (tmp_path / "1").mkdir(exist_ok=True)
    (tmp_path / "1" / "model.onnx").write_bytes(onnx_file.read_bytes())
    config = {"name": "digits-s_bf16_image",
              "input": [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": ["32", "32", "3"]}],
              "output": [{"name": "embedding", "data_type": "TYPE_FP32", "dims": ["64"]}],
              "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model = triton_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path),
                      "model_version": "1"})
    return model, pb


def test_triton_model_runs_openvino_and_falls_back_when_missing(variants, monkeypatch, tmp_path):
    files, shapes = variants
    params = runtimes.runtime_options("openvino", "bf16", threads=1)
    model, pb = load_model(monkeypatch, tmp_path, files[Precision.BF16, Tower.IMAGE], params)
    assert model.runtime == "openvino" and ("info", "digits-s_bf16_image: serving with openvino") in pb.logged
    pixels = ox.random_inputs(Tower.IMAGE, shapes, 3)
    (ok, bad) = model.execute([{"pixels": pb.Tensor("pixels", pixels)},
                               {"pixels": pb.Tensor("pixels", pixels[:, :8])}])
    assert ok.error is None and ok.output_tensors[0].array.shape == (3, shapes.embed_dim)
    assert "must have shape" in bad.error

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(
        ImportError("simulated")) if name == "openvino" else real_import(name, *a, **k))
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    fallback, pb = load_model(monkeypatch, tmp_path, files[Precision.BF16, Tower.IMAGE], params)
    assert fallback.runtime == "onnxruntime"
    assert any(level == "warn" and "falling back to onnxruntime" in m and "simulated" in m
               for level, m in pb.logged)
    (response,) = fallback.execute([{"pixels": pb.Tensor("pixels", pixels)}])
    got = response.output_tensors[0].array
    assert cal.cosine_rows(got, ok.output_tensors[0].array).min() >= BOUNDS[Precision.BF16]


def test_triton_model_rejects_an_unknown_runtime(variants, monkeypatch, tmp_path):
    files, _ = variants
    with pytest.raises(ValueError, match="onnxruntime, openvino"):
        load_model(monkeypatch, tmp_path, files[Precision.FP32, Tower.IMAGE], {"runtime": "tvm"})


def sidecar():
    return Sidecar(scale="s", precision="bf16", tower="image", embed_dim=8, source="t",
                   image_size=32)


def test_config_pbtxt_carries_the_runtime():
    options = dict(runtimes.runtime_options("openvino", "bf16", 2), runtime_choice="auto: x 1.5x")
    text = repository.config_pbtxt("s_bf16_image", Tower.IMAGE, sidecar(), "python",
                                   Precision.BF16, runtime="openvino", runtime_options=options)
    for key, value in [("runtime", "openvino"), ("openvino_precision_hint", "bf16"),
                       ("intra_op_threads", "2"), ("runtime_choice", "auto: x 1.5x")]:
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in text
    assert text.count('key: "runtime"') == 1
    plain = repository.config_pbtxt("s_fp32_image", Tower.IMAGE, sidecar(), "python", Precision.FP32)
    assert 'key: "runtime" value: { string_value: "onnxruntime" }' in plain
    with pytest.raises(ValueError, match="needs --backend python"):
        repository.config_pbtxt("s", Tower.IMAGE, sidecar(), "onnxruntime", Precision.FP32,
                                runtime="openvino")
    with pytest.raises(ValueError, match="no quotes"):
        repository.config_pbtxt("s", Tower.IMAGE, sidecar(), "python", Precision.FP32,
                                runtime_options={"runtime_choice": 'say "hi"'})


@pytest.mark.parametrize("flags, allow, backend, want, text", [
    (["avx512f", "avx512_bf16"], False, "python", True, "AVX512_BF16"),
    (["amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"], False, "python", True, "AMX"),
    (["avx2", "fma"], False, "python", False, "emulated"),
    (["avx2", "fma"], True, "python", True, "as asked"),
    (["amx_tile", "amx_bf16", "amx_int8"], True, "onnxruntime", False, "TensorRT"),
])
def test_bf16_plan(flags, allow, backend, want, text):
    ok, why = runtimes.bf16_plan(cpu.from_flags(flags), allow, backend)
    assert ok is want and text in why


def test_export_config_validates_the_runtime():
    from clipserve.export.config import ExportConfig

    assert ExportConfig().runtime == "auto" and not ExportConfig().allow_emulated_bf16
    assert ExportConfig(runtime="openvino").runtime == "openvino"
    with pytest.raises(ValueError, match="auto, onnxruntime, openvino"):
        ExportConfig(runtime="tvm")
