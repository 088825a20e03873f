"""`amid jobs ...`: the service's client for people (submit, list, get, cancel, wait, events,
download). Talks to AMID_URL with AMID_API_KEY over HTTP; errors print the field and the reason
and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

FINISHED = {"succeeded", "failed", "cancelled"}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def pause(seconds: float) -> None:
    """Wait between polls (a seam: tests advance the job here instead of sleeping)."""
    time.sleep(seconds)


class ClientError(Exception):
    """A failure to show the user as one line: `error: message`. The API's error details start
    with the field they are about, so a refused setting reads `error: lambda: ...`."""


def make_http_client(url: str, api_key: str | None) -> httpx.Client:
    """The HTTP client (a seam: tests hand back one wired to the app in-process)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=300.0))


class Api:
    def __init__(self, http: httpx.Client):
        self.http = http

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the API at {self.http.base_url}: {exc}") from exc
        _raise_for_error(response)
        return response.json()

    def stream_to(self, path: str, target: Path) -> None:
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                with target.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
        except httpx.TransportError as exc:
            raise ClientError(f"download interrupted: {exc}") from exc


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        raise ClientError(f"HTTP {response.status_code}: {response.text[:200]}") from None
    if isinstance(body, dict) and "detail" in body:
        raise ClientError(f"{body['detail']} ({body.get('error', response.status_code)})")
    raise ClientError(f"HTTP {response.status_code}: {body}")


# -- commands ------------------------------------------------------------------------------------


def _submit(api: Api, args: argparse.Namespace) -> int:
    import yaml

    path = Path(args.file)
    try:
        settings = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ClientError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(settings, dict):
        raise ClientError(f"{path} must hold a mapping of run settings")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = api.request("POST", "/v1/jobs", json=settings, headers=headers)
    print(job["id"])
    return 0


