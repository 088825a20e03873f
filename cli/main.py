"""The `amid` command: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)` and keeps heavy imports (torch, FastAPI,
SQLAlchemy) inside the function that runs it, so `amid --help` and the client stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module holding its `register(subparsers)`
SUBCOMMANDS: dict[str, str] = {
    "distill": "cli.distill",
    "db": "cli.db",
    "serve": "cli.serve",
    "worker": "cli.worker",
    "reaper": "cli.reaper",
    "jobs": "cli.jobs",
    "keys": "cli.keys",
    "files": "cli.files",
    "pool": "cli.pool",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amid", description="AMiD distillation: run locally, serve, or talk to the service."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not there yet (or whose extra is not installed).
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int | None = args.handler(args)
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
