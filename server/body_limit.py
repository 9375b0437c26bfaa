"""Request body limit for the model service, enforced while the body streams in.

A ``Content-Length`` check alone lets a chunked upload (no length announced) through: the
framework then reads it whole into memory before anything looks at its size. ``BodyLimit`` is
an ASGI middleware that reads the body itself, counting the bytes of every ``receive()``
message, and answers 413 as soon as the count passes the limit, without reading the rest; a
body within the limit is handed on to the app unchanged. The memory a request can take is thus
bounded by the limit, whatever the client sends. A ``Content-Length`` over the limit is answered
413 at once, before any body byte is read (so a client waiting on ``Expect: 100-continue`` never
sends it).

The 413 carries ``Connection: close``: the server then closes the connection instead of reading
and discarding the rest of the upload.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: HTTP request bodies over ``max_bytes`` get 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [value for name, value in scope.get("headers", []) if name.lower() == b"content-length"]
        if lengths and (not lengths[0].isdigit() or int(lengths[0]) > self.max_bytes):
            await self._refuse(send, f"Content-Length {lengths[0].decode('latin-1')}")
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(send, f"{received} bytes received so far")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, seen: str) -> None:
        limit = self.max_bytes
        detail = f"request body over the {limit} byte limit ({limit / 2**20:g} MiB): {seen}; send at most {limit} bytes"
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body as one message, then defers to the server's
    (which then reports a disconnect, should the app wait for one)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
