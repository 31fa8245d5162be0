"""A total deadline for receiving a request, and a size limit on its headers, at the connection.

uvicorn bounds neither. Its keep-alive timeout (``timeout_keep_alive``) closes a connection that
is idle *after* a response; a new connection that sends nothing, or that sends its request line
and headers a byte at a time, is never timed out, and the httptools parser buffers a header of
any size. The application cannot help: it is called only once the headers are complete. So each
``ca serve`` worker speaks HTTP through :class:`BoundedHttpToolsProtocol`, uvicorn's httptools
protocol with two additions:

* **Read deadline.** Each request must arrive whole, headers and body, within
  ``ca serve --read-timeout`` seconds (:data:`DEFAULT_READ_TIMEOUT`), counted from the moment the
  connection opened (for its first request) or the request's first byte came (for the next ones
  on a kept-alive connection). While the headers are incomplete the protocol enforces it: a
  client that has sent part of a request gets ``408`` (problem JSON) and the connection is
  closed; one that sent nothing is closed silently. Once the headers are complete the deadline
  travels with the request (the scope's ``extensions``, :data:`DEADLINE_EXTENSION`) to
  :class:`certpulse.frontends.limits.BodyLimit`, which reads the body against it and answers
  ``408`` itself.
* **Header size.** More than :data:`MAX_HEAD_BYTES` before the headers are complete is answered
  ``431`` and the connection closed (the same 16 KiB as uvicorn's ``h11`` parser allows).

Both refusals are anonymous: they are reported to :data:`refusal_listener` (set by the worker's
application to count and audit them) off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from certpulse.errors import Reason
from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.problems import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE, status_for

READ_TIMEOUT_ENV = "CERTPULSE_READ_TIMEOUT"
# Long enough for an agent on a slow, lossy link to send a CSR (a few KiB), short enough that a
# client trickling a request holds a connection for half a minute at most.
DEFAULT_READ_TIMEOUT = 30
MAX_READ_TIMEOUT = 3600
MAX_HEAD_BYTES = 16 * 1024
DEADLINE_EXTENSION = "certpulse.read_deadline"  # scope["extensions"][...]: the loop time the body is due
PROTOCOL = "certpulse.frontends.read_deadline:BoundedHttpToolsProtocol"  # for uvicorn's ``http``

# Told of each refusal the protocol answers (reason, detail); called in a thread of the loop's
# default executor, as it may write to the database. Set by the worker's application.
refusal_listener: Callable[[Reason, str], None] | None = None

_STATUS_TEXT = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def read_timeout_from_environment() -> int:
    """``CERTPULSE_READ_TIMEOUT`` (set by ``ca serve --read-timeout``), else the default."""
    return whole_number_setting(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT, low=1, high=MAX_READ_TIMEOUT,
                                requirement=f"a whole number of seconds from 1 to {MAX_READ_TIMEOUT}")


def raw_problem(reason: Reason, detail: str) -> bytes:
    """A whole HTTP/1.1 response carrying a problem document, that closes the connection."""
    status = status_for(reason)
    body = json.dumps({"type": PROBLEM_TYPE + reason.value, "title": reason.value.replace("-", " ").capitalize(),
                       "status": status, "detail": detail, "reason": reason.value}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _STATUS_TEXT[status], PROBLEM_MEDIA_TYPE.encode(), len(body)) + body)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read deadline and a header size limit (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout_from_environment()
        self._read_timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time by which the request being read must be whole
        self._head_bytes = 0  # bytes received since the request began, while its headers are incomplete

    def _reading_head(self) -> bool:
        """No request is past its headers (none yet, or the last one was answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._due = self.loop.time() + self.read_timeout
        self._read_timer = self.loop.call_at(self._due, self._read_expired)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        reading_head = self._reading_head()
        if reading_head:
            if self._read_timer is None:  # the first byte of the next request on a kept-alive connection
                self._arm()
            self._head_bytes += len(data)
        super().data_received(data)
        if (reading_head and self._reading_head() and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()):
            self._refuse(Reason.HEADERS_TOO_LARGE, f"request line and headers are limited to {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        # a pipelined request's head was read while another was answered: its deadline starts now
        due = self._due if self._read_timer is not None else self.loop.time() + self.read_timeout
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[DEADLINE_EXTENSION] = due
        self._disarm()  # the body is read against the deadline by the application (BodyLimit)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the next request's deadline starts at its first byte

    def shutdown(self) -> None:
        """The server stops: a connection between requests is aborted rather than closed. Over TLS
        a close waits for the client's close_notify (asyncio allows it 30 s), which an idle pooled
        client never sends, and the stop would wait with it; between requests nothing is lost."""
        if self.cycle is None or self.cycle.response_complete:
            self._disarm()
            self.transport.abort()
        else:
            super().shutdown()

    def _read_expired(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._reading_head():
            return
        if self._head_bytes == 0:  # nothing sent: close quietly, as after an idle keep-alive
            self.transport.close()
            return
        self._refuse(Reason.REQUEST_TIMEOUT, f"the request's headers did not arrive within {self.read_timeout} s")

    def _refuse(self, reason: Reason, detail: str) -> None:
        self._disarm()
        self.transport.write(raw_problem(reason, detail))
        self.transport.close()
        listener = refusal_listener
        if listener is not None:
            self.loop.run_in_executor(None, listener, reason, detail)


__all__ = ["DEADLINE_EXTENSION", "DEFAULT_READ_TIMEOUT", "MAX_HEAD_BYTES", "PROTOCOL", "READ_TIMEOUT_ENV",
           "BoundedHttpToolsProtocol", "raw_problem", "read_timeout_from_environment", "refusal_listener"]
