"""`amid reaper [--once]`: re-queue jobs of lost workers, re-send queued jobs and send due
webhooks, every interval."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from types import FrameType


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
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
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
    run_forever(stop, args.interval)
    return 0
