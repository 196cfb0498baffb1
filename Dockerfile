# syntax=docker/dockerfile:1.7
# rightfoot-poller container image.
#
#   docker build -t rightfoot-poller:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg VCS_REF="$(git rev-parse HEAD)" .
#
# Two stages, after astral-sh/uv-docker-example (multistage.Dockerfile): the builder
# resolves nothing (uv.lock is the truth), installs the locked dependencies first so that
# layer is cached across source changes, then installs the project itself, non-editable.
# The runtime stage gets only the virtual environment, and runs as an unprivileged user.

# Both stages must use the same interpreter: the venv's scripts point at its path.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

# uv from PyPI, pinned; it never reaches the runtime image.
ARG UV_VERSION=0.13.8
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# 1. Dependencies only, exactly as locked, without the dev group.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

# 2. The project itself, installed into site-packages (not editable: the source tree
#    stays behind in this stage). rightfoot_simulator is the API simulator behind
#    `rightfoot-poller simulate`; the service never imports it.
COPY pyproject.toml uv.lock README.md ./
COPY service/ ./service/
COPY rightfoot_simulator/ ./rightfoot_simulator/
COPY schemas/ ./schemas/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable


FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

LABEL org.opencontainers.image.title="rightfoot-poller" \
      org.opencontainers.image.description="Polls Rightfoot balance batches and publishes every BalanceRecord to Kafka, exactly once." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 rightfoot \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin rightfoot

COPY --from=builder /app/.venv /app/.venv
# The documented example configuration; the helm chart mounts its own over it.
COPY config.yaml /etc/rightfoot-poller/config.yaml

# Bytecode is compiled at build time; the root filesystem may be read-only at run time.
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
USER 10001:10001

# Health (/healthz, /readyz), Prometheus /metrics and the admin API /v1/batches.
EXPOSE 8080

# For docker and compose (Kubernetes uses the chart's probes instead): /healthz, the event
# loop and its tasks alive, on RFP_HTTP__PORT (8080 unless set; a config file that moves
# http.port should set the variable too). The image has no curl: Python's own client.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RFP_HTTP__PORT', '8080'), timeout=4)"]

# SIGTERM (the default stop signal) starts a graceful shutdown within shutdown_grace_s.
ENTRYPOINT ["rightfoot-poller"]
CMD ["run", "--config", "/etc/rightfoot-poller/config.yaml"]
