"""The agent's HTTP client for the enrollment service. Every answer is hostile until checked.

Bodies are read up to a cap, must be JSON objects of the expected shape, and nothing from
them is ever used as a path or passed to a shell. Every call has a total deadline (``http_deadline``
in agent.toml): connecting, the TLS handshake, sending, the headers and the body together, so a
server that trickles its answer cannot hold the agent (and its store lock) for longer.
Failures are split in two: the server is unavailable (connection errors, 5xx, 429/503 with
``Retry-After``, the deadline: try another issuer or later) or it refused (a 4xx problem
with a reason: do not retry the same request).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any

import httpcore
import httpx

from certpulse import clock
from certpulse.agent.skew import parse_http_date

MAX_BODY = 4 * 1024 * 1024
MAX_RETRY_AFTER = 24 * 3600
DEFAULT_DEADLINE = 60.0  # seconds for one whole HTTP call
# Batch status answers: the most entries one answer may hold (the CA pages the caller's own
# certificates by 10,000), the most pages followed in one pulse, and what a serial looks like
MAX_STATUS_ENTRIES = 10_000
MAX_STATUS_PAGES = 100
_SERIAL = re.compile(r"[0-9a-f]{1,40}")
_CURSOR = re.compile(r"[0-9A-Za-z_-]{1,64}")
STATUSES = ("good", "revoked", "expired", "unknown")


class ServerUnavailable(Exception):
    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class ServerRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class RequestAnswer:
    status: str  # issued | pending | denied | failed
    request_id: int
    certificate: str | None = None
    chain: tuple[str, ...] = ()
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class StatusAnswer:
    """One certificate in a batch status answer (checked: a canonical serial, a known status)."""

    serial: str  # lower-case hex, as the CA and the store write it
    issuer: str | None
    status: str  # good | revoked | expired | unknown
    revocation_reason: str | None = None


def _status_page(data: Any, most: int) -> tuple[list[StatusAnswer], str | None]:
    """The entries and next-page cursor of a batch status answer, or ServerUnavailable when it
    has the wrong shape or more than ``most`` entries."""
    entries = data.get("certificates") if isinstance(data, dict) else None
    if not isinstance(entries, list) or len(entries) > most:
        raise ServerUnavailable("the batch status answer has the wrong shape")
    answers: list[StatusAnswer] = []
    for entry in entries:
        serial = entry.get("serial") if isinstance(entry, dict) else None
        issuer = entry.get("issuer") if isinstance(entry, dict) else None
        status = entry.get("status") if isinstance(entry, dict) else None
        reason = entry.get("revocation_reason") if isinstance(entry, dict) else None
        if (not isinstance(serial, str) or not _SERIAL.fullmatch(serial) or status not in STATUSES
                or not (issuer is None or (isinstance(issuer, str) and len(issuer) <= 64))
                or not (reason is None or isinstance(reason, str))):
            raise ServerUnavailable("an entry of the batch status answer has the wrong shape")
        answers.append(StatusAnswer(serial, issuer, str(status), _short(reason, 64) if reason else None))
    following = data.get("next")
    if following is not None and (not isinstance(following, str) or not _CURSOR.fullmatch(following)):
        raise ServerUnavailable("the batch status answer's cursor has the wrong shape")
    return answers, following


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    if value.strip().isdigit():
        return float(min(int(value.strip()), MAX_RETRY_AFTER))
    return None


def _clock_hint(exc: Exception) -> str:
    """What to do when the handshake failed on dates: the server's certificate is judged by this
    machine's clock, so one that "is not yet valid" (or "has expired") may mean a wrong clock."""
    text = str(exc)
    if "certificate is not yet valid" in text or "certificate has expired" in text:
        return " (judged by this machine's clock: check the clock)"
    return ""


def _short(value: Any, limit: int = 300) -> str:
    return " ".join(str(value).split())[:limit]


