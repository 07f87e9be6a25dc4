# The gateway: OpenAI-compatible REST on 8000 (/health, /metrics open; /v1 behind API keys),
# gRPC modalmesh.v1.Chat on 50051. No torch: the gateway only reads the preset's YAML and talks
# to the other services, so it runs on slim Python with docker/gateway-requirements.txt.
# Build from the repository root: docker build -f docker/gateway.Dockerfile .
# Slim Python 3.11, pinned by tag; override with the build arg PYTHON_IMAGE (.env), e.g. a mirror's copy.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/modalmesh
COPY requirements/cpu.txt requirements/cpu.txt
COPY docker/gateway-requirements.txt docker/gateway-requirements.txt
RUN python -m pip install -c requirements/cpu.txt -r docker/gateway-requirements.txt
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY presets presets
COPY modalmesh modalmesh
COPY services services
COPY gateway gateway
# --no-deps: the project's torch-side dependencies stay out; the import check proves none is needed.
RUN python -m pip install --no-deps -c requirements/cpu.txt . \
    && python -c 'import gateway.__main__, services.common.health, services.trainer.celery_app, services.encoders.client, services.decoders.client' \
    && if python -c 'import torch' 2>/dev/null; then echo "torch must not be in the gateway image" >&2; exit 1; fi
RUN groupadd --gid 10001 modalmesh \
    && useradd -l --uid 10001 --gid 10001 --create-home --home-dir /home/modalmesh modalmesh \
    && mkdir -p /var/lib/modalmesh/cache /etc/modalmesh/presets \
    && chown -R 10001:10001 /var/lib/modalmesh
# GLIBC_TUNABLES: services/common/procenv.py's MALLOC_TUNABLES (what `modalmesh up` sets).
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=134217728 \
    MODALMESH_HOST=0.0.0.0 \
    MODALMESH_CACHE_DIR=/var/lib/modalmesh/cache
USER 10001:10001
EXPOSE 8000 50051
CMD ["python", "-m", "gateway"]
