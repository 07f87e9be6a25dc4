# A trainer worker: Celery on Redis (queue train.<MODALMESH_TRAINER_HARDWARE>) launching DeepSpeed.
# Build from the repository root: docker build -f docker/trainer.Dockerfile .

# --- shared torch base: begin (identical in llm, encoders, decoders and trainer Dockerfiles) ---
# CUDA PyTorch, pinned by tag; Python 3.11 (pyproject: >=3.11,<3.12). Override with the build arg
# TORCH_IMAGE (.env) for another CUDA; the same image runs the CPU stack (docker-compose.cpu.yml).
ARG TORCH_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE} AS torch-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/modalmesh
# GPU constraints: every pin of requirements/cpu.txt except torch's (a CPU build), which becomes
# the image's own CUDA build, so pip keeps it instead of replacing it.
COPY requirements/cpu.txt requirements/cpu.txt
RUN sed '/^torch==/d' requirements/cpu.txt > constraints-gpu.txt \
    && python -c 'import sys, torch; assert sys.version_info[:2] == (3, 11), sys.version; print(f"torch=={torch.__version__}")' >> constraints-gpu.txt
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY presets presets
COPY modalmesh modalmesh
COPY services services
COPY gateway gateway
# A regular (not editable) install; setup.py generates the gRPC stubs on the way.
RUN python -m pip install -c constraints-gpu.txt . \
    && python -c 'import torch, modalmesh.v1, services.common.settings; print("torch", torch.__version__, "cuda", torch.version.cuda)'
# No weights in the image: models come from the mounted volumes (owned by this fixed uid).
RUN groupadd --gid 10001 modalmesh \
    && useradd -l --uid 10001 --gid 10001 --create-home --home-dir /home/modalmesh modalmesh \
    && mkdir -p /var/lib/modalmesh/cache /var/lib/modalmesh/models /etc/modalmesh/presets \
    && chown -R 10001:10001 /var/lib/modalmesh
# GLIBC_TUNABLES: services/common/procenv.py's MALLOC_TUNABLES (what `modalmesh up` sets).
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=134217728 \
    MODALMESH_HOST=0.0.0.0 \
    MODALMESH_CACHE_DIR=/var/lib/modalmesh/cache \
    HF_HOME=/var/lib/modalmesh/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/var/lib/modalmesh/cache/torch_extensions
# --- shared torch base: end ---

# g++: DeepSpeed builds its small ops just in time (cached in TORCH_EXTENSIONS_DIR, on the cache
# volume); openssh-client + pdsh: the deepspeed launcher's way to the other hosts of a multi-host job.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
CMD ["python", "-m", "services.trainer", "--name", "trainer@%h"]
