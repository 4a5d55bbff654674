"""The real tritonserver loads the exported repository and serves every endpoint: one
inference per endpoint through tritonclient, equal to running its model.onnx directly."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clipserve.endpoints import EMBEDDING_OUTPUT, IMAGE_INPUT, TEXT_INPUT, Precision, Sidecar, Tower
from clipserve import calibration as cal
from clipserve.export import evaluate
from clipserve.export.reevaluate import served_session

pytestmark = pytest.mark.integration


def endpoints(repository):
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").exists())


def sample_input(sidecar, batch):
    rng = np.random.default_rng(0)
    if sidecar.tower == Tower.IMAGE.value:
        return IMAGE_INPUT, rng.integers(0, 256, (batch, sidecar.image_size, sidecar.image_size, 3), dtype=np.uint8)
    ids = np.zeros((batch, sidecar.context_length), dtype=np.int32)
    ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, rng.integers(256, 40000, (batch, 3)), 49407
    return TEXT_INPUT, ids


def infer(client, name, input_name, array):
    dtype = "UINT8" if array.dtype == np.uint8 else "INT32"
    tensor = grpcclient.InferInput(input_name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    result = client.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput(EMBEDDING_OUTPUT)],
                          client_timeout=30)
    return result.as_numpy(EMBEDDING_OUTPUT)


def test_every_endpoint_is_ready_and_matches_onnxruntime(repository, triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    names = endpoints(repository)
    assert len(names) == 8
    for name in names:
        assert client.is_model_ready(name), name
        sidecar = Sidecar.read(repository / name)
        input_name, array = sample_input(sidecar, batch=3)
        got = infer(client, name, input_name, array)
        assert got.shape == (3, sidecar.embed_dim) and got.dtype == np.float32
        # The same file on the runtime its config.pbtxt names (onnxruntime or OpenVINO).
        direct = evaluate.embed(served_session(repository / name, Precision(sidecar.precision)),
                                array)
        assert cal.cosine_rows(got, direct).min() >= 0.9999, name


def test_a_malformed_request_gets_an_error_and_the_model_keeps_serving(repository, triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    name = "digits-s_fp32_image"
    wrong = np.zeros((1, 16, 16, 3), dtype=np.uint8)  # the model takes 32x32
    with pytest.raises(Exception, match="shape|dims|32"):
        infer(client, name, IMAGE_INPUT, wrong)
    sidecar = Sidecar.read(repository / name)
    _, good = sample_input(sidecar, batch=1)
    assert infer(client, name, IMAGE_INPUT, good).shape == (1, 64)
