#!/usr/bin/env bash
# docker compose, for real, on one machine without a registry, a GPU or a container bridge.
#
# Builds stand-ins for the base images the compose file and the Dockerfiles name (from Debian's
# packages, tagged with those exact names), builds the project's images, brings up Postgres,
# Redis, migrate, the API, the reaper and two CPU workers (docker-compose.yml with
# docker/compose.smoke.yml on top), creates an API key, submits the demo job over REST, waits for
# it to succeed, downloads the student, checks it is a real archive and that every API, reaper
# and worker container passes its health check. Everything it started is torn down at the end,
# also on failure; a docker daemon it had to start is stopped again.
#
# Run as root: it installs what is missing from Debian (docker.io, docker-compose, debootstrap),
# may start dockerd and debootstraps a rootfs. Not part of `make test`.
# Knobs: SMOKE_API_PORT, SMOKE_POSTGRES_PORT, SMOKE_REDIS_PORT, SMOKE_WHEEL_PORT (defaults 58000,
# 55432, 56379, 58001: every service binds the host's ports), SMOKE_CACHE (where the Debian
# rootfs is made), SMOKE_WHEELS (more directories to look for the CPU torch wheel in),
# SMOKE_JOB_TIMEOUT (seconds the job may take, default 1800), TORCH_VERSION.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export SMOKE_API_PORT=${SMOKE_API_PORT:-58000}
export SMOKE_POSTGRES_PORT=${SMOKE_POSTGRES_PORT:-55432}
export SMOKE_REDIS_PORT=${SMOKE_REDIS_PORT:-56379}
SMOKE_WHEEL_PORT=${SMOKE_WHEEL_PORT:-58001}
CACHE=${SMOKE_CACHE:-/var/cache/amid-smoke}
JOB_TIMEOUT=${SMOKE_JOB_TIMEOUT:-1800}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PROJECT=amid-smoke
BASE_IMAGE=amid-smoke/bookworm
API=http://127.0.0.1:$SMOKE_API_PORT
# The images the compose file and the Dockerfiles name, and the stand-in built for each.
declare -A STANDINS=(
    [python:3.11-slim]=docker/standins/python.Dockerfile
    [nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04]=docker/standins/cuda.Dockerfile
    [postgres:16.9]=docker/standins/postgres.Dockerfile
    [redis:7.4.4]=docker/standins/redis.Dockerfile
)

WORK=$(mktemp -d)
STARTED_DOCKERD=""
WHEEL_SERVER=""
COMPOSE_UP=""
START=$(date +%s)

log() { printf '== [%4ss] %s\n' "$(($(date +%s) - START))" "$*"; }

# Debian's packages for what the script drives, installed only when missing.
ensure_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
        || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v curl >/dev/null || missing+=(curl)
    python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    else
        COMPOSE=(docker-compose)
    fi
}

# The stack runs from a rendered copy of the two files: see render_compose.
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yml" "$@"; }

