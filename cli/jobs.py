"""`amid jobs ...`: the service's client for people (submit, list, get, cancel, wait, events,
download). Talks to AMID_URL with AMID_API_KEY over HTTP; errors print the field and the reason
and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
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
        return None if response.status_code == 204 else response.json()

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
        # A key problem is fixed on the client's side: say where the client reads its key.
        hint = " (set AMID_API_KEY or pass --api-key)" if response.status_code == 401 else ""
        raise ClientError(f"{body['detail']} ({body.get('error', response.status_code)}){hint}")
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
    where = _non_finite(settings, "")
    if where is not None:
        # JSON has no infinity or NaN (YAML's .inf, .nan): refuse here, naming the field.
        raise ClientError(f"{where}: must be a finite number (JSON has no infinity or NaN)")
    if args.name is not None:
        settings["name"] = args.name
    if args.tag:
        settings["tags"] = [*settings.get("tags", []), *args.tag]
    if args.webhook_url is not None:
        settings["webhook_url"] = args.webhook_url
    if args.priority is not None:
        settings["priority"] = args.priority
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = api.request("POST", "/v1/jobs", json=settings, headers=headers)
    print(job["id"])
    return 0


def _non_finite(value: Any, where: str) -> str | None:
    """The path of the first infinite or NaN number in `value`, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "body"
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        children = [(where, item) for item in value]
    for path, item in children:
        found = _non_finite(item, path)
        if found is not None:
            return found
    return None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _when(job: dict[str, Any]) -> str:
    """A running job's time to its end; a queued one's place in the queue and time to its start."""
    if job["status"] == "running":
        return _eta(job["progress"]["eta_seconds"])
    if job["status"] == "queued" and job["queue_position"] is not None:
        return f"#{job['queue_position']} {_eta(job['start_eta_seconds'])}"
    return "-"


