"""The warm-up/spinning benchmark's variant repositories: the same endpoint files, config.pbtxt
rendered again for each policy with the endpoint's runtime parameters kept."""

from clipserve.endpoints import Sidecar
from clipserve.export.repository import ServingPolicy, write_endpoint
from clipserve.loadtest import warmup_bench


def test_variants_differ_only_in_the_policy(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read here")
    sidecar = Sidecar(scale="s", precision="fp32", tower="image", embed_dim=4, source="t",
                      image_size=8)
    write_endpoint(tmp_path / "src", onnx, sidecar,
                   runtime_options={"runtime_choice": "auto: onnxruntime"},
                   policy=ServingPolicy(intra_op_threads=3))
    dest = warmup_bench.retuned_repository(tmp_path / "src", tmp_path / "spin", ["s_fp32_image"],
                                           ServingPolicy(allow_spinning=True, model_warmup="none"))
    endpoint = dest / "s_fp32_image"
    text = (endpoint / "config.pbtxt").read_text()
    params = warmup_bench.endpoint_parameters(text)
    assert params == {"runtime": "onnxruntime", "intra_op_threads": "0", "inter_op_threads": "1",
                      "allow_spinning": "1", "runtime_choice": "auto: onnxruntime"}
    assert "model_warmup" not in text
    assert (endpoint / "1" / "model.onnx").resolve() == (
        tmp_path / "src" / "s_fp32_image" / "1" / "model.onnx").resolve()
    assert Sidecar.read(endpoint) == sidecar
    default = warmup_bench.retuned_repository(tmp_path / "src", tmp_path / "default",
                                              ["s_fp32_image"], ServingPolicy())
    assert warmup_bench.endpoint_parameters(
        (default / "s_fp32_image" / "config.pbtxt").read_text())["allow_spinning"] == "0"
