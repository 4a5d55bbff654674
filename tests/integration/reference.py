"""The offline reference an endpoint's live answers must equal: its model.onnx run in this
process by the same builder Triton's python backend uses (``export/triton_model.py``), on the
runtime its config.pbtxt names. The export may choose OpenVINO for an endpoint (``--runtime
auto`` picks it where it is faster, as on CPUs with AMX); an onnxruntime reference would then
differ from the served numbers by more than float noise."""

from __future__ import annotations

import re

from clipserve.export import triton_model

_PARAMETER = re.compile(r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*'
                        r'"([^"]*)"\s*\}\s*\}')


def config_parameters(text: str) -> dict[str, str]:
    """config.pbtxt's string parameters, ``key -> value``."""
    return dict(_PARAMETER.findall(text))


def served_runner(spec):
    """``(runtime, run)`` for the endpoint ``spec`` (a server.repository EndpointSpec):
    ``run(input_name, batch)`` returns its first output, computed as Triton computes it."""
    params = config_parameters((spec.directory / "config.pbtxt").read_text())
    config = {"name": spec.directory.name,
              "parameters": {k: {"string_value": v} for k, v in params.items()}}
    return triton_model.build_from_config(str(spec.directory / "1" / "model.onnx"), config)
