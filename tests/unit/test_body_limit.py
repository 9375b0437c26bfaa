"""The service's body limit (server/body_limit.py) driven as a plain ASGI app: how many receive()
calls it makes, what it answers and what the wrapped app sees."""

from __future__ import annotations

import asyncio
import json

from server.body_limit import BodyLimit

LIMIT = 1000


def _echo_app(seen: list[bytes]):
    """An app that reads the whole body, like a framework parsing JSON, and answers 200."""

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _call(chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None):
    """POST ``chunks`` as one streamed body (one receive() message each) through BodyLimit around
    the echo app; returns (messages the middleware pulled, what it sent, bodies the app saw)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    pulled: list[dict] = []
    sent: list[dict] = []
    seen: list[bytes] = []

    async def receive():
        message = messages[len(pulled)] if len(pulled) < len(messages) else {"type": "http.disconnect"}
        pulled.append(message)
        return message

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers or []}
    asyncio.run(BodyLimit(_echo_app(seen), max_bytes=LIMIT)(scope, receive, send))
    return pulled, sent, seen


def test_chunked_body_over_the_limit_is_refused_after_the_chunk_that_passes_it():
    # 10 chunks of 300 bytes (3000 in all): 4 × 300 = 1200 is the first count over 1000.
    pulled, sent, seen = _call([b"x" * 300] * 10)
    assert len(pulled) == 4 and seen == []
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    detail = json.loads(sent[1]["body"])["detail"]
    assert "over the 1000 byte limit" in detail and "1200 bytes received so far" in detail


def test_body_at_the_limit_reaches_the_app_whole():
    chunks = [b"a" * 300, b"b" * 300, b"c" * 300, b"d" * 100]  # exactly 1000 bytes
    pulled, sent, seen = _call(chunks)
    assert len(pulled) == 4 and seen == [b"".join(chunks)] and sent[0]["status"] == 200


def test_content_length_over_the_limit_is_refused_before_reading():
    pulled, sent, seen = _call([b"x" * 1001], headers=[(b"content-length", b"1001")])
    assert pulled == [] and seen == [] and sent[0]["status"] == 413
    assert "Content-Length 1001" in json.loads(sent[1]["body"])["detail"]
    pulled, sent, seen = _call([b"x" * 1000], headers=[(b"content-length", b"1000")])
    assert len(pulled) == 1 and seen == [b"x" * 1000] and sent[0]["status"] == 200


def test_other_scopes_pass_through():
    calls: list[str] = []

    async def app(scope, receive, send):
        calls.append(scope["type"])

    async def never(*_):
        raise AssertionError("the middleware must not touch a lifespan scope's channel")

    asyncio.run(BodyLimit(app, max_bytes=LIMIT)({"type": "lifespan"}, never, never))
    assert calls == ["lifespan"]
