"""The main job, end to end: export the default models at every precision, start Triton and the
gateway (``clipserve serve``), send real gRPC requests at two precisions chosen by header, and
show the metrics page. Run it with ``bash scripts/demo.sh``.

Environment: DEMO_MODELS (default: the three built-in digits scales), DEMO_REPOSITORY
(default: model_repository), DEMO_SKIP_EXPORT=1 to reuse an exported repository.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from clipserve.server.v1 import clipserve_pb2 as pb
from clipserve.server.v1 import clipserve_pb2_grpc as pb_grpc

MODELS = os.environ.get("DEMO_MODELS", "digits-s,digits-m,digits-l")
REPOSITORY = Path(os.environ.get("DEMO_REPOSITORY", "model_repository"))
SCALE = MODELS.split(",")[-1].split("::")[0]  # the largest scale listed
PRECISIONS = ("fp32", "int8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_serving(channel, process, timeout_s: float = 600) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"clipserve serve exited with {process.returncode}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    sys.exit("gateway did not become SERVING in time")


def call(method, request, precision):
    metadata = (("x-clip-scale", SCALE), ("x-clip-precision", precision))
    start = time.perf_counter()
    response, call_info = method.with_call(request, metadata=metadata, timeout=30)
    elapsed_ms = (time.perf_counter() - start) * 1000
    served_by = dict(call_info.initial_metadata()).get("x-clip-endpoint")
    return response, served_by, elapsed_ms


def main() -> int:
    from clipserve.export import digits

    if os.environ.get("DEMO_SKIP_EXPORT") != "1":
        print(f"== 1. export {MODELS} at fp32,fp16,int8,int4 into {REPOSITORY}", flush=True)
        subprocess.run([sys.executable, "-m", "clipserve.cli", "export", "--models", MODELS,
                        "--repository", str(REPOSITORY)], check=True)
    port, metrics_port = free_port(), free_port()
    print(f"\n== 2. clipserve serve: Triton + gateway on 127.0.0.1:{port}, "
          f"metrics on :{metrics_port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "clipserve.cli", "serve", "--repository",
                               str(REPOSITORY), "--host", "127.0.0.1", "--port", str(port),
                               "--metrics-port", str(metrics_port), "--default-scale", SCALE])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel, server)
        embed = pb_grpc.EmbeddingServiceStub(channel)
        classify = pb_grpc.ClassificationServiceStub(channel)
        data = digits.load(32)
        seven = data.test.images[data.test.labels == 7][0]
        text = "a handwritten seven."

        print(f"\n== 3. requests, precision chosen by the x-clip-precision header "
              f"(scale {SCALE})", flush=True)
        vectors = {}
        for precision in PRECISIONS:
            image, image_ep, image_ms = call(embed.EmbedImages, pb.EmbedImagesRequest(
                images=[png(seven)]), precision)
            texts, text_ep, text_ms = call(embed.EmbedTexts, pb.EmbedTextsRequest(
                texts=[text]), precision)
            vectors[precision] = (np.array(image.embeddings[0].values),
                                  np.array(texts.embeddings[0].values))
            print(f"  {precision}: EmbedImages served by {image_ep} in {image_ms:.1f} ms, "
                  f"EmbedTexts served by {text_ep} in {text_ms:.1f} ms, "
                  f"cos(image, text) = {vectors[precision][0] @ vectors[precision][1]:.3f}")
        (ia, ta), (ib, tb) = vectors[PRECISIONS[0]], vectors[PRECISIONS[1]]
        print(f"  {PRECISIONS[1]} vs {PRECISIONS[0]}: image cosine {ia @ ib:.5f}, "
              f"text cosine {ta @ tb:.5f}")
        # One image says little about a threshold set to keep 95% of digits: show rates.
        sets = {"held-out digits": (data.test.images[:20], data.test.labels[:20]),
                "letters (near-OOD)": (data.ood_near[:20], None),
                "noise/textures (far-OOD)": (data.ood_far[:20], None)}
        for precision in PRECISIONS:
            for what, (images, labels) in sets.items():
                result, ep, ms = call(classify.Classify, pb.ClassifyRequest(
                    images=[png(x) for x in images]), precision)
                flagged = sum(r.out_of_distribution for r in result.results)
                line = (f"  Classify 20 {what:25s} via {ep}: flagged OOD {flagged:2d}/20 "
                        f"(threshold {result.ood_threshold:.2f}, {ms:.0f} ms)")
                if labels is not None:
                    names = [digits.CLASS_NAMES[c] for c in labels]
                    correct = sum(r.top_label == n for r, n in zip(result.results, names))
                    line += f", top-1 {correct}/20"
                print(line)

        print(f"\n== 4. metrics (http://127.0.0.1:{metrics_port}/metrics), clipserve_ series "
              "with a value", flush=True)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        for line in page.read().decode().splitlines():
            if (line.startswith("clipserve_") and not line.endswith(" 0.0")
                    and "_bucket" not in line and "_created" not in line):
                print("  " + line)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print("\ndone: the quality report is in", REPOSITORY / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
