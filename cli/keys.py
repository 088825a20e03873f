"""`amid keys create NAME [--admin] [--share N] [--max-running N] [--webhook-url URL]`,
`amid keys list`, `amid keys revoke ID`.

These talk to the database directly (they run where the service runs): a key is how a person
reaches the API, so it cannot be made through the API without one already.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="Manage API keys (on the service's database).")
    commands = parser.add_subparsers(dest="keys_command", required=True)
    create = commands.add_parser(
        "create", help="Create a key and print its secret (shown this once only)."
    )
    create.add_argument("name", help="Who or what the key is for.")
    create.add_argument("--admin", action="store_true", help="May see and cancel every job.")
    create.add_argument(
        "--share",
        type=int,
        default=1,
        help="Weight in the pool's turns: N jobs started per turn where a share of 1 starts one.",
    )
    create.add_argument(
        "--max-running",
        type=int,
        default=None,
        metavar="N",
        help="At most N jobs of this key run at once (default: no limit).",
    )
    create.add_argument(
        "--webhook-url",
        help="Where this key's jobs POST their end unless a job names its own (http or https).",
    )
    create.set_defaults(handler=_create)
    listing = commands.add_parser("list", help="List keys (never their secrets).")
    listing.set_defaults(handler=_list)
    revoke = commands.add_parser("revoke", help="Revoke a key by id.")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace) -> int:
    from store.db import session_scope
    from store.keys import InvalidKeySetting, create_api_key
    from store.webhooks import check_webhook_url

    if args.webhook_url is not None:
        try:
            check_webhook_url(args.webhook_url)
        except ValueError as exc:
            print(f"error: --webhook-url: {exc}", file=sys.stderr)
            return 2
    try:
        with session_scope() as session:
            key, secret = create_api_key(
                session,
                args.name,
                is_admin=args.admin,
                share=args.share,
                max_running=args.max_running,
                webhook_url=args.webhook_url,
            )
            key_id, webhook_secret = key.id, key.webhook_secret
    except InvalidKeySetting as exc:
        print(f"error: --{str(exc.field).replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    role = "admin key" if args.admin else "key"
    # The secret alone on stdout, so `export AMID_API_KEY=$(amid keys create me)` works.
    print(
        f"created {role} {key_id} for {args.name!r}; the secret is not shown again\n"
        f"webhook signing secret: {webhook_secret} (GET /v1/webhook-secret shows it again)",
        file=sys.stderr,
    )
    print(secret)
    return 0


def _list(args: argparse.Namespace) -> int:
    from store.db import session_scope
    from store.keys import list_api_keys

    with session_scope() as session:
        for key in list_api_keys(session):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            role = "admin" if key.is_admin else "user"
            limit = "no limit" if key.max_running is None else f"max {key.max_running} running"
            webhook = f"  webhook {key.webhook_url}" if key.webhook_url else ""
            print(
                f"{key.id}  {role:5}  {state:18}  share {key.share}  {limit:18}  {key.name}{webhook}"
            )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from store.db import session_scope
    from store.keys import revoke_api_key

    with session_scope() as session:
        revoked = revoke_api_key(session, args.key_id)
    if not revoked:
        print(f"error: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
