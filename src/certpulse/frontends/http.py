"""The enrollment service's REST API (FastAPI). Translates between HTTP and the CA core.

Handlers are plain ``def`` functions: the core does blocking database and signing work, so
they run in the server's thread pool. Every refusal leaves as RFC 7807 problem JSON.

The core answers with typed results (:mod:`certpulse.ca.results`); :func:`answer` gives each
its status code and JSON document, in one place, so every route answers as the API documents.

``POST /v1/requests`` is the hot path (hundreds of issuances a second), and FastAPI's work per
request (dependency resolution in the thread pool, then the handler in it again, response-model
validation) cost about as much CPU as the issuance itself. :class:`SubmitRoute` answers a
well-formed submission directly: the same body model (pydantic, from JSON in one step), one trip
to the thread pool for authentication and the submission, the same answers. Anything else on
that path goes on to the FastAPI route, which refuses it as it always did and documents the route.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal, assert_never

from cryptography import x509
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certpulse import __version__, clock
from certpulse.ca import results
from certpulse.ca.audit import AnonymousSample
from certpulse.ca.config import CADir, resolve_ca_dir
from certpulse.ca.model import ANONYMOUS, Caller, EnrollmentRequest, Evidence
from certpulse.ca.revocation import SerialQuery
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.frontends import documents, read_deadline
from certpulse.frontends.acme import ACMERoutes, add_acme_paths
from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.health import DatabaseProbe, liveness, readiness, worker_health
from certpulse.frontends.lifecycle import (
    CutAtStop,
    arm_stop_deadline,
    bind_to_supervisor,
    shutdown_timeout_from_environment,
    supervisor_from_environment,
)
from certpulse.frontends.limits import BodyLimit
from certpulse.frontends.metrics import (
    METRICS_RESPONSES,
    metrics_endpoint,
    observe_anonymous_refusal,
    observe_submission,
)
from certpulse.frontends.problems import DATABASE_RETRY_AFTER, database_unavailable, problem
from certpulse.frontends.publication import PublicationRoutes, public_routes
from certpulse.frontends.read_deadline import DEFAULT_READ_TIMEOUT, read_timeout_from_environment
from certpulse.frontends.schema import (
    Credential,
    DenyBody,
    EnrollmentBody,
    RequestResult,
    RevokeBody,
    SignedEvidence,
    StatusListResult,
    StatusQuery,
    TokenExchange,
    UnrevokeBody,
)
from certpulse.frontends.shedding import LoadShedding, max_inflight_from_environment, shed_load
from certpulse.frontends.threads import limit_threads, threads_from_environment
from certpulse.pki.certs import load_certificate

log = logging.getLogger("certpulse.api")

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/problem+json": {}}}
    for code, text in (
        (400, "The request was refused; `reason` names why"),
        (401, "No valid credential"),
        (403, "Not allowed for this caller"),
        (404, "Not found"),
        (409, "Conflicts with the current state"),
        (413, "Body over the size limit"),
    )
}


def _decode_bytes(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(Reason.MALFORMED_REQUEST, f"{what} is not valid base64") from None


def _evidence(item: SignedEvidence, what: str) -> Evidence:
    cert: x509.Certificate = load_certificate(item.certificate.encode("utf-8", "replace"))
    return Evidence(cert, _decode_bytes(item.signature, f"{what} signature"))


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer`` header (None without one)."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def current_caller(request: Request, authorization: Annotated[str | None, Header()] = None,
                   *, remembered: bool = False) -> Caller:
    """The authenticated caller from ``Authorization: Bearer`` (the core audits refusals)."""
    service: CAService = request.app.state.service
    return service.auth.authenticate(bearer_secret(authorization), clock.now(), remembered=remembered)


def submitting_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The caller of a submission, remembered per process: the submission's write transaction
    checks again that its credential and groups are current (RegistrationAuthority.submit)."""
    return current_caller(request, authorization, remembered=True)


