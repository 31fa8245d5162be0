"""The OCSP responder over HTTP (RFC 6960 appendix A, RFC 5019): ``POST /ocsp`` with the DER
request as body (``Content-Type: application/ocsp-request``), or ``GET /ocsp/{base64 DER}``,
URL-encoded (nginx escapes ``+ / =``; a ``/`` left in, a ``+`` turned into a space, the URL-safe
alphabet and missing padding are all taken). Every answer is an ``application/ocsp-response``.

**Status codes.** The body always says what happened, as an OCSPResponse; the HTTP status
follows it so that logs, load balancers and retries see the same:

* ``successful`` (good, revoked or unknown) and ``unauthorized`` (a certificate of an issuer
  we are not): 200, as RFC 5019 has it: the responder worked, the answer is in the body;
* ``malformedRequest``: 400 (413 for a body over :data:`MAX_REQUEST_BYTES`, 415 for a POST that
  is not ``application/ocsp-request``); a body over the server's own request limit
  (``max_request_bytes``, 64 KiB by default) is refused before it gets here, 413 problem JSON;
* ``tryLater`` (the database does not answer): 503 with ``Retry-After``;
* ``internalError`` (a bug, logged): 500. Never for anything a client sent.
* A method other than GET and POST: 405 problem JSON (``Allow: GET, POST``).

**Caching.** A successful answer to a request without nonce is the same for every client until
the responder refreshes it (``ca/ocsp.py``); answered to a GET it carries RFC 5019's headers so
that HTTP caches and CDNs may keep it: ``Cache-Control: max-age=<seconds to nextUpdate>, public,
no-transform, must-revalidate``, ``Last-Modified`` (thisUpdate), ``Expires`` (nextUpdate) and
``ETag`` (SHA-1 of the response); a GET whose ``If-None-Match`` names the current answer's ETag
gets ``304``. Answers with a nonce and refusals say ``no-store``.

**Speed.** A request seen before is answered on the event loop from the responder's cache:
plain ASGI, a dictionary look-up, no parsing, no database, no signature. A malformed request,
and a request with a nonce about a certificate whose status is cached, are answered on the event
loop too (parsing, and a signature of about a tenth of a millisecond: cheaper than the trip to a
thread and back). Anything else (a database read, a signer to load, the once-a-second read of
the revocation revisions) runs in a thread
under a limiter of the route's own (:data:`OCSP_THREADS`), so that enrollment's handlers, busy
or shed, never hold an OCSP answer up, and OCSP never takes their threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import logging
import time
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy.exc import OperationalError
from starlette.types import Receive, Scope, Send

from certpulse import clock
from certpulse.ca.ocsp import OCSPAnswer, failure
from certpulse.ca.publishing import OCSP_PATH
from certpulse.ca.service import CAService
from certpulse.display import printable
from certpulse.errors import Reason
from certpulse.frontends.conditional import if_none_match
from certpulse.frontends.metrics import ocsp_counter
from certpulse.frontends.problems import DATABASE_RETRY_AFTER, problem

log = logging.getLogger("certpulse.api")

REQUEST_MEDIA_TYPE = "application/ocsp-request"
RESPONSE_MEDIA_TYPE = b"application/ocsp-response"
MAX_REQUEST_BYTES = 16 * 1024  # an OCSP request for one certificate is about 100 bytes
OCSP_THREADS = 4  # blocking OCSP work (database, signature) at once per worker
REVISIONS_PREFETCH = 0.5  # seconds: read the revocation revisions again in the background after this
REVISIONS_STALE = 1.0  # seconds: past this, a request waits for the read (the bound on a revocation's delay)
REVISIONS_RETRY = 5.0  # seconds: after a failed read, answer from the cache this long before waiting again

STATUS_CODES = {"successful": 200, "unauthorized": 200, "malformedRequest": 400, "internalError": 500,
                "tryLater": 503}
_PREFIX = OCSP_PATH + "/"
_NO_STORE = (b"cache-control", b"no-store")
_CONTENT_TYPE = (b"content-type", RESPONSE_MEDIA_TYPE)


class OCSPRoute:
    """``/ocsp`` and ``/ocsp/...``: a :class:`~certpulse.frontends.publication.PublicRoute`."""

    def __init__(self, service: CAService, *, threads: int = OCSP_THREADS) -> None:
        self._responder = service.ocsp
        self._threads = threads
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop, at first use
        self._poll: asyncio.Future[None] | None = None
        self._poll_failed_at = float("-inf")
        self._counters: dict[tuple[str, str], Any] = {}  # the metric's children, by (status, source)

    def matches(self, method: str, path: str) -> bool:
        return path == OCSP_PATH or path.startswith(_PREFIX)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "GET":
            request = _from_path(scope["path"])
            if request is None:
                await _send(send, failure("malformedRequest"), 400)
                return
        elif method == "POST":
            request, code = await _body(scope, receive)
            if request is None:
                await _send(send, failure("malformedRequest"), code)
                return
        else:
            response = problem(Reason.NOT_FOUND, f"{printable(method)[:16]} is not allowed here; "
                               "use GET or POST", status=405)
            response.headers["Allow"] = "GET, POST"
            await response(scope, receive, send)
            return
        await self._revisions_current()
        source = "cache"
        answer = self._responder.cached(request)
        if answer is None:
            source = "memory"
            answer = self._from_memory(request)
        if answer is None:
            source = "database"
            answer = await self._blocking(request)
        self._count(answer, source)
        get = method == "GET"
        if get and answer.cacheable and _etag(answer) in (if_none_match(scope) or ()):
            await _send_not_modified(send, answer)
            return
        await _send(send, answer, STATUS_CODES[answer.status], get=get)

    def _count(self, answer: OCSPAnswer, source: str) -> None:
        key = (answer.cert_status or answer.status, source)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = ocsp_counter(*key)
        counter.inc()

    def _from_memory(self, request: bytes) -> OCSPAnswer | None:
        """A malformed request's answer, or one signed now from the cached status (no I/O)."""
        try:
            return self._responder.answer_from_memory(request, clock.now())
        except Exception:
            log.exception("OCSP: unexpected error answering a request")
            return failure("internalError")

    async def _blocking(self, request: bytes) -> OCSPAnswer:
        """The full answer (database, signature), in a thread under the route's own limiter."""
        try:
            return await anyio.to_thread.run_sync(self._responder.respond, request, clock.now(),
                                                  limiter=self._limiter_now())
        except OperationalError as exc:
            log.error("OCSP: database unavailable: %s", printable(str(exc.orig)))
            return failure("tryLater")
        except Exception:
            log.exception("OCSP: unexpected error answering a request")
            return failure("internalError")

    def _limiter_now(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._threads)
        return self._limiter

    async def _revisions_current(self) -> None:
        """See that the cached answers rest on revocation revisions read within about a second:
        read them again in the background after :data:`REVISIONS_PREFETCH` (a busy worker never
        waits), and wait for the read once they are older than :data:`REVISIONS_STALE` (a worker
        that was idle). After a failed read, cached answers are served for
        :data:`REVISIONS_RETRY` seconds without waiting (a revocation needs the same database)."""
        age = self._responder.revisions_age()
        if age < REVISIONS_PREFETCH:
            return
        poll = self._poll
        if poll is None:
            poll = self._poll = asyncio.ensure_future(self._read_revisions())
        if age >= REVISIONS_STALE and time.monotonic() - self._poll_failed_at >= REVISIONS_RETRY:
            await asyncio.shield(poll)

    async def _read_revisions(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._responder.read_revisions, limiter=self._limiter_now())
        except Exception as exc:
            self._poll_failed_at = time.monotonic()
            log.warning("OCSP: cannot read the revocation revisions: %s", printable(str(exc)))
        finally:
            self._poll = None


