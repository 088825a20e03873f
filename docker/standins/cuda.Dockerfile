# Stand-in for the worker's CUDA base on a machine with neither a registry nor a GPU: the Debian
# base with what the CUDA image brings that the worker image relies on (apt sources, certificates).
FROM amid-smoke/bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
