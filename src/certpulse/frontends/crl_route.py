"""``GET /crl/{authority}/{shard}.crl``: an authority's CRL, as relying parties fetch it.

DER, ``application/pkix-crl`` (RFC 5280 4.2.1.13, RFC 2585), with the caching headers HTTP caches
and CRL fetchers honour: ``ETag`` (the CRL number), ``Last-Modified`` (thisUpdate),
``Cache-Control: public, max-age=...`` and ``Expires`` up to the moment the CRL is made again
(thisUpdate + crl_period, at the latest nextUpdate), and 304 for a conditional request that
already holds it. Shard 0 is the full CRL, the only one today (see :mod:`certpulse.ca.publishing`).

Each worker keeps the CRLs it served in memory and asks the database whether they are still
current at most once a second per authority (one indexed read); reading or making a CRL runs
in a thread, never on the event loop. Unknown authority or shard: 404; another method than GET
or HEAD: 405; both as problem documents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import time
from email.utils import format_datetime, parsedate_to_datetime

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from certpulse import clock
from certpulse.ca.publishing import CRL_PATH, FULL_CRL_SHARD
from certpulse.ca.results import PublishedCRL
from certpulse.ca.service import CAService
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.frontends.conditional import if_none_match
from certpulse.frontends.problems import DATABASE_RETRY_AFTER, database_unavailable, problem

log = logging.getLogger("certpulse.api")

CRL_MEDIA_TYPE = "application/pkix-crl"
RECHECK_SECONDS = 1.0  # how stale a worker's idea of "this CRL is current" may be
_CRL_PATH = re.compile(re.escape(CRL_PATH) + r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})/(0|[1-9][0-9]{0,5})\.crl")
_ALLOWED = "GET, HEAD"


@dataclasses.dataclass
class _Held:
    published: PublishedCRL
    checked: float  # time.monotonic() of the last look at the database


class CRLRoute:
    """The CRL endpoint of :func:`certpulse.frontends.publication.public_routes`."""

    def __init__(self, service: CAService, recheck: float = RECHECK_SECONDS) -> None:
        self.service = service
        self.recheck = recheck
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(CRL_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._answer(scope)
        await response(scope, receive, send)

    async def _answer(self, scope: Scope) -> Response:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            refused = problem(Reason.NOT_FOUND, f"{printable(method)} is not allowed here; use GET or HEAD",
                              status=405)
            refused.headers["Allow"] = _ALLOWED
            return refused
        found = _CRL_PATH.fullmatch(scope["path"])
        if found is None or int(found[2]) != FULL_CRL_SHARD:
            return problem(Reason.NOT_FOUND, f"no CRL at {printable(scope['path'])}")
        try:
            published = await self._current(found[1])
        except Refusal as refusal:
            return problem(refusal.reason, refusal.detail)
        except OperationalError as exc:
            log.error("database unavailable: %s", printable(str(exc.orig)))
            return database_unavailable(f"the certificate database is unavailable; retry after "
                                        f"{DATABASE_RETRY_AFTER} s")
        except Exception:
            log.exception("unexpected error on GET %s", printable(scope["path"]))
            return problem(Reason.UNAVAILABLE, "internal error; the request had no effect", status=500)
        return _crl_response(published, scope, clock.now(), head=method == "HEAD")

    async def _current(self, authority: str) -> PublishedCRL:
        """The authority's CRL: from memory when this worker looked at the database less than
        :attr:`recheck` seconds ago and it is not due, else read (or made) in a thread; one
        look at a time per authority."""
        held = self._usable(authority)
        if held is not None:
            return held
        lock = self._locks.setdefault(authority, asyncio.Lock())
        async with lock:
            held = self._usable(authority)  # another request looked while this one waited
            if held is not None:
                return held
            published = await run_in_threadpool(self.service.crls.current, authority, clock.now())
            self._held[authority] = _Held(published, time.monotonic())
            return published

    def _usable(self, authority: str) -> PublishedCRL | None:
        held = self._held.get(authority)
        if held is None or time.monotonic() - held.checked >= self.recheck \
                or clock.now() >= held.published.refresh_at:
            return None
        return held.published


def _not_modified(published: PublishedCRL, scope: Scope) -> bool:
    """RFC 9110 13.1: If-None-Match decides when present; else If-Modified-Since."""
    tags = if_none_match(scope)
    if tags is not None:
        return b"*" in tags or published.etag.encode("latin-1") in tags
    since = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"if-modified-since"),
                 None)
    if since is None:
        return False
    try:
        when = parsedate_to_datetime(since)
    except (TypeError, ValueError, IndexError):
        return False  # an unreadable date is ignored (RFC 9110 13.1.3)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return published.this_update <= when


def _crl_response(published: PublishedCRL, scope: Scope, now: dt.datetime, *, head: bool) -> Response:
    max_age = max(int((published.refresh_at - now).total_seconds()), 0)
    caching = {
        "ETag": published.etag,
        "Last-Modified": format_datetime(published.this_update, usegmt=True),
        "Cache-Control": f"public, max-age={max_age}, no-transform",
        "Expires": format_datetime(published.refresh_at.astimezone(dt.UTC), usegmt=True),
    }
    if _not_modified(published, scope):
        return Response(status_code=304, headers=caching)
    response = Response(b"" if head else published.der, media_type=CRL_MEDIA_TYPE, headers=caching)
    if head:
        response.headers["Content-Length"] = str(len(published.der))
    return response
