"""A small asyncio client for load runs: POSTs a streaming completion over a raw
HTTP/1.1 connection and reads its server-sent events, optionally hanging up after a few
(no client library in the way of 200 concurrent streams on a small machine)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time


@dataclasses.dataclass
class StreamResult:
    status: int
    token_ids: list[int]
    finish_reason: str | None
    disconnected: bool  # this client hung up early
    first_token_s: float | None
    total_s: float


async def stream_completion(
    host: str, port: int, body: dict, *, disconnect_after: int | None = None,
    api_key: str | None = None,
) -> StreamResult:  # fmt: skip
    """Send `body` (stream forced on, return_token_ids on) to /v1/completions."""
    payload = json.dumps({**body, "stream": True, "return_token_ids": True}).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    tokens, reason, first, events = [], None, None, 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                reason = "error"
                break
            for choice in chunk["choices"]:
                if choice.get("token_ids"):
                    first = first or time.perf_counter() - t0
                    tokens += choice["token_ids"]
                reason = choice.get("finish_reason") or reason
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                return StreamResult(status, tokens, None, True, first, time.perf_counter() - t0)
    finally:
        writer.close()
    return StreamResult(status, tokens, reason, False, first, time.perf_counter() - t0)
