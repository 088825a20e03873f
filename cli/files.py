"""`amid files ...`: upload a dataset or a model to the service, list and remove uploads.

A job names an upload as `file:<id>` (as `dataset:` or as `teacher:`/`student:`). A model is sent
as a tar archive of its `save_pretrained` directory: give the directory and it is packed here.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli.jobs import Api, ClientError, add_connection_options, client_command

CHUNK_BYTES = 1 << 20


def _chunks(path: Path, digest: Any) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            yield chunk


def _send(api: Api, path: Path, purpose: str, filename: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    upload: dict[str, Any] = api.request(
        "POST",
        "/v1/files",
        params={"purpose": purpose, "filename": filename},
        content=_chunks(path, digest),
        headers={"Content-Type": "application/octet-stream"},
    )
    if upload["sha256"] != digest.hexdigest():
        raise ClientError(f"the service stored {upload['id']} with another sha256 than was sent")
    return upload


def _upload(api: Api, args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise ClientError(f"{path} does not exist")
    purpose = args.purpose or ("model" if path.is_dir() else "dataset")
    if path.is_dir():
        if purpose != "model":
            raise ClientError(f"{path} is a directory: only a model is uploaded as one")
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / f"{path.resolve().name}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(path, arcname=path.resolve().name)
            upload = _send(api, archive, purpose, archive.name)
    else:
        upload = _send(api, path, purpose, path.name)
    print(upload["ref"])
    return 0


def _list(api: Api, args: argparse.Namespace) -> int:
    params = {"purpose": args.purpose} if args.purpose else {}
    for item in api.request("GET", "/v1/files", params=params)["items"]:
        print(
            f"{item['ref']}  {item['purpose']:7}  {item['size']:>12}  "
            f"{item['created_at'][:19]}  {item['filename']}"
        )
    return 0


def _remove(api: Api, args: argparse.Namespace) -> int:
    for file_id in args.file_ids:
        api.request("DELETE", f"/v1/files/{file_id.removeprefix('file:')}")
        print(f"removed {file_id}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "files", help="Upload datasets and models; jobs name them file:<id>."
    )
    add_connection_options(parser)
    commands = parser.add_subparsers(dest="files_command", required=True)
    upload = commands.add_parser(
        "upload", help="Upload a file or a model directory; prints file:<id>."
    )
    upload.add_argument("path", help="A .jsonl/.json/.parquet dataset, or a model directory.")
    upload.add_argument(
        "--purpose", choices=["dataset", "model"], help="Default: model for a directory."
    )
    upload.set_defaults(handler=client_command(_upload))
    listing = commands.add_parser("list", help="List your uploads, newest first.")
    listing.add_argument("--purpose", choices=["dataset", "model"])
    listing.set_defaults(handler=client_command(_list))
    remove = commands.add_parser("rm", help="Delete uploads.")
    remove.add_argument("file_ids", nargs="+", metavar="ID", help="file:<id> or the bare id.")
    remove.set_defaults(handler=client_command(_remove))
    for sub in (upload, listing, remove):
        add_connection_options(sub, suppress=True)
