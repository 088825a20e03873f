"""A real HTTP receiver for webhook tests, and the verification snippet users copy from the docs.

The receiver listens on 127.0.0.1 in a thread of the test, records every POST and answers with
the statuses it was told to, in turn (200 once they run out).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast

WEBHOOKS_DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
Verify = Callable[..., bool]


def documented_verifier() -> Verify:
    """`verify_amid_webhook` exactly as docs/webhooks.md gives it to users (its code block is
    run here), so the documentation and the tests cannot drift apart."""
    doc = WEBHOOKS_DOC.read_text()
    section = doc[doc.index("## Verifying a delivery") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "docs/webhooks.md has no Python block under 'Verifying a delivery'"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(WEBHOOKS_DOC), "exec"), namespace)
    return cast(Verify, namespace["verify_amid_webhook"])


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Receiver:
    def __init__(self, answers: Iterable[int] = ()) -> None:
        self.received: list[Received] = []
        self._answers = list(answers)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver._answers.pop(0) if receiver._answers else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", f"{receiver.url}/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return  # the test asserts on `received`, not on a log

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def wait(self, count: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.received)} of {count} webhook deliveries arrived")
