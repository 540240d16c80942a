# Two images from one tree. `cpu` (API, reaper, dashboard, migrations) installs the CPU build of
# torch first so the project's `torch==2.13.0` pin is already met; those services never import it.
# `gpu` (workers) takes the CUDA build of the same version from PyPI.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 ERPD_HOME=/data
WORKDIR /app
RUN useradd --create-home --uid 1000 erpd && mkdir -p /data && chown erpd /data

FROM base AS cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY . /app
RUN pip install -e /app
USER erpd

FROM base AS gpu
RUN pip install torch==2.13.0
COPY . /app
RUN pip install -e /app
USER erpd
