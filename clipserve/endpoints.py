"""What an endpoint is: a model scale, a numeric precision and a tower.

This module is the single source of truth for precisions, towers, Triton model names, the
fixed ONNX tensor names and the JSON sidecar stored next to each endpoint. The export stage
writes these, the gateway reads them; neither defines its own.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path


class Precision(str, enum.Enum):
    """Numeric precision of an exported tower. The value is the spelling used everywhere
    (CLI, Triton model names, metric labels, routing headers).

    - ``fp32``: the reference. Weights and activations float32, exactly the PyTorch graph.
    - ``fp16``: weights and most activations float16. LayerNorm, Softmax, reductions and the
      final L2 normalisation stay float32, and graph inputs/outputs keep their float32/uint8/int32
      types, so clients never see half floats and nothing overflows to inf.
    - ``int8``: MatMul (and Gemm) weights int8, per output channel, and the token-embedding
      table int8. Matmul activations are quantized too: dynamically per tensor at run time
      (ORT ``quantize_dynamic``) or statically from a calibration set (QDQ); the export
      measures both and keeps the better (see the report). LayerNorm, Softmax, GELU, residual
      adds, the patch Conv and the positional embeddings stay float32.
    - ``int4``: 4-bit weights, int8 compute (W4A8). Constant MatMul weights and the
      token-embedding table stored as 4-bit blocks with one float scale per block (ORT
      ``MatMulNBits`` and ``GatherBlockQuantized``; block size recorded in the sidecar). At
      ``accuracy_level=4`` (the default, recorded in the sidecar) onnxruntime quantizes each
      MatMul's activations to int8 at run time and multiplies in int8, so activations lose
      precision too; level 0 would dequantize weights and compute in float32 (true
      weight-only). The patch Conv, LayerNorm, softmax and the attention score matmuls stay
      float32.
    - ``bf16``: weights and activations bfloat16 where the runtime computes in it: the FP32
      graph, run by OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` (matmuls, convolutions and
      most element-wise ops in bfloat16, float32 accumulation); norms, softmax and reductions as
      the runtime keeps them (OpenVINO's CPU plugin keeps LayerNorm statistics and softmax sums
      in float32). Pays only on CPUs with AVX512_BF16 or AMX; elsewhere it is emulated.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    BF16 = "bf16"

    @classmethod
    def parse(cls, text: str) -> "Precision":
        """Parse a precision name; raises ValueError listing the valid ones."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown precision {text!r}; valid precisions: {valid}") from None


class Tower(str, enum.Enum):
    """Which half of CLIP an endpoint runs."""

    IMAGE = "image"
    TEXT = "text"


# Fixed ONNX / Triton tensor names. Every exported graph uses exactly these.
IMAGE_INPUT = "pixels"  # uint8 [batch, height, width, 3] (NHWC, RGB), resized, not normalised
TEXT_INPUT = "input_ids"  # int32 [batch, context_length], open_clip token ids, 0-padded
EMBEDDING_OUTPUT = "embedding"  # float32 [batch, embed_dim], L2-normalised
# GPU decode (``clipserve export --gpu-decode``): the encoded files, zero-padded to the longest
# of each request, uint8 [batch, bytes]; the DALI model decodes and preprocesses them to
# IMAGE_INPUT on the GPU (trailing zeros are ignored by the decoders).
ENCODED_INPUT = "encoded"

SIDECAR_FILENAME = "clipserve.json"
SIDECAR_VERSION = 3  # 2 added evaluation, ood_score, ood_state, output_formats, revision
# 3 added scoring, logit_scale, logit_bias and tokenizer. A sidecar that a version-2 reader would
# misread (a sigmoid rule, a non-CLIP tokenizer) is written as version 3, so an older gateway
# refuses it; every other sidecar is still written as version 2.
_SIDECAR_V3_DEFAULTS = {"scoring": "softmax", "logit_scale": None, "logit_bias": None,
                        "tokenizer": {}}
TOKENIZER_FILENAME = "tokenizer.json"

_SCALE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")


def endpoint_name(scale: str, precision: Precision | str, tower: Tower | str) -> str:
    """The Triton model name of one endpoint, e.g. ``digits-s_int8_image``.

    Scales may contain letters, digits, '-' and '.', never '_', so the name splits back
    unambiguously (see :func:`parse_endpoint_name`).
    """
    if not _SCALE_RE.match(scale):
        raise ValueError(
            f"scale name {scale!r} may only contain letters, digits, '-' and '.' "
            "(it becomes part of a Triton model name)"
        )
    return f"{scale}_{Precision(precision).value}_{Tower(tower).value}"


def gpu_decode_model_names(endpoint: str) -> tuple[str, str]:
    """The Triton models that GPU decode adds ahead of image endpoint ``endpoint``:
    ``(dali, ensemble)``, e.g. ``digits-s_int8_image_dali`` (encoded bytes -> pixels, Triton's
    DALI backend) and ``digits-s_int8_image_encoded`` (encoded bytes -> embedding: the DALI
    model, then the tower). Four '_'-parts: never parsed back as an endpoint."""
    return f"{endpoint}_dali", f"{endpoint}_encoded"


def parse_endpoint_name(name: str) -> tuple[str, Precision, Tower]:
    """Inverse of :func:`endpoint_name`; raises ValueError on names it did not make."""
    parts = name.split("_")
    if len(parts) != 3:
        raise ValueError(f"{name!r} is not a clipserve endpoint name (scale_precision_tower)")
    scale, precision, tower = parts
    return scale, Precision(precision), Tower(tower)


def scale_name(model_name: str) -> str:
    """Turn an open_clip architecture name (``ViT-B-32``, ``ViT-bigG-14-quickgelu``) or a
    built-in name into the scale used in endpoint names: '_' and '/' become '-'."""
    return re.sub(r"[^A-Za-z0-9.\-]", "-", model_name)


@dataclass
class Sidecar:
    """Metadata stored as ``<repository>/<endpoint>/clipserve.json``.

    Image endpoints carry what the gateway needs to preprocess and to score live: the input
    size and the temperature and OOD threshold fitted for this precision (against the text
    tower of the same precision). Text endpoints carry the context length; their tokenizer
    sits beside the sidecar as ``tokenizer.json``.
    """

    scale: str
    precision: str
    tower: str
    embed_dim: int
    source: str  # what was exported: "digits-s::builtin", "ViT-B-32::openai", ...
    # The file format: written as 2 or 3 (see SIDECAR_VERSION); not part of equality.
    version: int = field(default=SIDECAR_VERSION, compare=False)
    image_size: int | None = None  # image towers: square input side in pixels
    context_length: int | None = None  # text towers
    temperature: float | None = None  # softmax(cos / T); fitted on held-out labelled data
    ood_threshold: float | None = None  # MCM score below this -> OOD (95% ID kept)
    quantization: dict = field(default_factory=dict)  # method, block size, ...
    # Image endpoints: the in-distribution label set the threshold was fitted on, and the prompt
    # templates ("a photo of the digit {}") whose averaged text embeddings make each label.
    labels: list[str] | None = None
    prompts: list[str] | None = None
    # What the labels, temperature and threshold were fitted on: {"data": description,
    # "domain_measured": whether that data is the model's own domain, "n_calibration": ...}.
    # Empty: nothing was measured (the gateway then leaves live OOD scoring off).
    evaluation: dict = field(default_factory=dict)
    ood_score: str | None = None  # the live OOD score ood_threshold belongs to ("mcm", ...)
    ood_state: str | None = None  # file beside the sidecar with a feature-space score's state
    output_formats: dict = field(default_factory=dict)  # embedding output encodings' parameters
    revision: int = 1  # bumped each time `clipserve evaluate --write-sidecars` refits it
    # Image endpoints exported with --gpu-decode: {"model": the ensemble that takes encoded
    # bytes, "input": its input tensor, "decoder": "dali"}. Empty: the gateway decodes on the
    # CPU and feeds the tower pixels. Older gateways ignore the field and keep doing that
    # (the tower stays directly callable), so the sidecar version is unchanged.
    gpu_decode: dict = field(default_factory=dict)
    # Image endpoints: the rule that turns cosines into label probabilities
    # (clipserve.calibration.Scoring): "softmax" (CLIP: softmax(cos / temperature)) or
    # "sigmoid" (SigLIP: sigmoid(logit_scale * cos + logit_bias) per label, independently;
    # temperature is then 1 / logit_scale). Scale and bias are fitted like the temperature;
    # the model's own are in evaluation["native_logit_scale"/"native_logit_bias"].
    scoring: str = "softmax"
    logit_scale: float | None = None
    logit_bias: float | None = None
    # Text endpoints: how tokenizer.json is applied (clipserve.tokenizer.load_tokenizer).
    # Empty: open_clip's CLIP BPE. {"kind": "hf", "clean": "canonicalize"|"lower"|"whitespace"}:
    # a Hugging Face tokenizer, its truncation and padding to context_length in the JSON.
    tokenizer: dict = field(default_factory=dict)

    def scoring_rule(self):
        """This image endpoint's :class:`clipserve.calibration.Scoring`, or None when nothing
        was fitted (no temperature)."""
        from clipserve.calibration import Scoring

        if self.temperature is None:
            return None
        if self.scoring == "sigmoid":
            return Scoring.sigmoid(self.logit_scale or 1.0 / self.temperature,
                                   self.logit_bias or 0.0)
        return Scoring(self.scoring, self.temperature)

    def write(self, endpoint_dir: Path) -> Path:
        path = Path(endpoint_dir) / SIDECAR_FILENAME
        data = asdict(self)
        if all(data[k] == v for k, v in _SIDECAR_V3_DEFAULTS.items()):
            data["version"] = min(data["version"], 2)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, endpoint_dir: Path) -> "Sidecar":
        """Read and validate a sidecar; raises ValueError for a missing, unreadable or
        newer-versioned file."""
        path = Path(endpoint_dir) / SIDECAR_FILENAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read endpoint sidecar {path}: {exc}") from exc
        if data.get("version") not in range(1, SIDECAR_VERSION + 1):
            raise ValueError(
                f"{path} has sidecar version {data.get('version')!r}; this clipserve reads "
                f"version {SIDECAR_VERSION}. Re-export the repository."
            )
        if data.get("scoring", "softmax") not in ("softmax", "sigmoid"):
            raise ValueError(f"{path} has scoring rule {data.get('scoring')!r}; this clipserve "
                             "knows 'softmax' and 'sigmoid'")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