class Deadline:
    """The end of the call in progress, on the monotonic clock (a bound on waiting, not a date)."""

    def __init__(self) -> None:
        self.until: float | None = None

    def remaining(self) -> float:
        return math.inf if self.until is None else self.until - time.monotonic()

    def cap(self, timeout: float | None, error: type[Exception]) -> float:
        """The time one network operation may take: its own timeout, cut to what is left."""
        left = self.remaining()
        if left <= 0:
            raise error("the call's total deadline has passed")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation (TLS handshake included) ends by the call's deadline.
    Each operation is bounded by the socket timeout it is given (CPython bounds a whole TLS
    handshake, ``sendall`` and each ``recv`` by it), so the sum is bounded by the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self.inner = inner
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadline.cap(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.cap(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        upgraded = self.inner.start_tls(ssl_context, server_hostname,
                                        self.deadline.cap(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(upgraded, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    """httpcore's own socket backend, with every connection held to the call's deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, self.deadline.cap(timeout, httpcore.ConnectTimeout),
                                     local_address, socket_options)
        return _DeadlineStream(stream, self.deadline)


def _network_transport(verify: Any, deadline: Deadline) -> httpx.HTTPTransport:
    """httpx's transport over a connection pool whose sockets keep the deadline. httpx takes no
    network backend itself, so its pool is replaced by an httpcore pool built with one."""
    transport = httpx.HTTPTransport(verify=verify)
    context = verify if isinstance(verify, ssl.SSLContext) else None
    transport._pool = httpcore.ConnectionPool(  # httpx takes no network backend of its own
        ssl_context=context, network_backend=_DeadlineBackend(deadline))
    return transport


class CAClient:
    """One policy server. ``verify`` is the SSL context of the pinned roots (or False for the one
    unverified fetch of the roots at ``agent init``). ``transport`` is httpx's seam: None for the
    network, or a transport of the caller's (an ``httpx.MockTransport`` in tests that play a
    hostile CA in-process). ``deadline``: seconds one whole call may take."""

    def __init__(self, url: str, credential: str | None, *, verify: ssl.SSLContext | bool, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None, deadline: float = DEFAULT_DEADLINE) -> None:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.url = url
        self.deadline_seconds = deadline
        self.deadline = Deadline()
        self.clock_offset: dt.timedelta | None = None  # from the last answer that had a Date header
        if transport is None:
            if verify is False and not url.startswith("http://"):
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                verify = context
            transport = _network_transport(verify, self.deadline)
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout,
                                 follow_redirects=False, transport=transport, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def _measure(self, response: httpx.Response) -> None:
        """The CA's clock against this machine's, from the answer's ``Date`` header (ignored when
        missing or malformed): :attr:`clock_offset`, positive when this machine is behind."""
        date = parse_http_date(response.headers.get("date"))
        if date is not None:
            self.clock_offset = date - clock.now()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.deadline.until = time.monotonic() + self.deadline_seconds
        late = ServerUnavailable(f"{self.url}: no whole answer to {method} {path} "
                                 f"within {self.deadline_seconds:g} s")
        try:
            with self.http.stream(method, path, **kwargs) as response:
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise ServerUnavailable(f"answer to {method} {path} is larger than {MAX_BODY} bytes")
                    if self.deadline.remaining() <= 0:
                        raise late
        except httpx.HTTPError as exc:
            if self.deadline.remaining() <= 0:
                raise late from None
            raise ServerUnavailable(f"{self.url}: {type(exc).__name__}: {_short(exc)}{_clock_hint(exc)}") from None
        finally:
            self.deadline.until = None
        self._measure(response)
        if response.status_code in (429, 503) or response.status_code >= 500:
            raise ServerUnavailable(f"{self.url} answered {response.status_code}", _retry_after(response))
        try:
            data = json.loads(body)
        except ValueError:
            raise ServerUnavailable(f"{self.url} answered {response.status_code} with a non-JSON body") from None
        if response.status_code >= 400:
            reason = data.get("reason") if isinstance(data, dict) else None
            detail = data.get("detail") if isinstance(data, dict) else None
            raise ServerRefused(response.status_code, _short(reason or "refused", 64), _short(detail or ""))
        return data

    @staticmethod
    def served_roots(url: str, *, verify: ssl.SSLContext | bool, deadline: float = DEFAULT_DEADLINE,
                     transport: httpx.BaseTransport | None = None) -> list[str]:
        """The root certificates (PEM) the server says it has: unauthenticated, and never trusted
        as such. ``agent init`` keeps only the one whose fingerprint it was given."""
        client = CAClient(url, None, verify=verify, transport=transport, deadline=deadline)
        try:
            data = client._call("GET", "/v1/roots")
        finally:
            client.close()
        roots = data.get("roots") if isinstance(data, dict) else None
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots) or len(roots) > 64:
            raise ServerUnavailable("the roots answer has the wrong shape")
        return roots

    @staticmethod
    def exchange_token(url: str, token: str, *, verify: ssl.SSLContext | bool, deadline: float = DEFAULT_DEADLINE,
                       transport: httpx.BaseTransport | None = None) -> dict[str, str]:
        client = CAClient(url, None, verify=verify, transport=transport, deadline=deadline)
        try:
            data = client._call("POST", "/v1/tokens/exchange", json={"token": token})
        finally:
            client.close()
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("principal", "credential")):
            raise ServerUnavailable("the token exchange answer has the wrong shape")
        return {"principal": data["principal"], "credential": data["credential"]}

    def policy(self) -> dict[str, Any]:
        data = self._call("GET", "/v1/policy")
        if not isinstance(data, dict):
            raise ServerUnavailable("the policy is not a JSON object")
        return data

    def submit(self, *, template: str, csr_pem: str, issuer: str, idempotency_key: str,
               renewal: tuple[str, bytes] | None = None, archived_key: dict[str, str] | None = None) -> RequestAnswer:
        """``renewal``: the old certificate (PEM) and its key's signature over the CSR;
        ``archived_key``: the new key sealed to the KRA, for templates that archive keys."""
        body: dict[str, Any] = {"template": template, "csr": csr_pem, "issuer": issuer}
        if renewal is not None:
            body["renewal"] = {"certificate": renewal[0], "signature": base64.b64encode(renewal[1]).decode()}
        if archived_key is not None:
            body["archived_key"] = archived_key
        data = self._call("POST", "/v1/requests", json=body, headers={"Idempotency-Key": idempotency_key})
        return self._answer(data)

    def request(self, request_id: int) -> RequestAnswer:
        return self._answer(self._call("GET", f"/v1/requests/{int(request_id)}"))

    def certificate_status(self, serial: str, issuer: str | None = None) -> str:
        params = {"issuer": issuer} if issuer else None
        data = self._call("GET", f"/v1/certificates/{serial}", params=params)
        status = data.get("status") if isinstance(data, dict) else None
        if status not in ("good", "revoked", "expired"):
            raise ServerUnavailable("the status answer has the wrong shape")
        return str(status)

    def own_statuses(self) -> list[StatusAnswer]:
        """The status of every unexpired certificate the CA issued to this principal, revoked ones
        included: one call, or one per 10,000 certificates. Raises ServerRefused as the CA
        answers (404 or 405 from a CA older than the route; see agent/revocation.py)."""
        answers: list[StatusAnswer] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_STATUS_PAGES):
            data = self._call("GET", "/v1/certificates/status", params={"after": cursor} if cursor else None)
            page, cursor = _status_page(data, MAX_STATUS_ENTRIES)
            answers.extend(page)
            if cursor is None:
                return answers
            if cursor in seen:  # a CA that sends the agent round in circles
                raise ServerUnavailable("the batch status answer's pages loop")
            seen.add(cursor)
        raise ServerUnavailable(f"the batch status answer has more than {MAX_STATUS_PAGES} pages")

    def statuses(self, queries: Sequence[tuple[str, str | None]]) -> list[StatusAnswer]:
        """The status of each (serial, issuer name) asked; at most the CA's limit per call (500).
        The body is compact JSON: 500 of the longest entries just fit the CA's 64 KiB limit."""
        body = {"certificates": [{"serial": serial, **({"issuer": issuer} if issuer else {})}
                                 for serial, issuer in queries]}
        data = self._call("POST", "/v1/certificates/status",
                          content=json.dumps(body, separators=(",", ":")).encode(),
                          headers={"Content-Type": "application/json"})
        # a serial at several issuers, asked without one, answers once per issuer: a bound, not equality
        return _status_page(data, min(MAX_STATUS_ENTRIES, 8 * max(len(queries), 1)))[0]

    @staticmethod
    def _answer(data: Any) -> RequestAnswer:
        if not isinstance(data, dict):
            raise ServerUnavailable("the request answer is not a JSON object")
        status = data.get("status")
        request_id = data.get("id")
        if status not in ("issued", "pending", "denied", "failed") or not isinstance(request_id, int):
            raise ServerUnavailable("the request answer has the wrong shape")
        certificate = data.get("certificate")
        chain = data.get("chain") or []
        if status == "issued" and (not isinstance(certificate, str) or not isinstance(chain, list)
                                   or not all(isinstance(c, str) for c in chain)):
            raise ServerUnavailable("an issued answer without a certificate")
        reason = data.get("reason")
        return RequestAnswer(status=status, request_id=request_id,
                             certificate=certificate if isinstance(certificate, str) else None,
                             chain=tuple(chain) if isinstance(chain, list) else (),
                             reason=_short(reason) if reason else None)

