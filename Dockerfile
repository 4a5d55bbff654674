# syntax=docker/dockerfile:1
# The clipserve gateway image: `clipserve serve` on a slim Python, as a non-root user, without
# torch (the export extra is not installed; tests/unit/test_k8s_container.py checks that
# serving never imports it).
#
#   docker build -t clipserve:0.1.0 .                                # gateway (k8s/overlays/gpu)
#   docker build --build-arg EXTRAS=triton -t clipserve:0.1.0-cpu .  # + the CPU tritonserver
#                                                                    #   (k8s/overlays/cpu)
#   docker run --rm -p 50051:50051 -v "$PWD/model_repository:/repository:ro" \
#       -e CLIPSERVE_TRITON_URL=triton:8001 clipserve:0.1.0
#
# The model repository is not in the image: mount it at /repository (k8s/: an init container
# copies it from the image built by k8s/model-repository.Dockerfile).

# 3.11: nvidia-pytriton ships a Python backend stub per minor version, 3.8 to 3.13.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clipserve/ clipserve/
COPY server/ server/
COPY export/ export/
COPY loadtest/ loadtest/
# A venv at the path the runtime stage uses, so its scripts' shebangs stay valid after COPY.
RUN python -m venv /opt/clipserve \
 && /opt/clipserve/bin/pip install --upgrade pip \
 && /opt/clipserve/bin/pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && ! /opt/clipserve/bin/pip show torch >/dev/null 2>&1

FROM ${PYTHON_IMAGE}
ARG EXTRAS=""
LABEL org.opencontainers.image.title="clipserve" \
      org.opencontainers.image.description="CLIP embeddings at FP32/FP16/INT8/INT4 over gRPC, through Triton" \
      org.opencontainers.image.licenses="Apache-2.0"
# tritonserver from the wheel links libstdc++, zlib and (its Python stub) libexpat: already in
# the slim image, installed explicitly so a base change cannot drop them.
RUN if [ -n "${EXTRAS}" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends libstdc++6 zlib1g libexpat1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 clipserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin clipserve
COPY --from=build /opt/clipserve /opt/clipserve
ENV PATH=/opt/clipserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPSERVE_HOST=0.0.0.0 \
    CLIPSERVE_REPOSITORY=/repository
USER 10001:10001
# gRPC API, plaintext health for probes (set CLIPSERVE_HEALTH_PORT), Prometheus /metrics.
EXPOSE 50051 8080 50052 9464
ENTRYPOINT ["clipserve"]
CMD ["serve"]
