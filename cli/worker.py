"""`amid worker [--gpu N|auto] [--queue Q]`: one Celery worker process for one GPU.

Concurrency 1, prefetch 1 and a fresh child process per job (its own CUDA context); the parent
never imports torch. `--gpu N` pins the process to GPU N through CUDA_VISIBLE_DEVICES and names
the worker after it; `--gpu auto` takes the lowest index no other worker of the box holds
(worker.gpu_lock). `--check` is the container health check: did this worker's main loop turn lately.
"""

from __future__ import annotations

import argparse
import os
import socket
from contextlib import nullcontext
from pathlib import Path

from cli.health import run_check
from worker import liveness

# The main loop touches the liveness file this often; the health check allows a few misses.
LIVENESS_INTERVAL_SECONDS = 10.0
LIVENESS_MAX_AGE_SECONDS = 60.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("worker", help="Run a GPU worker (one per GPU).")
    parser.add_argument(
        "--gpu",
        help="GPU index this worker owns (sets CUDA_VISIBLE_DEVICES), or `auto`: the lowest index "
        "of the GPUs nvidia-smi lists that no other worker sharing AMID_HOME holds.",
    )
    parser.add_argument("--queue", help="Queue to consume (default: AMID_QUEUE).")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO).")
    parser.add_argument(
        "--liveness-file",
        type=Path,
        default=liveness.default_path("worker"),
        help=f"File the main loop touches every {LIVENESS_INTERVAL_SECONDS:g}s "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"Exit 0 if the worker using --liveness-file touched it in the last "
        f"{LIVENESS_MAX_AGE_SECONDS:g}s, else 1 (a container health check).",
    )
    parser.set_defaults(handler=_run)


def worker_argv(gpu: str | None, queue: str, loglevel: str) -> list[str]:
    """The `celery worker` arguments of an amid worker."""
    name = f"gpu{gpu}" if gpu is not None else "cpu"
    return [
        "worker",
        f"--queues={queue}",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "--max-tasks-per-child=1",
        "--pool=prefork",
        f"--hostname=amid-{name}@{socket.gethostname()}",
        f"--loglevel={loglevel}",
        # No gossip/mingle/heartbeat chatter: liveness is the DB heartbeat of each job and of each
        # worker (the pool registry, worker.registry).
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _run(args: argparse.Namespace) -> int:
    if args.check:
        return run_check(args.liveness_file, LIVENESS_MAX_AGE_SECONDS)
    from store.config import get_config
    from worker import gpu_lock

    config = get_config()
    claim = (
        gpu_lock.claimed_gpu(config.home / "gpu-locks", gpu_lock.visible_count())
        if args.gpu == "auto"
        else nullcontext(args.gpu)
    )
    with claim as gpu:
        return _work(None if gpu is None else str(gpu), args.queue or config.queue, args)


def _work(gpu: str | None, queue: str, args: argparse.Namespace) -> int:
    if gpu is not None:
        # Before anything could initialise CUDA: the child that trains sees only this GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    from worker.tasks import app

    app.steps["consumer"].add(liveness.consumer_step(args.liveness_file, LIVENESS_INTERVAL_SECONDS))
    app.worker_main(worker_argv(gpu, queue, args.loglevel))
    return 0