CallerDep = Annotated[Caller, Depends(current_caller)]
SubmitterDep = Annotated[Caller, Depends(submitting_caller)]
IDEMPOTENCY_KEY = r"^[A-Za-z0-9_-]{1,64}$"
# How a submission ended, for the latency histograms (frontends/metrics.py)
SUBMISSION_OUTCOMES: dict[type[results.Submission], str] = {
    results.Issued: "issued", results.Pending: "pending", results.Replayed: "replayed"}


def submit_enrollment(service: CAService, body: EnrollmentBody, who: Caller, idempotency_key: str | None,
                      now: dt.datetime) -> Response:
    """A submission by an authenticated caller, answered (see :func:`answer`). Refusals raise (the
    caller's error handling answers them); the latency is observed either way."""
    started = time.perf_counter()
    outcome = "error"  # anything unexpected; replaced by what happened (for the latency histograms)
    try:
        try:
            req = EnrollmentRequest(
                template=body.template, csr=body.csr.encode("utf-8", "replace"), issuer=body.issuer,
                renewal=_evidence(body.renewal, "renewal") if body.renewal else None,
                ra_signatures=tuple(_evidence(e, "RA") for e in body.ra_signatures),
                archived_key=body.archived_key.model_dump() if body.archived_key else None,
                idempotency_key=idempotency_key,
            )
        except Refusal as refusal:
            who = service.auth.current(who, now)  # a remembered caller withdrawn since is refused as such
            service.audit.refusal(who.actor, "refused", refusal, now, template=body.template)
            raise
        result = service.requests.submit(who, req, now)
        outcome = SUBMISSION_OUTCOMES[type(result)]
        return answer(result)
    except Refusal:
        outcome = "refused"
        raise
    except OperationalError:
        outcome = "unavailable"
        raise
    finally:
        observe_submission(outcome, started)


def answer(result: results.Result) -> Response:
    """The status code and JSON document of each of the core's results: the API's contract.

    A new certificate is 201 and a request left for approval 202; a replayed submission shows
    the first request as it stands now, every field included, flagged ``replayed`` (still 202
    while it waits, 200 once decided). Reads leave out empty fields, as their response models
    document, except the status, revocation and audit documents, which always had every field.
    """
    match result:
        case results.Issued():
            return JSONResponse(documents.issued(result), status_code=201)
        case results.Pending():
            return JSONResponse(documents.pending(result), status_code=202)
        case results.Replayed(request=first):
            return JSONResponse({**documents.request(first), "replayed": True},
                                status_code=202 if first.status == "pending" else 200)
        case results.Approved(issued=issued):
            return JSONResponse(documents.issued(issued))
        case results.Denied():
            return JSONResponse(documents.denied(result))
        case results.RequestSummary():
            return JSONResponse(documents.without_none(documents.request(result)))
        case results.RequestList(requests=requests):
            return JSONResponse([documents.without_none(documents.request(r)) for r in requests])
        case results.Revoked():
            return JSONResponse(documents.revoked(result))
        case results.Unrevoked():
            return JSONResponse(documents.unrevoked(result))
        case results.CertificateStatus():
            return JSONResponse(documents.certificate_status(result))
        case results.StatusList():
            return JSONResponse(documents.status_list(result))
        case results.Credential():
            return JSONResponse(documents.credential(result))
        case results.AuditLog(entries=entries):
            return JSONResponse([documents.audit_entry(e) for e in entries])
        case results.PolicyDocument():
            return JSONResponse(documents.policy(result))
    assert_never(result)


def refusal_answer(exc: Refusal) -> Response:
    return problem(exc.reason, exc.detail, **exc.extra)


def store_unavailable(exc: OperationalError) -> Response:
    log.error("database unavailable: %s", printable(str(exc.orig)))
    return database_unavailable(f"the certificate database is unavailable; retry after {DATABASE_RETRY_AFTER} s")


def unexpected_error(method: str, path: str) -> Response:
    log.exception("unexpected error on %s %s", method, printable(path))  # the path is the client's
    return problem(Reason.UNAVAILABLE, "internal error; the request had no effect", status=500)


