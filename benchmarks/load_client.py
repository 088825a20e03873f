"""A lean HTTP/1.1 load client: one keep-alive connection per simulated user.

A load generator that is slower than the server measures itself. On a 2-core machine, 100 httpx
clients in one event loop kept that process at a full core while the API sat at half of one;
their latencies were mostly the client's own queueing. This client speaks only what the API's
answers need (a status line, headers, a `Content-Length` body) and costs a fraction of that, so
the latencies it records are the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


class ProtocolError(Exception):
    """The server's answer was not one this client can read (chunked, or malformed)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, target: str, headers: dict[str, str], payload: Any = None
    ) -> Answer:
        """One request on the connection (opened on first use, re-opened after a failure)."""
        try:
            return await asyncio.wait_for(
                self._exchange(method, target, headers, payload), self.timeout
            )
        except BaseException:
            # A half-read answer leaves the stream unusable: the next request starts afresh.
            await self.close()
            raise

    async def _exchange(
        self, method: str, target: str, headers: dict[str, str], payload: Any
    ) -> Answer:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        body = b"" if payload is None else json.dumps(payload).encode()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if payload is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP status line: {head[0]!r}")
        answer_headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                answer_headers[name.strip().lower()] = value.strip()
        if "content-length" not in answer_headers:
            raise ProtocolError("an answer without Content-Length")
        content = await reader.readexactly(int(answer_headers["content-length"]))
        if answer_headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(int(parts[1]), answer_headers, content)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            # The peer may have closed it first: then there is nothing left to release.
            with contextlib.suppress(OSError):
                await writer.wait_closed()