def _list(api: Api, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    for option in ("status", "name", "tag", "owner"):
        if getattr(args, option):
            params[option] = getattr(args, option)
    page = api.request("GET", "/v1/jobs", params=params)
    print(f"{'ID':32}  {'NAME':20}  {'PRESET':7}  {'STATUS':9}  {'PROGRESS':>16}  {'ETA':>10}")
    for job in page["items"]:
        progress = job["progress"]
        done = f"{progress['step']}/{progress['total_steps'] or '?'}"
        if progress["fraction"] is not None:
            done += f" {progress['fraction']:4.0%}"
        name = (job["name"] or "-")[:20]
        preset = job["settings"].get("preset") or "-"
        print(
            f"{job['id']}  {name:20}  {preset:7}  {job['status']:9}  {done:>16}  {_when(job):>10}"
        )
    if page["next_cursor"]:
        print("(more: raise --limit, up to 100)", file=sys.stderr)
    return 0


def _get(api: Api, args: argparse.Namespace) -> int:
    print(json.dumps(api.request("GET", f"/v1/jobs/{args.job_id}"), indent=2))
    return 0


def _status(api: Api, args: argparse.Namespace) -> int:
    job = api.request("GET", f"/v1/jobs/{args.job_id}")
    line = f"{job['id']}  {job['status']}"
    if job["status"] == "queued" and job["queue_position"] is not None:
        starts = job["start_eta_seconds"]
        line += f"  position {job['queue_position']}"
        line += f", starts in about {_eta(starts)}" if starts is not None else ", start unknown"
    elif job["status"] == "running":
        progress = job["progress"]
        line += f"  step {progress['step']}/{progress['total_steps'] or '?'}"
        if progress["eta_seconds"] is not None:
            line += f", ends in about {_eta(progress['eta_seconds'])}"
    print(line)
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
            if job["queue_position"] is not None:
                postfix["queue"] = f"#{job['queue_position']}"
            if job["start_eta_seconds"] is not None:
                postfix["starts_in"] = f"{job['start_eta_seconds']:.0f}s"
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


def _metrics(api: Api, args: argparse.Namespace) -> int:
    from cli.sparkline import sparkline

    params = {"name": args.series} if args.series else {}
    points = api.request("GET", f"/v1/jobs/{args.job_id}/metrics", params=params)["items"]
    series: dict[str, list[tuple[int, float | None]]] = {}
    for point in points:
        series.setdefault(point["name"], []).append((point["step"], point["value"]))
    if not series:
        raise ClientError(
            f"job {args.job_id} has no metric points"
            + (f" named {args.series}" if args.series else "")
        )
    width = max(len(name) for name in series)
    for name, values in sorted(series.items()):
        line = sparkline([value for _, value in values], args.width)
        last_step, last = values[-1]
        shown = "null" if last is None else f"{last:.4g}"
        print(f"{name:{width}}  {line}  {shown} (step {last_step}, {len(values)} points)")
        if args.series:
            for step, value in values:
                print(f"{step}\t{'null' if value is None else value}")
    return 0


def _students(api: Api, args: argparse.Namespace) -> int:
    students = api.request("GET", f"/v1/jobs/{args.job_id}/students")["items"]
    metric = next((s["metric"] for s in students if s["metric"]), None)
    print(f"{'rank':>4}  {'student':>7}  {metric or 'score (once succeeded)':>24}  knobs")
    for student in students:
        rank = "-" if student["rank"] is None else str(student["rank"])
        score = "-" if student["score"] is None else f"{student['score']:.4f}"
        knobs = ", ".join(f"{key}={value}" for key, value in student["knobs"].items())
        print(f"{rank:>4}  {student['student']:>7}  {score:>24}  {knobs or '(the job settings)'}")
    return 0


def _download(api: Api, args: argparse.Namespace) -> int:
    if args.checkpoint is not None and args.student is not None:
        raise ClientError("--checkpoint and --student: choose one")
    target = Path(args.output)
    target.mkdir(parents=True, exist_ok=True)
    source = f"/v1/jobs/{args.job_id}/student"
    if args.checkpoint is not None:
        source = f"/v1/jobs/{args.job_id}/checkpoints/{args.checkpoint}/archive"
    if args.student is not None:
        source = f"/v1/jobs/{args.job_id}/students/{args.student}"
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        archive = Path(scratch) / "artifact.tar.gz"
        api.stream_to(source, archive)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                # filter="data": no absolute paths, no `..`, no links out, no device files.
                tar.extractall(target, filter="data")
                top = {Path(name).parts[0] for name in tar.getnames() if name}
        except (tarfile.TarError, OSError) as exc:
            raise ClientError(f"the downloaded archive could not be unpacked: {exc}") from exc
    for name in sorted(top):
        print((target / name).resolve())
    return 0


# -- wiring --------------------------------------------------------------------------------------

Handler = Callable[[Api, argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("jobs", help="Submit and follow jobs on the service.")
    add_connection_options(parser)
    commands = parser.add_subparsers(dest="jobs_command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        add_connection_options(sub, suppress=True)
        sub.set_defaults(handler=client_command(handler))
        return sub

    submit = add("submit", _submit, "Submit a run file (YAML); prints the job id.")
    submit.add_argument("file", help="Run settings, as for `amid distill`.")
    submit.add_argument(
        "--idempotency-key", help="Resubmitting with the same key never duplicates."
    )
    submit.add_argument("--name", help="A name for the job (overrides the file's `name`).")
    submit.add_argument(
        "--tag", action="append", default=[], help="A tag (repeat for more); adds to `tags`."
    )
    submit.add_argument(
        "--webhook-url", help="POST the job's end here (overrides the file's `webhook_url`)."
    )
    submit.add_argument(
        "--priority",
        type=int,
        help="Order among your own queued jobs, -10 to 10, higher first (default 0).",
    )
    listing = add("list", _list, "List your jobs, newest first.")
    listing.add_argument("--status", choices=["queued", "running", *sorted(FINISHED)])
    listing.add_argument("--name", help="Only jobs whose name contains this.")
    listing.add_argument("--tag", help="Only jobs with this tag.")
    listing.add_argument("--owner", help="Only jobs of this API key id (admin keys).")
    listing.add_argument("--limit", type=int, default=20, choices=range(1, 101), metavar="N")
    add("get", _get, "Print one job as JSON.").add_argument("job_id")
    status = add("status", _status, "One line: a job's state, and its place in the queue.")
    status.add_argument("job_id")
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
    download = add(
        "download", _download, "Download the final student (or a checkpoint); prints its path."
    )
    download.add_argument("job_id")
    download.add_argument("-o", "--output", required=True, help="Directory to unpack into.")
    download.add_argument(
        "--checkpoint", type=int, metavar="STEP", help="The checkpoint at this step instead."
    )
    download.add_argument(
        "--student", type=int, metavar="K", help="Student K of a sweep instead (from 0)."
    )
    students = add("students", _students, "A sweep's students, ranked best first.")
    students.add_argument("job_id")
    metrics = add("metrics", _metrics, "Print a job's metric series with a sparkline.")
    metrics.add_argument("job_id")
    metrics.add_argument(
        "--name", dest="series", metavar="SERIES", help="One series (e.g. train/loss), every point."
    )
    metrics.add_argument("--width", type=int, default=50, help="Sparkline characters.")


def add_connection_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--url and --api-key, before or after the subcommand (`amid jobs --url U list` and
    `amid jobs list --url U`). On a subcommand they default to nothing at all (SUPPRESS), so
    they never overwrite a value given before it."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--url", default=default, help="API URL (default: AMID_URL).")
    parser.add_argument("--api-key", default=default, help="API key (default: AMID_API_KEY).")


def client_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
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
