"""Triton python-backend model that runs one clipserve tower with ONNX Runtime.

Copied as ``<endpoint>/1/model.py`` by the export. It imports nothing from clipserve, only
numpy and onnxruntime, so it runs in any Python that Triton's stub uses. Tensor names and
dtypes come from the parsed config.pbtxt, the single source of truth. Triton's dynamic
batcher hands ``execute`` several requests at once; they run as one onnxruntime batch, and a
malformed request gets its own error without failing the others.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        (model_input,), (model_output,) = config["input"], config["output"]
        self.input_name = model_input["name"]
        self.output_name = model_output["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(model_input["data_type"])
        self.input_dims = tuple(int(d) for d in model_input["dims"])
        options = ort.SessionOptions()
        # 0 lets onnxruntime use every core; set lower when several instances share a node.
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = _parameter(config, "execution_providers", "CPUExecutionProvider").split(",")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=providers or None)

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
                out = self.session.run([self.output_name], {self.input_name: batch})[0]
            except Exception as exc:  # one bad run must not take the model down
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"onnxruntime failed: {exc}"))
                return responses
            start = 0
            for i, array in zip(owners, arrays):
                part = out[start:start + len(array)].astype(np.float32, copy=False)
                start += len(array)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.output_name, part)])
        return responses
