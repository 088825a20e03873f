# Stand-in for python:3.11-slim on a machine that cannot pull it: Debian's Python 3.11 in a venv
# first on the PATH, so `python` and `pip install` behave as in the official image.
FROM amid-smoke/bookworm
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:$PATH
CMD ["python3"]
