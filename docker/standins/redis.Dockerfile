# Stand-in for redis:7: Debian's Redis 7 server and redis-cli, state in /data as in the official image.
FROM amid-smoke/bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
WORKDIR /data
CMD ["redis-server"]
