"""GPU image decode for the ``onnxruntime`` backend (``clipserve export --gpu-decode``).

Per image endpoint ``E`` (``digits-s_int8_image``) two more Triton models, beside the tower:

- ``E_dali`` (``backend: "dali"``, Triton's DALI backend, in NVIDIA's tritonserver images):
  encoded files -> the tower's input, on the GPU. ``1/dali.py`` is a DALI pipeline in Python
  decorated with ``@autoserialize``, which the DALI backend serializes when it loads the model
  (its README, "Autoserialization": a Python pipeline is looked up as ``dali.py`` in the version
  directory; ``model.dali`` is for an already serialized one), so nothing is serialized here
  and the export needs no DALI. It does what the gateway's CPU path does
  (:mod:`clipserve.server.images`): decode (nvJPEG for JPEG; PNG and WebP on DALI's CPU
  decoders), RGB, EXIF orientation ignored, shortest side to S with antialiased bicubic, centre
  crop S x S, uint8 NHWC. Normalisation stays inside the ONNX graph.
- ``E_encoded`` (``platform: "ensemble"``): ``encoded`` (uint8 [batch, bytes]) -> ``E_dali``
  -> ``E`` -> ``embedding``. The gateway calls it instead of the tower when the sidecar's
  ``gpu_decode`` says so, after its header checks (size, format, pixel limits).

The gateway zero-pads a call's files to the longest one (Triton takes one shape per request;
the decoders stop at the end of the image and ignore the zeros, as DALI's README advises), and
``allow_ragged_batch`` lets Triton's dynamic batcher put requests of different lengths into one
DALI batch.

Not measured here (no GPU, no DALI): that nvJPEG + DALI's resize give embeddings at cosine
>= 0.999 to the CPU path (nvJPEG's IDCT and chroma upsampling differ from libjpeg's, and
DALI rounds the resized long side where torchvision truncates, a sub-pixel shift of the
crop). ``jpeg_fancy_upsampling`` is on to match libjpeg's default. A corrupt file that passes
the gateway's header checks fails the whole DALI batch it lands in (DALI has no per-sample
errors), other callers' requests in that batch included.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from clipserve.endpoints import (EMBEDDING_OUTPUT, ENCODED_INPUT, IMAGE_INPUT, Sidecar,
                                 gpu_decode_model_names)

from clipserve.export.config import MAX_BATCH_SIZE

PIPELINE_FILENAME = "dali.py"  # what the DALI backend autoserializes from a version directory
# DALI's CPU threads per pipeline (PNG/WebP decode, host-side parsing); NVIDIA's examples use 4.
DALI_THREADS = 4

_PIPELINE = string.Template('''\
"""DALI preprocessing of clipserve endpoint $endpoint, written by `clipserve export
--gpu-decode` (clipserve/export/gpu_decode.py). Triton's DALI backend serializes this pipeline
when it loads the model (@autoserialize). Encoded JPEG/PNG/WebP, zero-padded, uint8 [bytes] per
sample -> uint8 [$size, $size, 3] RGB: the gateway's CPU preprocessing (shortest side to
$size, bicubic, centre crop; EXIF orientation ignored; normalisation is in the ONNX graph)."""

import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.plugin.triton import autoserialize

IMAGE_SIZE = $size
INPUT = "$input"
MAX_BATCH_SIZE = $max_batch_size
THREADS = $threads


def preprocess(encoded, size=IMAGE_SIZE, device="mixed"):
    """Decode (device "mixed": nvJPEG on the GPU; "cpu" for tests), resize, crop."""
    images = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                               adjust_orientation=False, jpeg_fancy_upsampling=True)
    images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_CUBIC,
                       antialias=True)
    return fn.crop(images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)


@autoserialize
@dali.pipeline_def(batch_size=MAX_BATCH_SIZE, num_threads=THREADS, device_id=0,
                   output_dtype=[types.UINT8], output_ndim=[3])
def pipeline():
    encoded = fn.external_source(device="cpu", name=INPUT, dtype=types.UINT8, ndim=1)
    return preprocess(encoded)
''')


def pipeline_source(endpoint: str, image_size: int, max_batch_size: int = MAX_BATCH_SIZE,
                    threads: int = DALI_THREADS) -> str:
    """The ``dali.py`` text of ``endpoint``'s DALI model."""
    return _PIPELINE.substitute(endpoint=endpoint, size=int(image_size), input=ENCODED_INPUT,
                                max_batch_size=int(max_batch_size), threads=int(threads))


