"""``GET``/``HEAD /ca/{authority}.der``: an authority's certificate, where the AIA caIssuers URL of
every certificate it signed points (:mod:`certpulse.ca.publishing`).

Relying parties fetch it to build a chain a server did not send in full (Windows' CryptoAPI,
browsers, ``openssl`` with the fetched file as ``-untrusted``). DER, as RFC 5280 4.2.2.1 asks of
an HTTP caIssuers URI, ``application/pkix-cert`` (RFC 2585). A CA certificate does not change
under its name, so caches may keep it a day, and the strong ETag lets them revalidate cheaply.
Raw ASGI, outside load shedding (:mod:`certpulse.frontends.publication`); the answer comes from
the worker's snapshot (:class:`~certpulse.ca.ca_certificates.CACertificates`): no database read
while it is fresh, one in the thread pool when its generation is due for a check.
"""

from __future__ import annotations

import re
import time

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from certpulse.ca.ca_certificates import CACertificates, PublishedCertificate
from certpulse.ca.publishing import CA_CERT_PATH
from certpulse.errors import Reason
from certpulse.frontends.conditional import if_none_match
from certpulse.frontends.problems import database_unavailable, problem

MEDIA_TYPE = b"application/pkix-cert"
MAX_AGE = 86_400  # a day: the certificate under a name does not change; a new issuer has a new name
CACHE_CONTROL = f"public, max-age={MAX_AGE}".encode()
ALLOWED = ("GET", "HEAD")
_FILE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})\.der\Z")


class CACertificateRoute:
    """The AIA caIssuers route of :func:`~certpulse.frontends.publication.public_routes`."""

    def __init__(self, certificates: CACertificates) -> None:
        self._certificates = certificates

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(CA_CERT_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ALLOWED:
            response = problem(Reason.NOT_FOUND, f"{CA_CERT_PATH}... answers GET and HEAD only", status=405)
            response.headers["Allow"] = ", ".join(ALLOWED)
            await response(scope, receive, send)
            return
        found = _FILE.match(scope["path"][len(CA_CERT_PATH):])
        if found is None:
            await problem(Reason.NOT_FOUND, f"not a CA certificate: {CA_CERT_PATH}NAME.der")(scope, receive, send)
            return
        name = found.group(1)
        now = time.monotonic()
        by_name = self._certificates.fresh(now)
        if by_name is None:
            try:
                by_name = await run_in_threadpool(self._certificates.refresh, now)
            except OperationalError:
                await database_unavailable("the database does not answer")(scope, receive, send)
                return
        certificate = by_name.get(name)
        if certificate is None:
            await problem(Reason.NOT_FOUND, f"no CA certificate named {name!r}")(scope, receive, send)
            return
        await _send(send, certificate, not_modified=_matches(scope, certificate.etag), head=method == "HEAD")


def _matches(scope: Scope, etag: str) -> bool:
    """Whether the request's ``If-None-Match`` names ``etag`` (or ``*``)."""
    tags = if_none_match(scope)
    return tags is not None and (etag.encode("latin-1") in tags or b"*" in tags)


async def _send(send: Send, certificate: PublishedCertificate, *, not_modified: bool, head: bool) -> None:
    headers = [(b"etag", certificate.etag.encode()), (b"cache-control", CACHE_CONTROL)]
    if not_modified:
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers += [(b"content-type", MEDIA_TYPE), (b"content-length", str(len(certificate.der)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else certificate.der})
