"""`amid serve`: the whole service on one machine, the embedded default.

With no URLs configured: SQLite under AMID_HOME, kombu's filesystem queue under AMID_HOME/broker
and a local artifact directory. Migrations are applied, then one local worker process (the same
`amid worker` path production uses), the reaper in a thread, and the API under uvicorn in this
process. Ctrl-C or SIGTERM stops uvicorn, and then everything this command started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

logger = logging.getLogger("amid.serve")

WORKER_STOP_SECONDS = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve", help="Run API, one worker and the reaper on this machine (embedded default)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default: 8000).")
    parser.add_argument("--gpu", help="GPU index of the local worker (default: as configured).")
    parser.add_argument(
        "--no-worker", action="store_true", help="Run no local worker (workers run elsewhere)."
    )
    parser.set_defaults(handler=_run)


def start_worker(gpu: str | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cli.main", "worker", "--loglevel=WARNING"]
    if gpu is not None:
        argv.append(f"--gpu={gpu}")
    # Its own process group, so stopping it also stops the child that trains.
    return subprocess.Popen(argv, start_new_session=True)


def stop_process_group(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    except ProcessLookupError:
        return


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from store.config import get_config
    from store.db import upgrade
    from worker.reaper import run_forever

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = get_config()
    config.home.mkdir(parents=True, exist_ok=True)
    upgrade(config.resolved_database_url)
    logger.info(
        "store %s, broker %s, artifacts %s",
        config.resolved_database_url,
        config.resolved_broker_url,
        config.resolved_artifacts_uri,
    )
    worker = None if args.no_worker else start_worker(args.gpu)
    stop = threading.Event()
    # uvicorn re-raises the signal that stopped it once it has shut down; as an exception here
    # (not the default "die now") it lets the `finally` below stop the worker and the reaper.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    reaper = threading.Thread(target=run_forever, args=(stop,), name="reaper", daemon=True)
    reaper.start()
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="warning")
    except (KeyboardInterrupt, SystemExit):
        logger.info("stopping")
    finally:
        stop.set()
        if worker is not None:
            stop_process_group(worker, WORKER_STOP_SECONDS)
        reaper.join(timeout=5)
    return 0
