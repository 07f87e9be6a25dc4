# Flower, Celery's monitoring UI, on 5555, for the trainer's queues. It loads the trainer's Celery
# app (`celery -A services.trainer.celery_app flower`: the module holds a module-level `app` on
# MODALMESH_REDIS_URL and imports no torch), so it shares the gateway's slim dependency set;
# flower itself is installed here only.
# Build from the repository root: docker build -f docker/flower.Dockerfile .
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
COPY docker/flower-requirements.txt docker/flower-requirements.txt
RUN python -m pip install -c requirements/cpu.txt -r docker/gateway-requirements.txt -r docker/flower-requirements.txt
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY presets presets
COPY modalmesh modalmesh
COPY services services
COPY gateway gateway
RUN python -m pip install --no-deps -c requirements/cpu.txt . \
    && python -c 'import services.trainer.celery_app, flower'
RUN groupadd --gid 10001 modalmesh \
    && useradd -l --uid 10001 --gid 10001 --create-home --home-dir /home/modalmesh modalmesh
USER 10001:10001
EXPOSE 5555
CMD ["celery", "-A", "services.trainer.celery_app", "flower", "--address=0.0.0.0", "--port=5555"]
