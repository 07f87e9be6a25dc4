# Stand-in for python:3.11-slim-bookworm on a machine with no image registry (the compose test
# harness builds it; users pull the real image). Debian bookworm's own Python 3.11 on the rootfs
# that debootstrap made, with pip, and the host's CA certificates trusted: on this machine the
# package registries are reached through a proxy whose certificate authority only the host knows.
ARG BASE_IMAGE=modalmesh-standin/bookworm:1
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY host-ca/ /usr/local/share/ca-certificates/host/
# libpython3.11: PyTriton's tritonserver loads the interpreter's shared library; python3-dev: the
# headers the official image has, for the C++ ops DeepSpeed builds just in time (the CPU trainer).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-dev python3-pip python3-venv libpython3.11 \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
# The official image's pip installs into /usr/local as root; Debian's pip does too once the
# EXTERNALLY-MANAGED marker is gone. Trust the same bundle whatever library asks.
ENV LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
