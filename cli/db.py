"""`amid db upgrade`: apply the job store's migrations."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("db", help="Manage the job database.")
    commands = parser.add_subparsers(dest="db_command", required=True)
    upgrade = commands.add_parser(
        "upgrade", help="Apply the migrations (to AMID_DATABASE_URL, or the embedded SQLite)."
    )
    upgrade.add_argument("--url", help="Database URL (default: the configured one).")
    upgrade.add_argument("--revision", default="head", help="Target revision (default: head).")
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> int:
    from store.config import get_config
    from store.db import current_revision, upgrade

    url = args.url or get_config().resolved_database_url
    upgrade(url, args.revision)
    print(f"database at revision {current_revision(url)}")
    return 0