class SubmitRoute:
    """``POST /v1/requests`` without FastAPI's per-request machinery, for well-formed submissions.

    A JSON body that validates as :class:`EnrollmentBody`, with at most one ``Authorization`` and
    one valid ``Idempotency-Key``, is answered here exactly as the FastAPI route answers it (the
    same function, the same audit and problem documents). Anything else is handed on, its body
    replayed, to the FastAPI route: it refuses what is malformed as it always did.
    """

    PATH = "/v1/requests"

    def __init__(self, app: ASGIApp, service: CAService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        parsed = self._parse(scope, data)
        if parsed is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        response = await run_in_threadpool(self._answer, *parsed)
        await response(scope, receive, send)

    @staticmethod
    def _parse(scope: Scope, data: bytes) -> tuple[EnrollmentBody, str | None, str | None] | None:
        """The body, bearer secret and idempotency key; None when the FastAPI route should judge."""
        seen: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"content-type", b"authorization", b"idempotency-key"):
                if name in seen:
                    return None
                seen[name] = value.decode("latin-1")
        media = seen.get(b"content-type", "").split(";", 1)[0].strip().lower()
        key = seen.get(b"idempotency-key")
        if media != "application/json" or (key is not None and not re.fullmatch(IDEMPOTENCY_KEY, key)):
            return None
        try:
            body = EnrollmentBody.model_validate_json(data)
        except ValidationError:
            return None
        return body, bearer_secret(seen.get(b"authorization")), key

    def _answer(self, body: EnrollmentBody, secret: str | None, key: str | None) -> Response:
        try:
            now = clock.now()
            who = self.service.auth.authenticate(secret, now, remembered=True)
            return submit_enrollment(self.service, body, who, key, now)
        except Refusal as exc:
            return refusal_answer(exc)
        except OperationalError as exc:
            return store_unavailable(exc)
        except Exception:
            return unexpected_error("POST", self.PATH)


# Rows per (action, reason) per minute that anonymous refusals get one by one in each worker
# (ca serve --audit-anonymous-rows; ca/audit.py samples the rest), and how often a worker writes
# the summary rows of the minutes that are over.
AUDIT_ANONYMOUS_ENV = "CERTPULSE_AUDIT_ANONYMOUS_ROWS"
DEFAULT_AUDIT_ANONYMOUS_ROWS = 60
AUDIT_FLUSH_SECONDS = 15.0
# What a worker serves (ca serve --role): all, enrollment (no publishing routes) or status (only them)
ROLE_ENV = "CERTPULSE_ROLE"


def _logged(work: Callable[..., None]) -> Callable[..., None]:
    """``work`` (an audit write, run in the background: its answer has gone) that logs a failure
    instead of leaving it in a future nobody reads."""
    def guarded(*args: Any) -> None:
        try:
            work(*args)
        except Exception:
            log.exception("could not audit a refusal")

    return guarded


@contextlib.asynccontextmanager
async def _audit_flushing(service: CAService) -> AsyncIterator[None]:
    """While the worker runs, write the anonymous refusals' summary rows as their minutes end;
    at shutdown, write those of the minutes not yet over."""
    loop = asyncio.get_running_loop()

    async def flush_now_and_then() -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_SECONDS)
            try:
                await loop.run_in_executor(None, service.audit.flush, clock.now())
            except Exception:
                log.exception("could not write the audit's summary of anonymous refusals")

    task = loop.create_task(flush_now_and_then())
    try:
        yield
    finally:
        task.cancel()
        await loop.run_in_executor(None, lambda: service.audit.flush(clock.now(), everything=True))


