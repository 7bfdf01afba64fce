ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# relu-serve, CPU image: the serving dependencies only (no torch, no training code), the
# default model models/digits, a non-root user. GPU variant: Dockerfile.gpu.
#   docker build -t relu-serve .
#   docker run -p 8000:8000 relu-serve
# Settings are RELU_SERVE_* variables (service/settings.py); uvicorn's own are UVICORN_*.

LABEL org.opencontainers.image.title="relu-serve" \
      org.opencontainers.image.description="Image classifiers with per-layer activation statistics (CPU)" \
      org.opencontainers.image.source="https://example.invalid/relu-serve"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so a source change rebuilds in seconds: the serving
# lock (pyproject's [project] dependencies, no torch, pinned with hashes by scripts/lock). The
# layer is rebuilt only when the lock changes; --no-deps installs exactly the locked set.
COPY requirements/serve.txt /tmp/requirements.txt
RUN python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The service and the default model; bytecode compiled now, since the root filesystem may be
# read-only at run time (Kubernetes readOnlyRootFilesystem).
COPY service/ ./service/
COPY models/digits/ ./models/digits/
RUN python -m compileall -q service \
    && groupadd --system --gid 10001 relu \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin relu

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# python -m service runs RELU_SERVE_WORKERS worker processes, by default as many as the
# container's CPU quota allows. The service writes to TMPDIR only: short-lived instrumented
# graphs at load, and the workers' shared folder (live monitor counts, metrics). SHUTDOWN_DELAY_S: readiness turns 503 for that long after SIGTERM before uvicorn
# stops accepting (0 here; deploy/ sets 5 s for Kubernetes); then requests in flight get up
# to UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN seconds to finish.
ENV RELU_SERVE_MODEL_ROOT=/app/models \
    RELU_SERVE_PROVIDERS=cpu \
    RELU_SERVE_LOG_LEVEL=info \
    RELU_SERVE_SHUTDOWN_DELAY_S=0 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=30

EXPOSE 8000

# 200 only once every model is loaded and warmed up; no curl in the image, so Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
