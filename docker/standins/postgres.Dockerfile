# Stand-in for postgres:16: Debian's PostgreSQL server behind an entry point that honours the
# official image's contract (POSTGRES_USER/PASSWORD/DB, data in /var/lib/postgresql/data, a
# `postgres ...` command run as the postgres user, pg_isready on the PATH).
FROM amid-smoke/bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
ENV PATH=/usr/lib/postgresql/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
