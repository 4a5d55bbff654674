"""The main job, end to end: export the default models at every precision, start Triton and the
gateway (``clipserve serve``), send real gRPC requests (clipserve.client) at two precisions chosen by header, and
show the metrics page. Run it with ``bash scripts/demo.sh``.

Environment: DEMO_MODELS (default: the three built-in digits scales), DEMO_REPOSITORY
(default: model_repository), DEMO_SKIP_EXPORT=1 to reuse an exported repository.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.client import Client
from clipserve.procs import free_port

MODELS = os.environ.get("DEMO_MODELS", "digits-s,digits-m,digits-l")
REPOSITORY = Path(os.environ.get("DEMO_REPOSITORY", "model_repository"))
SCALE = MODELS.split(",")[-1].split("::")[0]  # the largest scale listed
PRECISIONS = ("fp32", "int8")


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


def timed(method, *args, **kwargs):
    start = time.perf_counter()
    result = method(*args, scale=SCALE, **kwargs)
    return result, (time.perf_counter() - start) * 1000


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
        channel.close()
        client = Client(f"127.0.0.1:{port}", timeout_s=30)  # clipserve.client: numpy out
        data = digits.load(32)
        seven = data.test.images[data.test.labels == 7][0]
        text = "a handwritten seven."

        print(f"\n== 3. requests, precision chosen by the x-clip-precision header "
              f"(scale {SCALE})", flush=True)
        vectors = {}
        for precision in PRECISIONS:
            image, image_ms = timed(client.embed_images, [seven], precision=precision)
            texts, text_ms = timed(client.embed_texts, [text], precision=precision)
            vectors[precision] = (image.vectors[0], texts.vectors[0])
            print(f"  {precision}: EmbedImages served by {image.endpoint} in {image_ms:.1f} ms, "
                  f"EmbedTexts served by {texts.endpoint} in {text_ms:.1f} ms, "
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
                result, ms = timed(client.classify, list(images), precision=precision)
                flagged = int(result.out_of_distribution.sum())
                line = (f"  Classify 20 {what:25s} via {result.endpoint}: flagged OOD "
                        f"{flagged:2d}/20 (threshold {result.ood_threshold:.2f}, {ms:.0f} ms)")
                if labels is not None:
                    names = [digits.CLASS_NAMES[c] for c in labels]
                    correct = sum(t == n for t, n in zip(result.top_labels, names))
                    line += f", top-1 {correct}/20"
                print(line)
        client.close()

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