cleanup() {
    local status=$?
    set +e
    if [ -n "$COMPOSE_UP" ]; then
        if [ "$status" -ne 0 ]; then
            log "failed: the stack's last log lines"
            compose logs --tail=40 2>&1 | tail -n 200
        fi
        log "tearing the stack down"
        compose down -v --remove-orphans >/dev/null 2>&1
    fi
    [ -n "$WHEEL_SERVER" ] && kill "$WHEEL_SERVER" 2>/dev/null
    if [ -n "$STARTED_DOCKERD" ]; then
        log "stopping the docker daemon this run started"
        kill "$STARTED_DOCKERD" 2>/dev/null
        wait "$STARTED_DOCKERD" 2>/dev/null
    fi
    rm -rf "$WORK"
    if [ "$status" -eq 0 ]; then
        log "compose smoke test passed in $(($(date +%s) - START))s"
    else
        log "compose smoke test FAILED (exit $status)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_dockerd() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    log "starting dockerd (no bridge: every container uses the host's network)"
    dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
        sleep 1
    done
    cat "$WORK/dockerd.log" >&2
    echo "dockerd did not come up" >&2
    return 1
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# docker build with the host's network (there is no bridge); its output only when it fails.
build_image() {
    docker build --network host --force-rm "$@" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; return 1; }
}

build_standins() {
    if ! have_image "$BASE_IMAGE"; then
        if ! have_image "$BASE_IMAGE-rootfs"; then
            log "debootstrapping a minimal Debian bookworm rootfs into $CACHE (once)"
            rm -rf "$CACHE/rootfs"
            mkdir -p "$CACHE"
            debootstrap --variant=minbase bookworm "$CACHE/rootfs" >"$WORK/debootstrap.log" 2>&1 \
                || { tail -n 20 "$WORK/debootstrap.log" >&2; return 1; }
            tar -C "$CACHE/rootfs" -c . | docker import - "$BASE_IMAGE-rootfs" >/dev/null
            rm -rf "$CACHE/rootfs"
        fi
        # The certificate authorities this machine trusts beyond Debian's (a proxy's, say), so
        # that apt and pip inside every build trust what the host trusts (pip through the system
        # bundle, which installing ca-certificates builds from them).
        mkdir -p "$WORK/base/certs"
        find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$WORK/base/certs/" \;
        cat >"$WORK/base/Dockerfile" <<EOF
FROM $BASE_IMAGE-rootfs
COPY certs/ /usr/local/share/ca-certificates/
RUN printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >/etc/pip.conf
EOF
        build_image -t "$BASE_IMAGE" "$WORK/base"
    fi
    local image
    for image in "${!STANDINS[@]}"; do
        if have_image "$image"; then
            continue
        fi
        log "building a stand-in for $image from Debian's packages"
        build_image -t "$image" -f "${STANDINS[$image]}" docker/standins
    done
}

# The worker image installs torch with TORCH_PIP_ARGS: here the CPU wheel, from a directory of
# wheels this machine's pip already uses (served to the build over the host's loopback), or
# else from the CPU index. Sets TORCH_ARGS.
serve_torch_wheel() {
    local dir wheel
    TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
    for dir in ${SMOKE_WHEELS:-} $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
        wheel=$(find "$dir" -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-cp311-*.whl" 2>/dev/null | head -n 1)
        if [ -n "$wheel" ]; then
            mkdir -p "$WORK/wheels"
            ln -s "$wheel" "$WORK/wheels/"
            # A fixed port: the argument is part of the build cache's key.
            python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$SMOKE_WHEEL_PORT" \
                >/dev/null 2>&1 &
            WHEEL_SERVER=$!
            TORCH_ARGS="--find-links http://127.0.0.1:$SMOKE_WHEEL_PORT/"
            # Listing the wheel, or the port belongs to something else.
            for _ in $(seq 20); do
                curl -fsS "http://127.0.0.1:$SMOKE_WHEEL_PORT/" 2>/dev/null | grep -qF "${wheel##*/}" && return
                kill -0 "$WHEEL_SERVER" 2>/dev/null || break
                sleep 0.5
            done
            echo "could not serve $wheel on port $SMOKE_WHEEL_PORT (SMOKE_WHEEL_PORT)" >&2
            return 1
        fi
    done
}

build_project_images() {
    log "building amid-api"
    build_image -t amid-api -f docker/api.Dockerfile .
    serve_torch_wheel
    log "building amid-worker (torch $TORCH_VERSION+cpu: $TORCH_ARGS)"
    build_image -t amid-worker -f docker/worker.Dockerfile \
        --build-arg "TORCH_VERSION=$TORCH_VERSION+cpu" --build-arg "TORCH_PIP_ARGS=$TORCH_ARGS" .
}

# The two files merged, less what an override file cannot take away (compose merges the lists
# of the two): the GPU reservations (this machine has no NVIDIA runtime) and the published ports
# (a service on the host's network binds its ports itself).
render_compose() {
    "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml -f docker/compose.smoke.yml config \
        | python3 -c '
import sys, yaml
config = yaml.safe_load(sys.stdin)
for service in config["services"].values():
    service.get("deploy", {}).get("resources", {}).pop("reservations", None)
    service.pop("ports", None)
yaml.safe_dump(config, sys.stdout, sort_keys=False)
' >"$WORK/compose.yml"
}

api() {
    local method=$1 path=$2
    shift 2
    curl -fsS -X "$method" -H "Authorization: Bearer $KEY" "$API$path" "$@"
}

job_field() { python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }

run_demo_job() {
    log "creating an API key"
    KEY=$(compose exec -T api amid keys create smoke | tail -n 1)
    # The demo job, with its paths where the compose file mounts models and datasets.
    python3 - "$WORK/job.json" <<'EOF'
import json, sys, yaml
job = yaml.safe_load(open("examples/demo-job.yaml"))
job["teacher"] = "/models/teacher"
job["student"] = "/models/student"
job["dataset"]["source"] = "/datasets/demo.jsonl"
json.dump(job, open(sys.argv[1], "w"))
EOF
    local job_id status deadline
    job_id=$(api POST /v1/jobs -H 'Content-Type: application/json' --data @"$WORK/job.json" | job_field id)
    log "submitted the demo job $job_id; waiting for it"
    deadline=$(($(date +%s) + JOB_TIMEOUT))
    while :; do
        status=$(api GET "/v1/jobs/$job_id" | job_field status)
        case $status in
            succeeded) break ;;
            failed | cancelled)
                api GET "/v1/jobs/$job_id" >&2
                echo "the demo job ended $status" >&2
                return 1
                ;;
        esac
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "the demo job is still $status after ${JOB_TIMEOUT}s" >&2
            return 1
        fi
        sleep 10
    done
    log "job $job_id succeeded; downloading the student"
    api GET "/v1/jobs/$job_id/student" -o "$WORK/student.tar.gz"
    tar -tzf "$WORK/student.tar.gz" >"$WORK/student.list"
    local file
    for file in config.json model.safetensors tokenizer.json; do
        grep -q "/$file\$\|^$file\$" "$WORK/student.list" \
            || { echo "the student archive has no $file:" >&2; cat "$WORK/student.list" >&2; return 1; }
    done
    log "the student: a tar.gz of $(wc -l <"$WORK/student.list") entries, $(du -h "$WORK/student.tar.gz" | cut -f1)"
}

# The health checks of the compose file (the API's /readyz, `amid worker --check`,
# `amid reaper --check`) pass in every container of those services.
check_health() {
    local container status
    for container in $(compose ps -q api reaper worker); do
        status=$(docker inspect -f '{{.Name}} {{.State.Health.Status}}' "$container")
        log "health: $status"
        [ "${status##* }" = healthy ] || return 1
    done
}

ensure_tools
ensure_dockerd
build_standins
build_project_images
render_compose
log "bringing up postgres, redis, migrate, the api, the reaper and two CPU workers"
COMPOSE_UP=1
compose up -d --no-build --scale worker=2 api reaper worker
for _ in $(seq 60); do
    curl -fsS "$API/readyz" >/dev/null 2>&1 && break
    sleep 2
done
curl -fsS "$API/readyz" >/dev/null
run_demo_job
check_health
