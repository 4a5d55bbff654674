"""`clipserve export --gpu-decode`: the DALI model and the ensemble, checked offline.

Configs are parsed with Triton's own ModelConfig proto (a typo or unknown field raises), the
ensemble's steps are checked against the configs of the models they name, and the DALI pipeline
compiles; it is built and run on the CPU only where nvidia.dali is importable (not in this venv:
scripts/gpu_decode_check.py checks a running Triton from NVIDIA's image).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import py_compile

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from clipserve.endpoints import (ENCODED_INPUT, Precision, Sidecar, Tower, endpoint_name,
                                 gpu_decode_model_names, parse_endpoint_name)
from clipserve.export import gpu_decode, repository
from clipserve.export.config import MAX_BATCH_SIZE, ExportConfig

SIZE, DIM = 32, 16
ENDPOINT = endpoint_name("digits-s", Precision.INT8, Tower.IMAGE)


def parsed(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def repo(tmp_path):
    onnx = tmp_path / "tower.onnx"
    onnx.write_bytes(b"not read by these tests")
    sidecar = Sidecar(scale="digits-s", precision="int8", tower="image", embed_dim=DIM,
                      source="digits-s::builtin", image_size=SIZE,
                      gpu_decode=gpu_decode.sidecar_field(ENDPOINT))
    root = tmp_path / "repo"
    repository.write_endpoint(root, onnx, sidecar, backend="onnxruntime", tensorrt=True)
    gpu_decode.write(root, ENDPOINT, sidecar, max_queue_delay_us=500)
    return root


def test_flag_needs_the_gpu_backend():
    with pytest.raises(ValueError, match="--backend onnxruntime"):
        ExportConfig(gpu_decode=True)
    assert ExportConfig(gpu_decode=True, backend="onnxruntime").gpu_decode


def test_names_never_parse_as_endpoints():
    dali, ensemble = gpu_decode_model_names(ENDPOINT)
    assert (dali, ensemble) == (f"{ENDPOINT}_dali", f"{ENDPOINT}_encoded")
    for name in (dali, ensemble):
        with pytest.raises(ValueError):
            parse_endpoint_name(name)
    assert gpu_decode.sidecar_field(ENDPOINT) == {"model": ensemble, "input": ENCODED_INPUT,
                                                  "decoder": "dali"}


def test_configs_parse_and_the_ensemble_lines_up_with_its_models(repo):
    dali_name, ensemble_name = gpu_decode_model_names(ENDPOINT)
    configs = {name: parsed(repo / name / "config.pbtxt")
               for name in (ENDPOINT, dali_name, ensemble_name)}
    tower, dali, ensemble = configs[ENDPOINT], configs[dali_name], configs[ensemble_name]
    assert dali.backend == "dali" and ensemble.platform == "ensemble"
    assert dali.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert dali.dynamic_batching.max_queue_delay_microseconds == 500
    assert dali.parameters["num_threads"].string_value == str(gpu_decode.DALI_THREADS)
    # Encoded bytes in: uint8, one variable dimension, requests of any length batch together.
    for config in (dali, ensemble):
        (inp,) = config.input
        assert (inp.name, inp.data_type, list(inp.dims), inp.allow_ragged_batch) == (
            ENCODED_INPUT, model_config_pb2.TYPE_UINT8, [-1], True)
    # The DALI model's output is exactly the tower's input; the ensemble's output its output.
    assert [(o.name, o.data_type, list(o.dims)) for o in dali.output] == \
        [(i.name, i.data_type, list(i.dims)) for i in tower.input]
    assert list(tower.input[0].dims) == [SIZE, SIZE, 3]
    assert [(o.name, o.data_type, list(o.dims)) for o in ensemble.output] == \
        [(o.name, o.data_type, list(o.dims)) for o in tower.output]
    # A batch the ensemble accepts is one every step accepts.
    assert ensemble.max_batch_size == dali.max_batch_size == tower.max_batch_size == MAX_BATCH_SIZE
    # Each step's maps name real tensors of the model it runs, and the steps chain up.
    available = {i.name for i in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) == {i.name for i in model.input}
        assert set(step.output_map) <= {o.name for o in model.output}
        assert set(step.input_map.values()) <= available
        available |= set(step.output_map.values())
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [dali_name, ENDPOINT]
    assert {o.name for o in ensemble.output} <= available
    assert (repo / ensemble_name / "1").is_dir()  # Triton needs a version directory


def test_pipeline_compiles_and_names_its_input_as_the_config(repo, tmp_path):
    source_path = repo / gpu_decode_model_names(ENDPOINT)[0] / "1" / gpu_decode.PIPELINE_FILENAME
    py_compile.compile(str(source_path), cfile=str(tmp_path / "dali.pyc"), doraise=True)
    source = source_path.read_text()
    # The DALI backend matches config inputs to external_source names.
    assert f'INPUT = "{ENCODED_INPUT}"' in source and "name=INPUT" in source
    assert f"IMAGE_SIZE = {SIZE}" in source
    decorated = [node.name for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.FunctionDef)
                 and any(getattr(d, "id", None) == "autoserialize" for d in node.decorator_list)]
    assert decorated == ["pipeline"]  # the backend allows one per model version


def test_re_export_without_the_flag_removes_them(repo):
    gpu_decode.remove(repo, ENDPOINT)
    assert not any((repo / name).exists() for name in gpu_decode_model_names(ENDPOINT))
    assert (repo / ENDPOINT / "config.pbtxt").is_file()


def test_text_endpoints_are_refused(tmp_path):
    text = Sidecar(scale="s", precision="fp32", tower="text", embed_dim=4, source="x",
                   context_length=8)
    with pytest.raises(ValueError, match="image endpoints only"):
        gpu_decode.write(tmp_path, "s_fp32_text", text, 100)


def test_pipeline_matches_the_cpu_path_where_dali_is_installed(repo):
    dali = pytest.importorskip("nvidia.dali")  # not in this venv; runs in NVIDIA's image
    from clipserve.server.images import preprocess

    path = repo / gpu_decode_model_names(ENDPOINT)[0] / "1" / gpu_decode.PIPELINE_FILENAME
    spec = importlib.util.spec_from_file_location("clipserve_dali_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 90, 3), np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")  # lossless: differences are the resize's, not a codec's
    data = np.frombuffer(buf.getvalue() + b"\0" * 17, np.uint8)  # padded as the gateway does

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def cpu_pipeline():
        encoded = dali.fn.external_source(source=[[data]], cycle=True, dtype=dali.types.UINT8)
        return module.preprocess(encoded, device="cpu")

    pipe = cpu_pipeline()
    pipe.build()
    (out,) = pipe.run()
    pixels = np.asarray(out.as_tensor())[0]
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    exact = preprocess(buf.getvalue(), SIZE, max_bytes=1 << 20, max_pixels=1 << 20)
    assert np.abs(pixels.astype(int) - exact.astype(int)).mean() < 3.0


@pytest.mark.parametrize("flag", [True, False])
def test_the_export_writes_them_beside_every_image_endpoint_only_with_the_flag(
        tmp_path, monkeypatch, flag):
    from types import SimpleNamespace

    from clipserve.export import pipeline, quality

    monkeypatch.setattr(quality, "image_sidecar_fields", lambda *args, **kwargs: {})
    onnx, tokenizer = tmp_path / "m.onnx", tmp_path / "tokenizer.json"
    onnx.write_bytes(b"x")
    tokenizer.write_text("{}")
    root = tmp_path / "repo"
    precisions = (Precision.FP32, Precision.INT8)
    rows = [{"precision": p.value, "tower": t.value, "quantization": {}, "output_format_params": {}}
            for p in precisions for t in Tower]
    context = {"spec": SimpleNamespace(scale="digits-s", source="digits-s::builtin"),
               "shapes": SimpleNamespace(embed_dim=DIM, image_size=SIZE, context_length=8),
               "suite": None, "native_temperature": None,
               "variants": {(p, t): (onnx,) for p in precisions for t in Tower},
               "served": {(p, t): ("onnxruntime", {}) for p in precisions for t in Tower}}
    if not flag:  # an earlier export with the flag: re-exporting without it leaves nothing stale
        pipeline.write_model(context, SimpleNamespace(rows=rows, fitted={}), precisions,
                             ExportConfig(backend="onnxruntime", gpu_decode=True,
                                          repository=str(root)),
                             tokenizer, "mcm", lambda *a: None)
        assert (root / gpu_decode_model_names(endpoint_name("digits-s", Precision.FP32,
                                                            Tower.IMAGE))[1]).is_dir()
    config = ExportConfig(backend="onnxruntime", gpu_decode=flag, repository=str(root))
    pipeline.write_model(context, SimpleNamespace(rows=rows, fitted={}), precisions, config,
                         tokenizer, "mcm", lambda *a: None)
    for p in precisions:
        image = endpoint_name("digits-s", p, Tower.IMAGE)
        car = Sidecar.read(root / image)
        extra = [(root / n).is_dir() for n in gpu_decode_model_names(image)]
        assert car.gpu_decode == (gpu_decode.sidecar_field(image) if flag else {})
        assert extra == [flag, flag]
        assert not Sidecar.read(root / endpoint_name("digits-s", p, Tower.TEXT)).gpu_decode
    assert sorted(d.name for d in root.iterdir()) == sorted(
        [endpoint_name("digits-s", p, t) for p in precisions for t in Tower]
        + ([n for p in precisions
            for n in gpu_decode_model_names(endpoint_name("digits-s", p, Tower.IMAGE))]
           if flag else []))