def _list(api: Api, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    page = api.request("GET", "/v1/jobs", params=params)
    for job in page["items"]:
        progress = job["progress"]
        steps = f"{progress['step']}/{progress['total_steps'] or '?'}"
        print(f"{job['id']}  {job['status']:9}  {steps:>11}  {job['created_at']}")
    if page["next_cursor"]:
        print("(more: raise --limit, up to 100)", file=sys.stderr)
    return 0


def _get(api: Api, args: argparse.Namespace) -> int:
    print(json.dumps(api.request("GET", f"/v1/jobs/{args.job_id}"), indent=2))
    return 0


def _cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.request("POST", f"/v1/jobs/{args.job_id}/cancel")
    state = (
        "cancel requested (stops at the next step)" if job["status"] == "running" else job["status"]
    )
    print(f"{job['id']}: {state}")
    return 0


def _wait(api: Api, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    deadline = time.monotonic() + args.timeout if args.timeout else None
    # A job that moves (a step, a new status) is waited for however long it takes, when asked.
    seen: tuple[str, int] | None = None
    moved_at = time.monotonic()
    bar = tqdm(total=None, unit="step", desc=args.job_id[:8], file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            job = api.request("GET", f"/v1/jobs/{args.job_id}")
            progress = job["progress"]
            if progress["total_steps"] and bar.total != progress["total_steps"]:
                bar.total = progress["total_steps"]
            # update() rather than setting n: tqdm's own rate and ETA come from the increments.
            bar.update(max(0, progress["step"] - bar.n))
            postfix = {"status": job["status"]}
            if progress["eta_seconds"] is not None:
                postfix["server_eta"] = f"{progress['eta_seconds']:.0f}s"
            loss = job["latest_metrics"].get("train/loss")
            if isinstance(loss, int | float):
                postfix["loss"] = f"{loss:.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            if job["status"] in FINISHED:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {args.job_id} still {job['status']} after {args.timeout}s")
            if (job["status"], progress["step"]) != seen:
                seen, moved_at = (job["status"], progress["step"]), time.monotonic()
            elif args.idle_timeout and time.monotonic() - moved_at > args.idle_timeout:
                raise ClientError(
                    f"job {args.job_id} made no progress for {args.idle_timeout:g}s "
                    f"(still {job['status']} at step {progress['step']})"
                )
            pause(args.interval)
    finally:
        bar.close()
    return _report_end(job)


def _report_end(job: dict[str, Any]) -> int:
    print(f"job {job['id']} {job['status']}")
    for name, value in sorted(job["latest_metrics"].items()):
        print(f"  {name} = {value}")
    if job["student_uri"]:
        print(f"student: {job['student_uri']}")
    if job["error"]:
        print(f"error: {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else EXIT_ERROR


def _events(api: Api, args: argparse.Namespace) -> int:
    after: int | None = None
    while True:
        for event in _event_pages(api, args.job_id, after):
            print(
                f"{event['created_at']}  {event['level']:7}  {event['type']:16}  {event['message']}"
            )
            after = event["id"]
        if not args.follow:
            return 0
        if api.request("GET", f"/v1/jobs/{args.job_id}")["status"] in FINISHED:
            # One last read: events written between the page and the status check.
            for event in _event_pages(api, args.job_id, after):
                print(
                    f"{event['created_at']}  {event['level']:7}  {event['type']:16}  {event['message']}"
                )
            return 0
        pause(args.interval)


def _event_pages(api: Api, job_id: str, after: int | None) -> Iterator[dict[str, Any]]:
    while True:
        params: dict[str, Any] = {"limit": 500}
        if after is not None:
            params["after"] = after
        page = api.request("GET", f"/v1/jobs/{job_id}/events", params=params)
        yield from page["items"]
        if len(page["items"]) < params["limit"]:
            return
        after = page["next_after"]


def _download(api: Api, args: argparse.Namespace) -> int:
    target = Path(args.output)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        archive = Path(scratch) / "student.tar.gz"
        api.stream_to(f"/v1/jobs/{args.job_id}/student", archive)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                # filter="data": no absolute paths, no `..`, no links out, no device files.
                tar.extractall(target, filter="data")
                top = {Path(name).parts[0] for name in tar.getnames() if name}
        except (tarfile.TarError, OSError) as exc:
            raise ClientError(f"the downloaded archive could not be unpacked: {exc}") from exc
    for name in sorted(top):
        print(target / name)
    return 0


# -- wiring --------------------------------------------------------------------------------------

Handler = Callable[[Api, argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("jobs", help="Submit and follow jobs on the service.")
    parser.add_argument("--url", help="API URL (default: AMID_URL).")
    parser.add_argument("--api-key", help="API key (default: AMID_API_KEY).")
    commands = parser.add_subparsers(dest="jobs_command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=_runner(handler))
        return sub

    submit = add("submit", _submit, "Submit a run file (YAML); prints the job id.")
    submit.add_argument("file", help="Run settings, as for `amid distill`.")
    submit.add_argument(
        "--idempotency-key", help="Resubmitting with the same key never duplicates."
    )
    listing = add("list", _list, "List your jobs, newest first.")
    listing.add_argument("--status", choices=["queued", "running", *sorted(FINISHED)])
    listing.add_argument("--limit", type=int, default=20, choices=range(1, 101), metavar="N")
    add("get", _get, "Print one job as JSON.").add_argument("job_id")
    add("cancel", _cancel, "Cancel a job.").add_argument("job_id")
    wait = add("wait", _wait, "Show progress until the job ends; exit 0 only if it succeeded.")
    wait.add_argument("job_id")
    wait.add_argument("--interval", type=float, default=2.0, help="Seconds between polls.")
    wait.add_argument(
        "--timeout", type=float, default=None, help="Give up after this many seconds."
    )
    wait.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="Give up only when the job makes no progress (step or status) for this long.",
    )
    events = add("events", _events, "Print a job's events.")
    events.add_argument("job_id")
    events.add_argument(
        "--follow", "-f", action="store_true", help="Keep printing until the job ends."
    )
    events.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    download = add("download", _download, "Download the final student into a directory.")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", required=True, help="Directory to unpack into.")


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from store.config import get_config

        config = get_config()
        api_key = args.api_key or config.api_key
        try:
            with make_http_client(args.url or config.url, api_key) as http:
                return handler(Api(http), args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run
