"""`amid pool` (the workers: id, host, GPU, state, job, last report) and `amid pool drain ID`
(admin keys: the worker finishes its current job and takes no other). Talks to the API as
`amid jobs` does."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from cli.jobs import Api, add_connection_options, client_command

GIB = 1024**3


def _gpu(worker: dict[str, Any]) -> str:
    memory = worker["gpu_memory_bytes"]
    return worker["gpu"] if memory is None else f"{worker['gpu']} ({memory / GIB:.0f} GiB)"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _list(api: Api, args: argparse.Namespace) -> int:
    pool = api.request("GET", "/v1/workers")["items"]
    rows = [
        (w["id"], w["host"], _gpu(w), w["state"], w["job"] or "-", _ago(w["last_seen_seconds"]))
        for w in pool
    ]
    header = ("ID", "HOST", "GPU", "STATE", "JOB", "LAST SEEN")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _drain(api: Api, args: argparse.Namespace) -> int:
    worker = api.request("POST", f"/v1/workers/{quote(args.worker_id, safe='')}/drain")
    running = f", finishing job {worker['job']}" if worker["job"] else ""
    print(f"{worker['id']}: {worker['state']}{running}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("pool", help="List the workers; drain one (admin keys).")
    add_connection_options(parser)
    parser.set_defaults(handler=client_command(_list))
    commands = parser.add_subparsers(dest="pool_command")
    listing = commands.add_parser("list", help="One line per worker (the default).")
    add_connection_options(listing, suppress=True)
    drain = commands.add_parser(
        "drain", help="The worker finishes its current job and takes no other (admin keys)."
    )
    add_connection_options(drain, suppress=True)
    drain.add_argument("worker_id", help="As `amid pool` lists it.")
    drain.set_defaults(handler=client_command(_drain))
