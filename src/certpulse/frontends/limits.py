"""An ASGI guard that reads each request body whole, within a size limit and a deadline.

The body is read here, up to the limit, before the application sees it; a chunked body that
grows past the limit is refused with 413 without reading the rest, and the application then gets
the buffered body replayed. Nothing downstream ever holds more than ``max_bytes`` of a request.
A GET or HEAD with neither ``Content-Length`` nor ``Transfer-Encoding`` has no body (RFC 9112
6.3) and goes straight on: nothing to read or time, which halves this guard's cost on the GET
routes that serve thousands of answers a second (OCSP, CRLs).

The body must also be whole by the request's read deadline (:mod:`certpulse.frontends.read_deadline`:
set by the server's protocol from when the request began, or ``read_timeout`` seconds from now
when the server set none), else 408 and the connection is closed. This guard sits outside the
load-shedding limit (:mod:`certpulse.frontends.shedding`), so a request counts against a worker's
``--max-inflight`` only once its body is here: a client trickling its body holds a connection
for at most the read timeout, never a place among the requests in progress.

Refusals are reported to ``on_refusal`` before the answer is sent, in a thread of the event
loop's default executor (it audits: a database write, which must neither block the loop nor
wait for a handler thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certpulse.errors import Reason, Refusal
from certpulse.frontends.problems import problem
from certpulse.frontends.read_deadline import DEADLINE_EXTENSION, DEFAULT_READ_TIMEOUT

_BODILESS = frozenset({"GET", "HEAD"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, on_refusal: Callable[[Scope, Refusal], None], *,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 refusals: Callable[[Scope, Refusal], ASGIApp | None] | None = None) -> None:
        self.app = app
        # another protocol's answer on its own paths (ACME's problem documents); None: the API's
        self.refusals = refusals
        self.max_bytes = max_bytes
        self.on_refusal = on_refusal
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bodiless = scope["method"] in _BODILESS
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                bodiless = False
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await self._refuse(scope, receive, send, Refusal(
                        Reason.BODY_TOO_LARGE, f"request bodies are limited to {self.max_bytes} bytes"))
                    return
            elif name == b"transfer-encoding":
                bodiless = False
        if bodiless:  # a GET or HEAD with neither length nor chunks has no body (RFC 9112 6.3): nothing to wait for
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        due = scope.get("extensions", {}).get(DEADLINE_EXTENSION) or loop.time() + self.read_timeout
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout_at(due):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # client went away
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > self.max_bytes:
                        await self._refuse(scope, receive, send, Refusal(
                            Reason.BODY_TOO_LARGE, f"request bodies are limited to {self.max_bytes} bytes"))
                        return
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(scope, receive, send, Refusal(
                Reason.REQUEST_TIMEOUT, f"the request's body did not arrive within {self.read_timeout} s"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
        # audited before the answer, as every refusal is; in the loop's default executor, neither
        # blocking the loop nor queueing behind (or taking) a handler thread
        await asyncio.get_running_loop().run_in_executor(None, self.on_refusal, scope, refusal)
        other = self.refusals(scope, refusal) if self.refusals is not None else None
        if other is not None:
            await other(scope, receive, send)
            return
        response = problem(refusal.reason, refusal.detail)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
