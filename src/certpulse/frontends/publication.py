"""The routes relying parties use: CRLs, the OCSP responder, the CA certificates (AIA).

They need no credential, and they must answer while enrollment is being shed: a TLS peer that
cannot fetch a CRL or an OCSP answer fails closed or, worse, learns to ignore revocation. So
they sit outside the load-shedding limit (inside the body limit and read deadline), are plain
ASGI (no FastAPI per-request work on a path that serves thousands of answers a second), and can
be served alone by ``ca serve --role status``
(:func:`certpulse.frontends.status_role.status_app`).

The URL scheme is :mod:`certpulse.ca.publishing`'s. Each route is a :class:`PublicRoute`; the
routes of this process are :func:`public_routes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from certpulse.ca.service import CAService
from certpulse.errors import Reason
from certpulse.frontends.problems import problem


class PublicRoute(Protocol):
    def matches(self, method: str, path: str) -> bool:
        """Whether this route answers ``method path`` (it refuses a wrong method itself)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class PublicationRoutes:
    """``routes`` first; anything else goes on to ``app`` (None: 404)."""

    def __init__(self, app: ASGIApp | None, routes: Sequence[PublicRoute]) -> None:
        self.app = app
        self._routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self._routes:
                if route.matches(scope["method"], scope["path"]):
                    await route(scope, receive, send)
                    return
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            await problem(Reason.NOT_FOUND, "not found")(scope, receive, send)


def public_routes(service: CAService) -> list[PublicRoute]:
    """The publishing routes of this process: CRL, OCSP, CA certificates."""
    from certpulse.frontends.ocsp_route import OCSPRoute

    routes: list[PublicRoute] = []
    routes.append(OCSPRoute(service))
    return routes
