"""`amid worker [--gpu N] [--queue Q]`: one Celery worker process for one GPU.

Concurrency 1, prefetch 1 and a fresh child process per job (its own CUDA context); the parent
never imports torch. `--gpu N` pins the process to GPU N through CUDA_VISIBLE_DEVICES and names
the worker after it.
"""

from __future__ import annotations

import argparse
import os
import socket


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("worker", help="Run a GPU worker (one per GPU).")
    parser.add_argument("--gpu", help="GPU index this worker owns (sets CUDA_VISIBLE_DEVICES).")
    parser.add_argument("--queue", help="Queue to consume (default: AMID_QUEUE).")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO).")
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
    if args.gpu is not None:
        # Before anything could initialise CUDA: the child that trains sees only this GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    from store.config import get_config
    from worker.tasks import app

    queue = args.queue or get_config().queue
    app.worker_main(worker_argv(args.gpu, queue, args.loglevel))
    return 0
