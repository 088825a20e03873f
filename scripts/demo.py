"""`make demo`: the whole service on this machine, used the way a team would use it.

Starts `amid serve` (SQLite, filesystem queue, local artifacts under .demo/), creates an API key,
submits examples/demo-job.yaml over the REST API with `amid jobs submit`, follows it with
`amid jobs wait`, prints the evaluation figures and how the recommended recipe it runs compares
with plain KD (the quality benchmark's table in BENCHMARKS.md), downloads the student with
`amid jobs download` and prints its local path, and stops everything it started, also on an error
or Ctrl-C.

`--write-readme` also puts the printed report into README.md (between its demo-output markers),
so the figures the README quotes are the ones this command last produced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".demo"
JOB_FILE = ROOT / "examples" / "demo-job.yaml"
DEMO_KIT = ROOT / "core" / "demo"
READY_TIMEOUT_SECONDS = 120.0
# The demo waits as long as its job moves (a busy machine only makes it slower); it gives up
# when the job has made no progress for this long.
JOB_IDLE_SECONDS = 300.0
EVAL_METRICS = ("eval/loss", "eval/rouge_l")
README = ROOT / "README.md"
README_BLOCK = re.compile(
    r"(<!-- demo-output:start -->\n```\n).*?(```\n<!-- demo-output:end -->)", re.S
)
BENCHMARKS = ROOT / "BENCHMARKS.md"
# The demo job fine-tunes its student first, so the comparison is the fine-tuned student's.
QUALITY_TABLE = "### From the fine-tuned student"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def amid(*args: str, env: dict[str, str], capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


def wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"amid serve exited with {server.returncode}; see {HOME / 'serve.log'}"
            )
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {READY_TIMEOUT_SECONDS:.0f}s")


def eval_series(url: str, job_id: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """The job's evaluation metrics over its steps, read from the REST API one series at a time."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name in EVAL_METRICS:
        query = urllib.parse.urlencode({"name": name})
        request = urllib.request.Request(
            f"{url}/v1/jobs/{job_id}/metrics?{query}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            points = json.load(response)["items"]
        series[name] = [(p["step"], p["value"]) for p in points if p["value"] is not None]
    return series


def comparison_with_kd(preset: str) -> list[str]:
    """The header and the rows of KD and `preset` in the quality benchmark's table."""
    text = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.exists() else ""
    start = text.find(QUALITY_TABLE)
    if start == -1:
        return []
    # The heading, a blank line, then the table up to the next blank line.
    parts = text[start:].split("\n\n", 2)
    rows = parts[1].splitlines() if len(parts) > 1 else []
    header = rows[:1]
    return header + [r for r in rows if r.startswith((f"| `{preset}` ", "| `kd` "))]


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def write_readme(report: list[str]) -> None:
    """Replace the README's demo-output block with `report`."""
    text = README.read_text()
    if not README_BLOCK.search(text):
        raise RuntimeError("README.md has no demo-output block")
    block = "".join(line + "\n" for line in report)
    README.write_text(README_BLOCK.sub(lambda m: m.group(1) + block + m.group(2), text, count=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-readme", action="store_true", help="Put the report into README.md too."
    )
    args = parser.parse_args()
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AMID_HOME": str(HOME),
        "AMID_MODEL_ROOTS": str(DEMO_KIT),
        "AMID_DATA_ROOTS": str(DEMO_KIT),
        "AMID_URL": url,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for name in ("AMID_DATABASE_URL", "AMID_BROKER_URL", "AMID_ARTIFACTS_URI", "AMID_API_KEY"):
        env.pop(name, None)

    print("== amid demo: the whole service on this machine (state in .demo/)")
    amid("db", "upgrade", env=env)
    key_output = amid("keys", "create", "demo", env=env, capture=True)
    env["AMID_API_KEY"] = key_output.strip().splitlines()[-1]

    log = (HOME / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(url, server)
        print(f"== service ready at {url} (API, one worker, reaper; log in .demo/serve.log)")
        job_id = (
            amid("jobs", "submit", str(JOB_FILE), env=env, capture=True).strip().splitlines()[-1]
        )
        print(f"== submitted job {job_id} from {JOB_FILE.relative_to(ROOT)}; following it")
        with contextlib.suppress(subprocess.CalledProcessError):
            # Non-zero when the job did not succeed or stopped moving: reported just below.
            amid("jobs", "wait", job_id, "--idle-timeout", str(JOB_IDLE_SECONDS), env=env)
        job = json.loads(amid("jobs", "get", job_id, env=env, capture=True))
        print(f"== job {job_id}: {job['status']}")
        if job["status"] != "succeeded":
            if job["status"] in ("queued", "running"):
                print(f"   no progress for {JOB_IDLE_SECONDS:.0f}s; see .demo/serve.log")
            else:
                print(f"   error: {job.get('error')}")
            return 1
        # The README shows the report with the run's own id and paths shortened.
        short = job_id[:4] + "…"
        report = [f"== job {short}: succeeded"]
        for name, points in sorted(eval_series(url, job_id, env["AMID_API_KEY"]).items()):
            trail = " -> ".join(f"{value:.4f} (step {step})" for step, value in points)
            report.append(f"   {name}: {trail}")
            print(report[-1])
        preset = job["settings"]["preset"]
        rows = comparison_with_kd(preset)
        if rows:
            report.append(
                f"== {preset} against plain KD from a fine-tuned student (BENCHMARKS.md):"
            )
            report.extend(f"   {row}" for row in rows)
            print("\n".join(report[-len(rows) - 1 :]))
        output = amid(
            "jobs", "download", job_id, "-o", str(HOME / "student"), env=env, capture=True
        )
        student = Path(output.strip().splitlines()[-1])
        print(f"== the student: {student}")
        report.append(f"== the student: {student.relative_to(ROOT)}".replace(job_id, short))
        print("   load it with transformers' AutoModelForCausalLM.from_pretrained(<that path>);")
        print("   its README.md is the model card, with the prompt template it was trained on")
        if args.write_readme:
            write_readme(report)
            print(f"== {README.relative_to(ROOT)}: demo figures updated")
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping the service")
        return 130
    finally:
        stop(server)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
