"""What an ACME route sends: a status, headers and a body, as plain ASGI messages.

Every ACME answer, refusals included, carries a fresh ``Replay-Nonce`` (RFC 8555 section 6.5),
``Cache-Control: no-store`` (section 7.1: a nonce must never be served twice from a cache) and
``Link: <directory>;rel="index"`` (section 7.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.types import Send

from certpulse.frontends.acme.errors import PROBLEM_MEDIA_TYPE, encode

JSON_MEDIA_TYPE = "application/json"
Headers = list[tuple[bytes, bytes]]


@dataclasses.dataclass(slots=True)
class Answer:
    status: int
    body: bytes = b""
    media_type: str | None = None
    headers: Headers = dataclasses.field(default_factory=list)
    outcome: str = "ok"  # for the metrics: ok, or the ACME error name

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Answer:
        return cls(status, encode(document), JSON_MEDIA_TYPE)

    @classmethod
    def problem(cls, status: int, document: dict[str, Any]) -> Answer:
        name = str(document.get("type", "")).rsplit(":", 1)[-1]
        return cls(status, encode(document), PROBLEM_MEDIA_TYPE, outcome=name or "error")

    def header(self, name: str, value: str) -> Answer:
        self.headers.append((name.encode("latin-1"), value.encode("latin-1", "replace")))
        return self

    def link(self, url: str, rel: str) -> Answer:
        return self.header("link", f'<{url}>;rel="{rel}"')

    async def send(self, send: Send, *, head: bool = False) -> None:
        headers: Headers = list(self.headers)
        if self.status != 204:  # a 204 has no content, nor a length (RFC 9110 section 8.6)
            headers.append((b"content-length", str(len(self.body)).encode()))
        if self.media_type is not None:
            headers.append((b"content-type", self.media_type.encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


__all__ = ["JSON_MEDIA_TYPE", "Answer"]
