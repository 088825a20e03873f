# The GPU worker image: CUDA runtime, the CUDA build of torch, and the AMiD core.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG TORCH_VERSION=2.13.0
# Where pip finds that torch: the CUDA 12.4 builds by default. A machine without that index
# passes e.g. "--find-links <url of a wheel directory>" (with TORCH_VERSION=2.13.0+cpu for a CPU build).
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive HF_HOME=/data/hf
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/amid
ENV PATH=/opt/amid/bin:$PATH
WORKDIR /app
# torch first and on its own: the CUDA wheel is the big layer, reused across code changes.
RUN pip install $TORCH_PIP_ARGS "torch==${TORCH_VERSION}"
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY store ./store
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install -c constraints.txt ".[worker,s3]" \
    && useradd --create-home amid && mkdir -p /data && chown amid /data
USER amid
# One worker per GPU: each takes the lowest GPU index no other worker sharing /data holds.
CMD ["amid", "worker", "--gpu", "auto"]