def create_app(service: CAService, *, max_body: int = 64 * 1024, max_inflight: int = 0, threads: int | None = None,
               read_timeout: int = DEFAULT_READ_TIMEOUT, publish: bool = True) -> Any:
    """The application: the API behind, from the outside in, the body's size limit and read deadline
    (:class:`BodyLimit`), the load-shedding limit (``max_inflight``, 0: none) and the handler
    threads (``threads``, None: anyio's default). Reading the body comes first, so a request counts
    against ``max_inflight`` only once it is whole. ``publish``: with the publishing routes (CRL,
    OCSP, CA certificates), which ``ca serve --role enrollment`` leaves to a status server."""
    service.audit.on_anonymous = observe_anonymous_refusal

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with _audit_flushing(service):
            yield

    app = FastAPI(
        lifespan=lifespan,
        title="certpulse enrollment service",
        version=__version__,
        description="Certificate enrollment, policy (CEP), approval and revocation. "
        "Errors are RFC 7807 problem documents whose `reason` names the refusal.",
    )
    app.state.service = service

    @app.exception_handler(Refusal)
    def on_refusal(request: Request, exc: Refusal) -> Response:
        return refusal_answer(exc)

    @app.exception_handler(RequestValidationError)
    def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        detail = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        service.audit.refusal(ANONYMOUS.actor, "malformed", Refusal(Reason.MALFORMED_REQUEST, detail), clock.now())
        return problem(Reason.MALFORMED_REQUEST, detail)

    @app.exception_handler(StarletteHTTPException)
    def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        reason = Reason.NOT_FOUND if exc.status_code in (404, 405) else Reason.MALFORMED_REQUEST
        if reason is Reason.MALFORMED_REQUEST:  # e.g. a body that is not UTF-8 or nests too deep
            service.audit.refusal(ANONYMOUS.actor, "malformed", Refusal(reason, str(exc.detail)), clock.now())
        return problem(reason, str(exc.detail), status=exc.status_code)

    @app.exception_handler(OperationalError)
    def on_store(request: Request, exc: OperationalError) -> Response:
        return store_unavailable(exc)

    @app.exception_handler(Exception)
    def on_unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error(request.method, request.url.path)

    @app.get("/healthz", tags=["service"], summary="Readiness: 503 'degraded' while this worker is saturated",
             responses={503: {"description": "Degraded: every place or handler thread taken"}})
    async def healthz() -> Response:
        # on the event loop (never waits for a handler thread), never shed; see frontends/health.py
        healthy, document = worker_health(app.state.shedding, time.monotonic())
        return JSONResponse(document, status_code=200 if healthy else 503)

    probe = DatabaseProbe(service.database_answers)

    @app.get("/livez", tags=["service"], summary="Liveness: 200 while the process answers (load and database aside)")
    async def livez() -> Response:
        return JSONResponse(liveness())

    @app.get("/readyz", tags=["service"],
             summary="Readiness: 200 when this worker has room and the database answers; else 503 + Retry-After",
             responses={503: {"description": "Not ready: the database does not answer, or the worker is saturated"}})
    async def readyz() -> Response:
        healthy, document = worker_health(app.state.shedding, time.monotonic())
        code, document, retry_after = readiness(healthy, document, await probe.answers())
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(document, status_code=code, headers=headers)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse, responses=METRICS_RESPONSES,
             summary="Prometheus metrics (unauthenticated, as Prometheus expects; counts only, no names)")
    def metrics(request: Request) -> Response:
        return metrics_endpoint(request)

    @app.post("/v1/tokens/exchange", tags=["enrollment"], response_model=Credential,
              summary="Trade a one-time enrollment token for the principal's credential",
              responses=PROBLEM_RESPONSES)
    def exchange(body: TokenExchange) -> Response:
        return answer(service.auth.exchange_token(body.token, clock.now()))

    @app.get("/v1/policy", tags=["enrollment"], summary="Enrollment policy (the seeds' CEP) for the caller",
             response_model=dict[str, Any], responses=PROBLEM_RESPONSES)
    def policy(who: CallerDep) -> Response:
        return answer(service.policy.document(who, clock.now()))

    @app.get("/v1/roots", tags=["enrollment"], summary="The CA's root certificates (unauthenticated)",
             description="What an agent fetches at `agent init --ca-fingerprint`: it keeps only the root whose "
                         "SHA-256 fingerprint it was given, then verifies this server against it.")
    def roots() -> Response:
        return JSONResponse({"roots": list(service.policy.roots())})

    @app.post("/v1/requests", tags=["enrollment"], status_code=201, response_model=RequestResult,
              response_model_exclude_none=True,
              summary="Submit a certificate request (new or renewal)",
              responses={**PROBLEM_RESPONSES, 202: {"description": "Pending CA-manager approval",
                                                    "model": RequestResult}})
    def submit(body: EnrollmentBody, who: SubmitterDep,
               idempotency_key: Annotated[str | None, Header(
                   pattern=IDEMPOTENCY_KEY,
                   description="Client-chosen key; a retry with the same key and CSR returns the first result",
               )] = None) -> Response:
        # Well-formed submissions are answered by SubmitRoute before they get here; this answers the
        # rest (a form of the body it does not take) the same way, and documents the route.
        return submit_enrollment(service, body, who, idempotency_key, clock.now())

    @app.get("/v1/requests", tags=["management"], response_model=list[RequestResult],
             response_model_exclude_none=True, summary="List requests (CA managers)",
             responses=PROBLEM_RESPONSES)
    def list_requests(who: CallerDep,
                      status: Annotated[Literal["pending", "issued", "denied", "failed"] | None, Query()] = None,
                      limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> Response:
        return answer(service.requests.list(who, clock.now(), status, limit))

    @app.get("/v1/requests/{request_id}", tags=["enrollment"], response_model=RequestResult,
             response_model_exclude_none=True, summary="A request's status and, once issued, its certificate",
             responses=PROBLEM_RESPONSES)
    def get_request(request_id: int, who: CallerDep) -> Response:
        return answer(service.requests.get(who, request_id))

    @app.post("/v1/requests/{request_id}/approve", tags=["management"], response_model=RequestResult,
              response_model_exclude_none=True, summary="Approve a pending request (CA managers)",
              responses=PROBLEM_RESPONSES)
    def approve(request_id: int, who: CallerDep) -> Response:
        return answer(service.requests.approve(who, request_id, clock.now()))

    @app.post("/v1/requests/{request_id}/deny", tags=["management"], response_model=RequestResult,
              response_model_exclude_none=True, summary="Deny a pending request (CA managers)",
              responses=PROBLEM_RESPONSES)
    def deny(request_id: int, body: DenyBody, who: CallerDep) -> Response:
        return answer(service.requests.deny(who, request_id, body.reason, clock.now()))

    @app.post("/v1/certificates/{serial}/revoke", tags=["management"], summary="Revoke a certificate",
              response_model=dict[str, Any], responses=PROBLEM_RESPONSES)
    def revoke(serial: str, body: RevokeBody, who: CallerDep) -> Response:
        return answer(service.revocation.revoke(who, serial, body.reason, clock.now(), issuer=body.issuer))

    # Before /v1/certificates/{serial}: routes match in the order they are added, and that one
    # would read "status" as a serial.
    @app.get("/v1/certificates/status", tags=["status"], response_model=StatusListResult,
             response_model_exclude_none=True, responses=PROBLEM_RESPONSES,
             summary="The status of all the caller's unexpired certificates, revoked ones included",
             description="One call per pulse instead of one per certificate. Pages of up to 10,000 in issue "
                         "order: when `next` is present, ask again with `?after=` it.")
    def own_statuses(who: CallerDep, after: Annotated[str | None, Query(max_length=32)] = None) -> Response:
        return answer(service.revocation.own_statuses(who, clock.now(), after=after))

    @app.post("/v1/certificates/status", tags=["status"], response_model=StatusListResult,
              response_model_exclude_none=True, responses=PROBLEM_RESPONSES,
              summary="The status of a list of serials (unauthenticated, as a single status is)",
              description="A serial this CA did not issue (at the issuer named) answers `unknown`; a serial "
                          "at several issuers, asked without one, answers once per issuer.")
    def statuses(body: StatusQuery) -> Response:
        queries = [SerialQuery(entry.serial, entry.issuer) for entry in body.certificates]
        return answer(service.revocation.statuses(queries, clock.now()))
    @app.post("/v1/certificates/{serial}/unrevoke", tags=["management"],
              summary="Release a certificate from hold (certificateHold); refused for any other revocation",
              response_model=dict[str, Any], responses=PROBLEM_RESPONSES)
    def unrevoke(serial: str, who: CallerDep, body: UnrevokeBody | None = None) -> Response:
        return answer(service.revocation.unrevoke(who, serial, clock.now(), issuer=body.issuer if body else None))

    @app.get("/v1/certificates/{serial}", tags=["status"], summary="A certificate's status (good, revoked, expired)",
             response_model=dict[str, Any], responses=PROBLEM_RESPONSES)
    def status(serial: str, issuer: Annotated[str | None, Query(max_length=64)] = None) -> Response:
        return answer(service.revocation.status(serial, clock.now(), issuer=issuer))

    @app.get("/v1/audit", tags=["management"], summary="The audit log, newest first (CA managers)",
             response_model=list[dict[str, Any]], responses=PROBLEM_RESPONSES)
    def audit(who: CallerDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
              request_id: Annotated[int | None, Query()] = None) -> Response:
        return answer(service.audit.read(who, clock.now(), limit=limit, request_id=request_id))

    def on_body_refused(scope: MutableMapping[str, Any], refusal: Refusal) -> None:
        # Anonymous: the credential has not been looked at (a body over the limit or too slow).
        service.audit.refusal(ANONYMOUS.actor, "refused",
                              Refusal(refusal.reason, f"{scope.get('method')} {scope.get('path')}"), clock.now())

    # ACME (RFC 8555) beside the API, inside the same thread limit, shedding and body limit; its
    # refusals there are ACME problem documents (frontends/acme/)
    acme = ACMERoutes(SubmitRoute(app, service), service)
    add_acme_paths(app)
    inner: ASGIApp = acme
    if threads is not None:
        inner = limit_threads(inner, threads)
    shed = shed_load(inner, max_inflight, threads=threads or 1, refusals=acme.outer_refusal)
    app.state.shedding = shed if isinstance(shed, LoadShedding) else None
    # CRLs, OCSP and CA certificates answer outside the shedding limit (frontends/publication.py)
    published = PublicationRoutes(shed, public_routes(service) if publish else [])
    return BodyLimit(published, max_body, _logged(on_body_refused), read_timeout=read_timeout,
                     refusals=acme.outer_refusal)


def app_from_environment() -> Any:
    """The uvicorn factory: each worker process opens the CA named by ``CERTPULSE_CA_DIR``."""
    ca_dir = CADir(resolve_ca_dir(Path(os.environ["CERTPULSE_CA_DIR"]) if "CERTPULSE_CA_DIR" in os.environ else None))
    config = ca_dir.load()
    service = open_service(ca_dir, config=config)
    service.audit.sample = AnonymousSample(rows=whole_number_setting(
        AUDIT_ANONYMOUS_ENV, DEFAULT_AUDIT_ANONYMOUS_ROWS, low=0, high=None, requirement="a whole number"))

    def on_protocol_refusal(reason: Reason, detail: str) -> None:  # headers too slow or too large
        service.audit.refusal(ANONYMOUS.actor, "refused", Refusal(reason, detail), clock.now())

    read_deadline.refusal_listener = _logged(on_protocol_refusal)
    role = os.environ.get(ROLE_ENV, "all")
    if role == "status":
        from certpulse.frontends.status_role import status_app

        app = status_app(service, max_body=config.max_request_bytes, read_timeout=read_timeout_from_environment())
    else:
        app = create_app(service, max_body=config.max_request_bytes, max_inflight=max_inflight_from_environment(),
                         threads=threads_from_environment(), read_timeout=read_timeout_from_environment(),
                         publish=role != "enrollment")
    # uvicorn calls this factory in the serving process, its signal handlers in place (frontends/lifecycle.py)
    bind_to_supervisor(supervisor_from_environment())
    arm_stop_deadline(shutdown_timeout_from_environment())
    return CutAtStop(app)


__all__ = ["answer", "app_from_environment", "create_app"]
