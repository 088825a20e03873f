"""Your data in, your student out, the whole run in view — on the embedded default (`amid serve`:
SQLite, a filesystem queue, local artifacts), in a real headless browser.

The headline case: upload a dataset with `amid files upload`, submit a job on `file:<id>`,
follow it in the dashboard, download a mid-run checkpoint and the final student with the CLI,
and load the student with transformers, prompting it with the template its card records.
Then: a running job's curve gains points and the page's cancel button stops it; the pool view
shows the local worker running a job; /docs renders with every request off this server refused.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Browser, Page, expect

from core.data import instruction_prompt
from store.artifacts import ArtifactStore, tensorboard_key
from tests.integration.e2e._service import (
    DEMO,
    REPO,
    Client,
    base_env,
    free_port,
    job_body,
    make_key,
    start,
    stop,
    wait_ready,
)
from tests.integration.e2e.browser import chromium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Where the README's screenshot comes from: set to a path to write the dashboard's picture there.
SCREENSHOT_ENV = "AMID_DASHBOARD_SCREENSHOT"


@dataclass
class Service:
    url: str
    key: str
    env: dict[str, str]
    home: Path
    client: Client

    def amid(self, *argv: str) -> str:
        """The real `amid` command in its own process, as a user runs it."""
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", *argv],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from store.db import upgrade

    base = tmp_path_factory.mktemp("dashboard")
    home = base / "home"
    home.mkdir()
    database_url = f"sqlite:///{(home / 'amid.db').resolve()}"
    upgrade(database_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = make_key(database_url)
    env = base_env(home, AMID_URL=url, AMID_API_KEY=key)
    server = start(["cli.main", "serve", "--port", str(port)], env, base / "serve.log")
    client = Client(url, key)
    try:
        wait_ready(url, [server])
        yield Service(url=url, key=key, env=env, home=home, client=client)
    finally:
        client.close()
        stop(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{service.url}/ui/")
    # The key is entered once; the page keeps it for every later view.
    page.fill("#key-input", service.key)
    page.click("#key-form button")
    expect(page.locator("#list-view")).to_be_visible()
    try:
        yield page
    finally:
        context.close()


def _curve_points(page: Page, series: str) -> int:
    """Points drawn in the series' chart: the vertices of its line (0 when there is none)."""
    line = page.locator(f'.chart[data-series="{series}"] polyline')
    if line.count() == 0:
        return 0
    return len((line.get_attribute("points") or "").split())


