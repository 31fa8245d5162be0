"""A real HTTP proxy on a loopback port that forwards to a CA and can lie on its way back.

Tests point an agent at the proxy instead of the CA. By default every request is passed through
unchanged; a test then turns on one kind of misbehaviour:

* ``rewrite_issued``: called with the JSON body the agent sent to ``POST /v1/requests`` and the
  CA's JSON answer; what it returns is sent to the agent instead (e.g. another certificate);
* ``rewrite_policy``: called with the CA's policy document; what it returns is sent instead;
* ``busy_retry_after``: every request is answered ``503 Service Unavailable`` with this
  ``Retry-After``, without asking the CA.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

Rewrite = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer",
              "upgrade", "proxy-authorization", "proxy-authenticate", "content-encoding"}


class HostileProxy:
    def __init__(self, upstream: str, verify: Any = True) -> None:
        self.upstream = upstream.rstrip("/")
        self.rewrite_issued: Rewrite | None = None
        self.rewrite_policy: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.busy_retry_after: int | None = None
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.rewritten = 0
        self.lock = threading.Lock()
        self.http = httpx.Client(base_url=self.upstream, timeout=30, verify=verify)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.seen.append((self.command, self.path))
                    busy = proxy.busy_retry_after
                    rewrite = proxy.rewrite_issued
                    rewrite_policy = proxy.rewrite_policy
                if busy is not None:
                    self._reply(503, {"content-type": "application/problem+json", "retry-after": str(busy)},
                                json.dumps({"type": "about:blank", "status": 503, "reason": "unavailable",
                                            "detail": "busy"}).encode())
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    answer = proxy.http.request(self.command, self.path, content=body, headers=headers)
                except httpx.HTTPError:
                    self._reply(502, {"content-type": "text/plain"}, b"upstream unreachable")
                    return
                content = answer.content
                if (rewrite is not None and self.command == "POST" and self.path.split("?")[0] == "/v1/requests"
                        and answer.status_code in (200, 201)):
                    changed = rewrite(json.loads(body), answer.json())
                    content = json.dumps(changed).encode()
                    with proxy.lock:
                        proxy.rewritten += 1
                if (rewrite_policy is not None and self.command == "GET" and self.path.split("?")[0] == "/v1/policy"
                        and answer.status_code == 200):
                    content = json.dumps(rewrite_policy(answer.json())).encode()
                    with proxy.lock:
                        proxy.rewritten += 1
                out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                self._reply(answer.status_code, out, content)

            def _reply(self, status: int, headers: dict[str, str], content: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle
            do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)

    def requests_to(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.seen if m == method and p.split("?")[0] == path)

    @classmethod
    @contextlib.contextmanager
    def running(cls, upstream: str, verify: Any = True) -> Iterator[HostileProxy]:
        proxy = cls(upstream, verify)
        proxy.thread.start()
        try:
            yield proxy
        finally:
            proxy.server.shutdown()
            proxy.server.server_close()
            proxy.thread.join(timeout=10)
            proxy.http.close()