def _from_path(path: str) -> bytes | None:
    """The DER request of an RFC 5019 GET (``/ocsp/{base64}``), or None when there is none."""
    text = path[len(_PREFIX):] if path.startswith(_PREFIX) else ""
    if not text or len(text) > MAX_REQUEST_BYTES * 4 // 3 + 4:
        return None
    # '+' that a client form-encoded arrives as a space; the URL-safe alphabet is taken too
    text = text.replace(" ", "+").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


async def _body(scope: Scope, receive: Receive) -> tuple[bytes | None, int]:
    """The POST body, or None and the status of the refusal (413 too large, 415 wrong type)."""
    media = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return None, 400
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            return None, 413
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if media != REQUEST_MEDIA_TYPE.encode():
        return None, 415
    return b"".join(chunks), 200


async def _send(send: Send, answer: OCSPAnswer, status: int, *, get: bool = False) -> None:
    headers = _headers(answer, status, get)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.der})


def _headers(answer: OCSPAnswer, status: int, get: bool) -> list[tuple[bytes, bytes]]:
    """The answer's headers, made once per answer (the caching headers of a GET but max-age)."""
    memo = answer.memo
    if not answer.cacheable:
        headers = memo.get("plain")
        if headers is None:
            headers = memo["plain"] = [_CONTENT_TYPE, (b"content-length", str(len(answer.der)).encode()), _NO_STORE]
        if status == 503:
            headers = [*headers, (b"retry-after", str(DATABASE_RETRY_AFTER).encode())]
        return headers
    if not get:
        headers = memo.get("post")
        if headers is None:
            headers = memo["post"] = [_CONTENT_TYPE, (b"content-length", str(len(answer.der)).encode())]
        return headers
    cached = memo.get("get")
    if cached is None:
        assert answer.this_update is not None and answer.next_update is not None
        expires_at = time.monotonic() + (answer.next_update - clock.now()).total_seconds()
        static = [_CONTENT_TYPE, (b"content-length", str(len(answer.der)).encode()),
                  (b"last-modified", _http_date(answer.this_update)),
                  (b"expires", _http_date(answer.next_update)), (b"etag", _etag(answer))]
        cached = memo["get"] = (static, expires_at)
    static, expires_at = cached
    max_age = max(0, int(expires_at - time.monotonic()))
    return [*static, (b"cache-control", b"max-age=%d, public, no-transform, must-revalidate" % max_age)]


def _etag(answer: OCSPAnswer) -> bytes:
    """The answer's entity tag: the SHA-1 of its DER, quoted (made once per answer)."""
    etag: bytes | None = answer.memo.get("etag")
    if etag is None:
        etag = answer.memo["etag"] = b'"' + hashlib.sha1(answer.der, usedforsecurity=False).hexdigest().encode() + b'"'
    return etag


async def _send_not_modified(send: Send, answer: OCSPAnswer) -> None:
    """304: the cache that asked still holds this very answer (RFC 9110 15.4.5: its validators
    and caching headers, no body)."""
    headers = [h for h in _headers(answer, 200, True) if h[0] not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": 304, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _http_date(moment: dt.datetime) -> bytes:
    return email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True).encode()


__all__ = ["MAX_REQUEST_BYTES", "STATUS_CODES", "OCSPRoute"]