def _tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars in TensorBoard event files, read record by record (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_upload_submit_follow_download_and_load_the_student(
    service: Service, page: Page, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = (DEMO / "data" / "demo.jsonl").read_text().splitlines()[:200]
    dataset = tmp_path / "capitals.jsonl"
    dataset.write_text("\n".join(rows) + "\n")
    ref = service.amid("files", "upload", str(dataset))
    assert ref.startswith("file:")

    body: dict[str, Any] = job_body(max_steps=6, checkpoint_interval=2, eval_interval=3)
    body["dataset"] = {"source": ref, "format": "dolly", "eval_size": 8}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(body))
    job_id = service.amid("jobs", "submit", str(job_file), "--name", "capitals", "--tag", "e2e")

    # Followed in the dashboard: the list links to the job page, whose curve fills in.
    page.click(f'tr[data-job="{job_id}"] a')
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    expect(page.locator("#job-name")).to_have_text("capitals")
    assert _curve_points(page, "train/loss") == 6
    assert page.locator('.chart[data-series="eval/rouge_l"]').get_attribute("data-points") == "2"
    expect(page.locator("#checkpoints tbody tr")).to_have_count(3)
    expect(page.locator("#events li").last).to_contain_text("succeeded")

    # A mid-run checkpoint and the final student, through the CLI; each prints a local path.
    checkpoint = Path(
        service.amid("jobs", "download", job_id, "-o", str(tmp_path / "c"), "--checkpoint", "2")
    )
    assert (checkpoint / "model.safetensors").is_file()
    assert "at step 2" in (checkpoint / "README.md").read_text()
    student = Path(service.amid("jobs", "download", job_id, "-o", str(tmp_path / "s")))
    card = (student / "README.md").read_text()
    assert f"amid job `{job_id}` at step 6" in card and f"dataset: `{ref}`" in card

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    messages = [{"role": "user", "content": "Which city is the capital of Chile?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == instruction_prompt(messages[0]["content"], "")
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    # The run's curves as TensorBoard event files beside its other artifacts.
    artifacts = ArtifactStore((service.home / "artifacts").resolve().as_uri())
    events = artifacts.download_dir(
        artifacts.uri_for(tensorboard_key(job_id)), tmp_path / "tensorboard"
    )
    scalars = _tensorboard_scalars(events)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert len(scalars["eval/rouge_l"]) == 2


def test_a_running_job_s_curve_grows_and_the_cancel_button_stops_it(
    service: Service, page: Page
) -> None:
    body = job_body(
        max_steps=5000, checkpoint_interval=0, eval_interval=0, name="capitals-long", tags=["e2e"]
    )
    job_id = service.client.submit(body).json()["id"]
    page.goto(f"{service.url}/ui/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("running", timeout=120_000)

    page.wait_for_function(
        "() => (document.querySelector('.chart[data-series=\"train/loss\"] polyline')"
        "?.getAttribute('points') || '').split(' ').length >= 2",
        timeout=60_000,
    )
    drawn = _curve_points(page, "train/loss")
    page.wait_for_function(
        f"() => document.querySelector('.chart[data-series=\"train/loss\"] polyline')"
        f".getAttribute('points').split(' ').length > {drawn}",
        timeout=60_000,
    )

    if os.environ.get(SCREENSHOT_ENV):
        # The page down to its curves (the events below quote this machine's paths).
        charts = page.locator("#charts").bounding_box()
        assert charts is not None
        height = charts["y"] + charts["height"] + 16
        page.screenshot(
            path=os.environ[SCREENSHOT_ENV], clip={"x": 0, "y": 0, "width": 1280, "height": height}
        )

    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    job = service.client.job(job_id)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 5000


def test_the_pool_view_shows_the_local_worker_and_the_job_it_runs(
    service: Service, page: Page
) -> None:
    body = job_body(max_steps=5000, checkpoint_interval=0, eval_interval=0, name="pool-view")
    job_id = service.client.submit(body).json()["id"]
    page.click("#pool-link")
    rows = page.locator("#workers tbody tr")
    expect(rows).to_have_count(1)  # `amid serve`'s own worker
    cells = rows.locator("td")
    expect(cells.nth(3)).to_have_text("busy", timeout=120_000)
    expect(cells.nth(2)).to_have_text("cpu")
    expect(cells.nth(4).locator("a")).to_have_attribute("href", f"#/jobs/{job_id}")
    expect(cells.nth(5)).to_contain_text("s ago")

    service.client.http.post(f"/v1/jobs/{job_id}/cancel")
    expect(cells.nth(3)).to_have_text("idle", timeout=60_000)
    expect(cells.nth(4)).to_have_text("")
    assert service.client.job(job_id)["status"] == "cancelled"


def test_docs_render_with_no_network_beyond_the_service(service: Service, browser: Browser) -> None:
    context = browser.new_context()
    refused: list[str] = []

    def only_the_service(route: Any) -> None:
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_service)
    page = context.new_page()
    try:
        page.goto(f"{service.url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("amid", timeout=30_000)
        expect(page.locator(".swagger-ui .btn.authorize")).to_be_visible()
        expect(page.locator(".opblock-summary-path", has_text="/v1/files")).not_to_have_count(0)
        assert refused == []
        spec = json.loads(page.evaluate("() => fetch('/openapi.json').then(r => r.text())"))
        assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    finally:
        context.close()