def _encoded_input() -> str:
    return (f'input [ {{ name: "{ENCODED_INPUT}" data_type: TYPE_UINT8 dims: [-1] '
            "allow_ragged_batch: true } ]")


def dali_config_pbtxt(name: str, image_size: int, max_queue_delay_us: int,
                      threads: int = DALI_THREADS) -> str:
    """config.pbtxt of the DALI model: ``encoded`` -> ``pixels`` uint8 [S, S, 3], one GPU
    instance (DALI's README advises against more), dynamic batching as the towers."""
    size = int(image_size)
    return "\n".join([
        f'name: "{name}"',
        'backend: "dali"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        _encoded_input(),
        f'output [ {{ name: "{IMAGE_INPUT}" data_type: TYPE_UINT8 dims: [{size}, {size}, 3] }} ]',
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}",
        "instance_group [ { count: 1 kind: KIND_GPU } ]",
        f'parameters {{ key: "num_threads" value: {{ string_value: "{int(threads)}" }} }}',
    ]) + "\n"


def ensemble_config_pbtxt(name: str, dali_model: str, tower: str, embed_dim: int) -> str:
    """config.pbtxt of the ensemble: ``encoded`` -> DALI model -> tower -> ``embedding``."""
    def step(model: str, inp: str, out: str) -> str:
        return (f'{{ model_name: "{model}" model_version: -1 '
                f'input_map {{ key: "{inp}" value: "{inp}" }} '
                f'output_map {{ key: "{out}" value: "{out}" }} }}')

    return "\n".join([
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        _encoded_input(),
        f'output [ {{ name: "{EMBEDDING_OUTPUT}" data_type: TYPE_FP32 dims: [{int(embed_dim)}] }} ]',
        "ensemble_scheduling { step [ "
        + step(dali_model, ENCODED_INPUT, IMAGE_INPUT) + ", "
        + step(tower, IMAGE_INPUT, EMBEDDING_OUTPUT) + " ] }",
    ]) + "\n"


def sidecar_field(endpoint: str) -> dict:
    """The image sidecar's ``gpu_decode`` value for ``endpoint``: what the gateway calls."""
    return {"model": gpu_decode_model_names(endpoint)[1], "input": ENCODED_INPUT,
            "decoder": "dali"}


def write(repository: Path, endpoint: str, sidecar: Sidecar, max_queue_delay_us: int) -> list[Path]:
    """Write ``endpoint``'s DALI model and ensemble into ``repository`` (replacing earlier
    ones); returns their directories.

    Raises:
        ValueError: ``sidecar`` is not an image endpoint's.
    """
    if not sidecar.image_size:
        raise ValueError(f"{endpoint}: GPU decode applies to image endpoints only")
    dali_name, ensemble_name = gpu_decode_model_names(endpoint)
    remove(repository, endpoint)
    dali_dir, ensemble_dir = Path(repository) / dali_name, Path(repository) / ensemble_name
    (dali_dir / "1").mkdir(parents=True)
    (dali_dir / "1" / PIPELINE_FILENAME).write_text(
        pipeline_source(endpoint, sidecar.image_size))
    (dali_dir / "config.pbtxt").write_text(
        dali_config_pbtxt(dali_name, sidecar.image_size, max_queue_delay_us))
    (ensemble_dir / "1").mkdir(parents=True)  # Triton wants a version directory, even empty
    (ensemble_dir / "config.pbtxt").write_text(
        ensemble_config_pbtxt(ensemble_name, dali_name, endpoint, sidecar.embed_dim))
    return [dali_dir, ensemble_dir]


def remove(repository: Path, endpoint: str) -> None:
    """Delete ``endpoint``'s DALI model and ensemble if present (re-export without
    --gpu-decode: nothing stale stays loaded)."""
    for model in gpu_decode_model_names(endpoint):
        path = Path(repository) / model
        if path.exists():
            shutil.rmtree(path)
