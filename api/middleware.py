"""A cap on request body size, enforced before the body is parsed."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge, error_body
from store.config import get_config

UPLOAD_PATH = "/v1/files"


class BodySizeLimit:
    """Refuse bodies over `AMID_MAX_BODY_BYTES` (uploads: `AMID_MAX_UPLOAD_BYTES`) with a 413, whether or not they declare a length.

    A declared Content-Length is checked up front; a chunked body is counted as it streams in,
    and reading past the limit raises `BodyTooLarge` inside the app's body parsing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = get_config()
        # An upload is a file, not a request document: it has its own, larger limit.
        uploading = scope["path"].rstrip("/") == UPLOAD_PATH
        limit = config.max_upload_bytes if uploading else config.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            body = error_body("RequestTooLarge", f"request body exceeds {limit} bytes", "body")
            await send_error(send, 413, body, [(b"connection", b"close")])
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_error(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer with the JSON error `body` straight from a middleware, before the app runs."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
