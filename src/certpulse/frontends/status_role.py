"""``ca serve --role status``: the publishing routes alone (CRLs, OCSP, CA certificates), with the
probes and ``/metrics``, and nothing else.

What relying parties fetch needs no credential and must stay up whatever enrollment does, so an
operator may run it as processes of its own (other machines, other limits, plain HTTP as
relying parties fetch it): enrollment's load, shedding or restarts then never touch it. The
enrollment API is not there (404), nor ``/openapi.json``.

The probes mean what they mean on the full server (``frontends/health.py``): ``/livez`` the
process answers, ``/readyz`` the database answers too; ``/healthz`` is always ``ok`` here, since
these routes are never shed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from certpulse import clock
from certpulse.ca.model import ANONYMOUS
from certpulse.ca.service import CAService
from certpulse.errors import Reason, Refusal
from certpulse.frontends.health import DatabaseProbe, liveness, readiness, worker_health
from certpulse.frontends.limits import BodyLimit
from certpulse.frontends.metrics import render
from certpulse.frontends.problems import problem
from certpulse.frontends.publication import PublicationRoutes, public_routes
from certpulse.frontends.read_deadline import DEFAULT_READ_TIMEOUT


def status_app(service: CAService, *, max_body: int = 64 * 1024, read_timeout: int = DEFAULT_READ_TIMEOUT) -> ASGIApp:
    """The publishing routes, then the probes and ``/metrics``; anything else 404 problem JSON."""
    from certpulse.frontends.http import _audit_flushing, _logged  # as the full server does

    probe = DatabaseProbe(service.database_answers)

    async def livez(request: Request) -> Response:
        return JSONResponse(liveness())

    async def healthz(request: Request) -> Response:
        _, document = worker_health(None, time.monotonic())
        return JSONResponse(document)

    async def readyz(request: Request) -> Response:
        healthy, document = worker_health(None, time.monotonic())
        code, document, retry_after = readiness(healthy, document, await probe.answers())
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(document, status_code=code, headers=headers)

    def metrics(request: Request) -> Response:  # a plain def: Starlette runs it in a thread
        return render(service, request.headers.get("accept"))

    async def refused(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        return problem(Reason.NOT_FOUND, "not found: this server answers CRL, OCSP and CA certificate requests only",
                       status=code)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with _audit_flushing(service):
            yield

    probes = Starlette(routes=[Route("/livez", livez), Route("/healthz", healthz), Route("/readyz", readyz),
                               Route("/metrics", metrics)],
                       exception_handlers={404: refused, 405: refused}, lifespan=lifespan)
    probes.state.service = service

    def on_body_refused(scope: MutableMapping[str, Any], refusal: Refusal) -> None:
        service.audit.refusal(ANONYMOUS.actor, "refused",
                              Refusal(refusal.reason, f"{scope.get('method')} {scope.get('path')}"), clock.now())

    return BodyLimit(PublicationRoutes(probes, public_routes(service)), max_body, _logged(on_body_refused),
                     read_timeout=read_timeout)


__all__ = ["status_app"]
