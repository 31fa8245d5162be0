"""The ACME server as plain ASGI: every ``/acme/...`` request, in one trip to a handler thread.

FastAPI's work per request (routing, dependency resolution, a thread trip for each dependency
and another for the handler, response validation) cost as much as an ACME operation's own
work, and its request models cannot read a JWS anyway; so, as ``POST /v1/requests`` and the
publishing routes do, these routes are answered here directly: the path is matched on the event
loop, then one handler thread checks the JWS (:mod:`.signed`), calls the core
(:mod:`.operations`) and builds the answer. Nothing else reaches the database.

Every answer, refusals included, is finished the same way: a fresh ``Replay-Nonce``,
``Cache-Control: no-store``, ``Link: <directory>;rel="index"``; refusals are RFC 8555 problem
documents (:mod:`.errors`), never a traceback. These routes sit inside the server's body limit
and load shedding like the rest of the API; their refusals there are ACME problems too
(:func:`ACMERoutes.refusal_answer`): ``malformed`` 413 for a body over the limit,
``rateLimited`` 429 with ``Retry-After`` when the worker is at its limit.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

import certpulse.frontends.acme.resources as resources
import certpulse.frontends.acme.signed as signed
from certpulse import clock
from certpulse.ca.acme.model import DirectoryMeta
from certpulse.ca.acme.nonces import Nonces
from certpulse.ca.model import ANONYMOUS
from certpulse.ca.service import CAService
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.frontends.acme.answers import Answer
from certpulse.frontends.acme.errors import ERROR_PREFIX, refusal_document
from certpulse.frontends.acme.operations import OPERATIONS, Call, seconds
from certpulse.frontends.acme.urls import PREFIX, Match, Urls, match
from certpulse.frontends.acme.validations import ValidationRunner
from certpulse.frontends.metrics import observe_acme
from certpulse.frontends.problems import DATABASE_RETRY_AFTER

log = logging.getLogger("certpulse.acme")

DIRECTORY_CACHE_SECONDS = 5.0  # the directory's meta (profiles) is read at most this often per worker


class ACMERoutes:
    """``/acme/...`` answered here; anything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, service: CAService, *, runner: ValidationRunner | None = None) -> None:
        self.app = app
        self.service = service
        self.acme = service.acme
        self.nonces = Nonces(service.engine, service.acme.config.duration("nonce_lifetime"))
        self.runner = runner or ValidationRunner(service.acme)
        self.known_accounts = signed.KnownAccounts()
        self._meta: tuple[float, DirectoryMeta] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        found = match(scope["path"])
        operation = found.operation if found is not None else "unknown"
        if not self.acme.config.enabled:
            answer = await self._refused_now(Refusal(Reason.NOT_FOUND, "this server does not serve ACME"), scope)
        elif found is None:
            answer = await self._refused_now(Refusal(Reason.NOT_FOUND, "no ACME resource at this URL"), scope)
        elif method not in found.methods:
            answer = await self._refused_now(Refusal(
                Reason.MALFORMED_REQUEST, f"{printable(method[:16])} is not allowed here; use "
                                          f"{' or '.join(sorted(found.methods))}", status=405), scope)
            answer.header("allow", ", ".join(sorted(found.methods)))
        elif method == "POST":
            body = await _read_body(receive)
            if body is None:  # the client went away
                return
            answer = await run_in_threadpool(self._post, scope, found, body)
        elif operation == "newNonce" and self.nonces.ready:
            answer = self._finish(Answer(204 if method == "GET" else 200), Urls.of(scope))
        else:
            answer = await run_in_threadpool(self._get, scope, found)
        observe_acme(operation, answer.outcome, started)
        await answer.send(send, head=method == "HEAD")

    # -- in a handler thread --------------------------------------------------------------

    def _post(self, scope: Scope, found: Match, body: bytes) -> Answer:
        urls = Urls.of(scope)
        now = clock.now()

        def work() -> Answer:
            try:
                headers = dict(scope["headers"])
                signed.check_media_type(signed.media_type(headers))
                message = signed.parse(body, urls.request(scope), found.operation)
                request = signed.verify(message, urls, self.acme, self.nonces, now, self.known_accounts)
            except Refusal as refusal:
                self._audit(found.operation, refusal, now)
                raise
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            call = Call(self.acme, urls, request, found.ids, query, now, self.runner)
            return OPERATIONS[found.operation](call)

        return self._guarded(work, urls, scope)

    def _get(self, scope: Scope, found: Match) -> Answer:
        urls = Urls.of(scope)

        def work() -> Answer:
            now = clock.now()
            if found.operation == "directory":
                return Answer.json(resources.directory(urls, self._directory_meta(now)))
            if found.operation == "renewalInfo":
                assert found.text is not None
                info = self.acme.renewal_info(found.text, now)
                return Answer.json(resources.renewal_info(info)).header("retry-after", seconds(info.retry_after))
            self.nonces.load()  # newNonce at a worker's first request: refused (503) when the database is down
            return Answer(204 if scope["method"] == "GET" else 200)

        return self._guarded(work, urls, scope)

    def _directory_meta(self, now: dt.datetime) -> DirectoryMeta:
        cached = self._meta
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        meta = self.acme.directory_meta(now)
        self._meta = (time.monotonic() + DIRECTORY_CACHE_SECONDS, meta)
        return meta

    def _guarded(self, work: Callable[[], Answer], urls: Urls, scope: Scope) -> Answer:
        """``work``'s answer, or the problem document of what it raised; finished either way."""
        try:
            answer = work()
        except Refusal as refusal:
            answer = self.refusal_answer(refusal, urls)
        except RecursionError:  # json.loads of a body or payload nested thousands deep
            answer = self.refusal_answer(Refusal(Reason.MALFORMED_REQUEST, "the request's JSON nests too deeply"),
                                         urls)
        except OperationalError as exc:
            log.error("database unavailable: %s", printable(str(exc.orig)))
            answer = self.refusal_answer(Refusal(
                Reason.UNAVAILABLE, f"the certificate database is unavailable; retry after {DATABASE_RETRY_AFTER} s",
                retry_after=DATABASE_RETRY_AFTER), urls)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], printable(scope["path"]))
            status, document = 500, {"type": ERROR_PREFIX + "serverInternal", "status": 500,
                                     "detail": "internal error; the request had no effect"}
            answer = Answer.problem(status, document)
        return self._finish(answer, urls)

    def _finish(self, answer: Answer, urls: Urls) -> Answer:
        try:
            self.nonces.load()
            answer.header("replay-nonce", self.nonces.issue(clock.now()))
        except Exception:  # the database is down at a worker's first request: answer without one
            log.warning("no nonce for this answer: the nonce secret cannot be read")
        answer.header("cache-control", "no-store")
        return answer.link(urls.directory, "index")

    def _audit(self, operation: str, refusal: Refusal, now: dt.datetime) -> None:
        """A refusal before any account was known: audited as anonymous (sampled, ca/audit.py)."""
        try:
            self.service.audit.refusal(ANONYMOUS.actor, "acme-refused",
                                       Refusal(refusal.reason, f"{operation}: {refusal.detail}"), now)
        except Exception:
            log.exception("could not audit a refused ACME request")

    async def _refused_now(self, refusal: Refusal, scope: Scope) -> Answer:
        """A refusal decided on the event loop; a thread only when the nonce secret is not loaded."""
        urls = Urls.of(scope)
        if self.nonces.ready:
            return self._finish(self.refusal_answer(refusal, urls), urls)
        return await run_in_threadpool(self._finish, self.refusal_answer(refusal, urls), urls)

    # -- refusals -------------------------------------------------------------------------

    def refusal_answer(self, refusal: Refusal, urls: Urls) -> Answer:
        status, document = refusal_document(refusal)
        terms = self.acme.config.terms_of_service
        if refusal.reason is Reason.USER_ACTION_REQUIRED and terms:  # RFC 8555 section 7.3.3
            document["instance"] = terms
        answer = Answer.problem(status, document)
        retry_after = refusal.extra.get("retry_after")
        if isinstance(retry_after, int):
            answer.header("retry-after", str(retry_after))
        existing = refusal.extra.get("account_id")
        if refusal.reason is Reason.CONFLICT and isinstance(existing, int):  # keyChange: the key's account
            answer.header("location", urls.account(existing))
        if "instance" in document:
            answer.link(terms, "terms-of-service")
        return answer

    def outer_refusal(self, scope: Scope, refusal: Refusal) -> ASGIApp | None:
        """The ACME answer to a refusal of the layers around these routes (body limit, read
        deadline, load shedding) for an ACME path; None for any other path."""
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            return None
        urls = Urls.of(scope)
        answer = self.refusal_answer(refusal, urls)
        if refusal.reason in (Reason.BODY_TOO_LARGE, Reason.REQUEST_TIMEOUT):
            answer.header("connection", "close")
        if self.nonces.ready:
            answer = self._finish(answer, urls)
        else:
            answer.header("cache-control", "no-store").link(urls.directory, "index")
        found = match(scope["path"])
        observe_acme(found.operation if found is not None else "unknown", answer.outcome, time.perf_counter())

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            await answer.send(send, head=scope.get("method") == "HEAD")

        return respond


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message: Any = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


__all__ = ["ACMERoutes"]
