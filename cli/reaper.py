"""`amid reaper [--once]`: re-queue jobs of lost workers, re-send queued jobs and send due
webhooks, every interval.

`--check` is the container health check: did this reaper's loop turn within a few intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from cli.health import run_check
from worker import liveness

# The health check allows this many intervals without a turn of the loop (a pass can be slow)...
LIVENESS_INTERVALS = 3
# ...and never less than this, for very short intervals.
LIVENESS_MIN_AGE_SECONDS = 30.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "reaper",
        help=(
            "Re-queue stale jobs, re-send lost messages and send due webhooks "
            "(loops; --once for one pass)."
        ),
    )
    parser.add_argument("--once", action="store_true", help="Run one pass and print what it did.")
    parser.add_argument(
        "--interval",
        type=float,
        help="Seconds between passes (default: AMID_REAPER_INTERVAL_SECONDS).",
    )
    parser.add_argument(
        "--liveness-file",
        type=Path,
        default=liveness.default_path("reaper"),
        help="File each turn of the loop touches (default: %(default)s).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"Exit 0 if the reaper using --liveness-file touched it within {LIVENESS_INTERVALS} "
        "intervals, else 1 (a container health check).",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.check:
        from store.config import get_config

        interval = args.interval or get_config().reaper_interval_seconds
        max_age = max(LIVENESS_INTERVALS * interval, LIVENESS_MIN_AGE_SECONDS)
        return run_check(args.liveness_file, max_age)
    from worker.reaper import run_forever, sweep

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.once:
        print(json.dumps(sweep()))
        return 0
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_forever(stop, args.interval, args.liveness_file)
    return 0
