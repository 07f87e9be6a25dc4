# Stand-in for the CUDA PyTorch base image (TORCH_IMAGE) on a CPU machine with no image
# registry: the Python stand-in plus the pinned CPU torch wheel, which on this machine is a local
# file only (requirements/cpu.txt pins torch==2.13.0). Its other requirements come from PyPI.
ARG BASE_IMAGE=modalmesh-standin/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_WHEEL
COPY ${TORCH_WHEEL} /tmp/
RUN python -m pip install --no-cache-dir "/tmp/${TORCH_WHEEL}" \
    && rm "/tmp/${TORCH_WHEEL}" \
    && python -c 'import torch; print("torch", torch.__version__)'
