"""A server-sent-events response that notices a client leaving at once.

The events come from an async iterator; a task watches the connection for
``http.disconnect`` meanwhile, so a client that goes away while its request waits or
runs is seen without waiting for the next token. Either way ``on_close`` runs (the
caller aborts what is unfinished there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def event(data: str) -> str:
    return f"data: {data}\n\n"


class EventStreamResponse(Response):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        async def write():
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for chunk in self.events:
                await send(
                    {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        writer, watcher = asyncio.ensure_future(write()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()
            self.on_close()
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            exc = writer.exception()
            if not isinstance(exc, OSError):  # a client gone mid-write is not an error
                raise exc
