# CPU image: docker build -t onnx-explain .
# The default model is built into /models at image build time; deployments may mount their
# own model folder read-only over it.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY engines ./engines
COPY schemas ./schemas
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir '.[models]' \
 && /opt/venv/bin/onnx-explain models build efficientnet-lite0 --repository /models

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /app --create-home explain
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
ENV PATH=/opt/venv/bin:$PATH \
    ONNX_EXPLAIN_MODEL_REPOSITORY=/models \
    ONNX_EXPLAIN_CACHE_DIR=/tmp/onnx-explain-cache \
    ONNX_EXPLAIN_HOST=0.0.0.0 \
    ONNX_EXPLAIN_PORT=8000
USER explain
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["onnx-explain", "serve"]
