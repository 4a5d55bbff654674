"""GPU decode against the CPU path, on a running Triton (NVIDIA's image: it has the DALI backend).

For a repository exported with ``clipserve export --backend onnxruntime --gpu-decode``:

    tritonserver --model-repository REPO &          # in nvcr.io/nvidia/tritonserver:24.12-py3
    python scripts/gpu_decode_check.py --url localhost:8001 --repository REPO [IMAGE ...]

For every image endpoint with ``gpu_decode`` in its sidecar, and every image (default: the two
photos scikit-learn ships as 640x480 and 1280x960 JPEGs, a PNG and a padded batch of all of
them), it embeds the image twice: the gateway's CPU path (server/images.py ``preprocess`` ->
pixels -> the tower) and the GPU path (the encoded file, zero-padded -> the ensemble: DALI ->
the tower). It prints the cosine of each pair and exits 1 if any is below ``--min-cosine``
(issue 10's 0.999, the bound the CPU fast path meets). It needs no GPU itself.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from PIL import Image

from clipserve.endpoints import EMBEDDING_OUTPUT, IMAGE_INPUT
from clipserve.server.images import pack_encoded, preprocess
from clipserve.server.repository import Catalog


def _default_images() -> dict[str, bytes]:
    from sklearn.datasets import load_sample_images

    images = {}
    for i, photo in enumerate(load_sample_images().images):
        for size in ((640, 480), (1280, 960)):
            buf = io.BytesIO()
            Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90)
            images[f"photo{i}-{size[0]}.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, "PNG")
    images["photo0.png"] = buf.getvalue()
    return images


def _embed(client, model: str, input_name: str, batch: np.ndarray) -> np.ndarray:
    inp = triton.InferInput(input_name, list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    return client.infer(model, [inp]).as_numpy(EMBEDDING_OUTPUT).astype(np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton's gRPC host:port")
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--min-cosine", type=float, default=0.999)
    parser.add_argument("images", nargs="*", type=Path)
    args = parser.parse_args(argv)
    images = ({p.name: p.read_bytes() for p in args.images} if args.images
              else _default_images())
    specs = [s for s in Catalog.from_repository(args.repository) if s.gpu_decode]
    if not specs:
        print(f"no endpoint in {args.repository} has gpu_decode; export with --gpu-decode")
        return 2
    client = triton.InferenceServerClient(args.url)
    worst = 1.0
    for spec in specs:
        size = spec.sidecar.image_size
        cpu = {name: _embed(client, spec.name, IMAGE_INPUT, preprocess(
            data, size, max_bytes=1 << 26, max_pixels=1 << 26)[None])[0]
            for name, data in images.items()}
        gpu = {name: _embed(client, spec.triton_model, spec.triton_input,
                            pack_encoded([data]))[0] for name, data in images.items()}
        batched = _embed(client, spec.triton_model, spec.triton_input,
                         pack_encoded(list(images.values())))  # padding of unequal files
        gpu.update({f"{name} (batch)": row for name, row in zip(images, batched)})
        for name, vector in gpu.items():
            ref = cpu[name.removesuffix(" (batch)")]
            cosine = float(vector @ ref / np.linalg.norm(vector) / np.linalg.norm(ref))
            worst = min(worst, cosine)
            print(f"{spec.name} {name}: cosine GPU decode vs CPU path {cosine:.6f}")
    print(f"worst cosine {worst:.6f} (bound {args.min_cosine})")
    return 0 if worst >= args.min_cosine else 1


if __name__ == "__main__":
    sys.exit(main())
