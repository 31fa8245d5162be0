"""An ASGI guard that refuses request bodies over a size limit with 413, declared or streamed.

The body is read here, up to the limit, before the application sees it; a chunked body that
grows past the limit is refused without reading the rest, and the application then gets the
buffered body replayed. Nothing downstream ever holds more than ``max_bytes`` of a request.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certpulse.errors import Reason
from certpulse.frontends.problems import problem


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, on_refusal: Callable[[Scope], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await self._refuse(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_refusal(scope)
        response = problem(Reason.BODY_TOO_LARGE, f"request bodies are limited to {self.max_bytes} bytes")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
