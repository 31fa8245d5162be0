"""The OCSP responder's core (``service.ocsp``): which certificate a request asks about, its
status, and the signed answer, cached so that most requests cost no database read and no
signature.

**Who we answer for.** A request names its certificate by the issuer's name and key hashes and
the serial. The issuing authorities are indexed by those hashes, for every hash algorithm a
CertID may use (:data:`~certpulse.pki.ocsp.CERT_ID_HASHES`), once per state generation; a
request naming any other issuer (the root's children, another CA) is ``unauthorized``.

**Status.** One indexed read of ``certificates (authority_id, serial)``: an issued row is
``good`` or ``revoked`` (its time and reason; a certificate on hold is ``revoked`` with reason
``certificateHold``, as RFC 6960 has it); no row, or a serial only reserved (never signed, so in
no one's hands), is ``unknown``.

**Cache.** What a certificate's status is, and the signed answer without nonce, are kept per
process per CertID, reused until half of ``ocsp_validity`` has passed (a client always gets an
answer with at least half its validity left) or until the authority's
``revocation_revision`` moves (every revocation, hold or release bumps it in its own
transaction). The revisions are read at most about once a second per process
(:meth:`OCSPResponder.read_revisions`, which the front end runs off the request path): a
revocation reaches every answer within about a second. A request without nonce (RFC 5019: what
browsers, nginx and most clients send) that matches a cached answer byte for byte is answered
from a dictionary keyed by its DER (:meth:`OCSPResponder.cached`): no parsing, no database, no
signature. A request with a nonce is signed fresh, its nonce echoed (the status still comes
from the cache). ``unknown`` answers are kept in a small cache of their own, for a minute at
most, so that random serials neither fill memory nor push out the real certificates' answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import and_, func, select

from certpulse.ca.model import Authority
from certpulse.ca.ocsp_signer import SignerRecord, issue_signer, newest_signers
from certpulse.ca.state import Snapshot
from certpulse.ca.storage import schema as t
from certpulse.pki.certs import serial_hex
from certpulse.pki.ocsp import (
    CertID,
    CertStatus,
    Failure,
    MalformedRequest,
    ParsedRequest,
    ResponseSigner,
    SingleAnswer,
    build_response,
    issuer_keys,
    parse_request,
    unsuccessful,
)
from certpulse.sql.db import read

if TYPE_CHECKING:
    from certpulse.ca.service import CAService

ResponseStatus = Literal["successful", "malformedRequest", "unauthorized", "internalError", "tryLater"]

MAX_CACHED = 100_000  # answers kept per process (about 1 KB each)
MAX_CACHED_UNKNOWN = 1_000  # answers about serials we never issued, kept apart
UNKNOWN_FOR = 60.0  # seconds an "unknown" answer is reused at most (a serial may be issued meanwhile)
REVISIONS_EVERY = 1.0  # seconds between two reads of the revocation revisions
SIGNER_CHECK_EVERY = 60.0  # seconds between two looks for a renewed signer when ours is due


@dataclasses.dataclass(slots=True)
class OCSPAnswer:
    """One DER OCSPResponse, and what a front end needs to send it."""

    der: bytes
    status: ResponseStatus
    cert_status: CertStatus | None = None
    # Set for a successful answer without nonce, which any client may be given (and an HTTP
    # cache may keep): its thisUpdate / nextUpdate, and until when (time.monotonic()) it is reused.
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None
    reuse_until: float | None = None
    # For the front end's own use (e.g. its encoded headers, computed once per answer)
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cacheable(self) -> bool:
        return self.reuse_until is not None


@dataclasses.dataclass(slots=True)
class _Known:
    """A certificate's status as last read, and its signed answer without nonce once made."""

    authority_id: int
    revision: int
    answer: SingleAnswer
    reuse_until: float  # time.monotonic()
    plain: OCSPAnswer | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Signer:
    record: SignerRecord
    signer: ResponseSigner


def failure(status: Failure) -> OCSPAnswer:
    return OCSPAnswer(_FAILURE_DER[status], status)


_FAILURE_DER: dict[Failure, bytes] = {
    s: unsuccessful(s) for s in ("malformedRequest", "unauthorized", "internalError", "tryLater")}


class OCSPResponder:
    def __init__(self, service: CAService, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self._monotonic = monotonic
        self._by_der: dict[bytes, _Known] = {}  # requests without nonce, by their DER
        self._by_id: dict[CertID, _Known] = {}
        self._unknown: dict[CertID, _Known] = {}
        self._revisions: dict[int, int] = {}  # authority id -> revocation_revision
        self._revisions_read_at = float("-inf")
        self._revision_lock = threading.Lock()
        self._newest_signer_id: int | None = None
        self._signers: dict[int, _Signer] = {}
        self._signers_checked: dict[int, float] = {}
        self._signer_lock = threading.Lock()
        self._issuers: tuple[int, dict[tuple[str, bytes, bytes], Authority]] | None = None

    # -- the fast path: no parsing, no database, no signature --------------------------------

    def cached(self, request_der: bytes) -> OCSPAnswer | None:
        """The answer to a request without nonce seen before, while it is still current; None
        otherwise (then :meth:`respond`). Only as current as the last :meth:`read_revisions`."""
        known = self._by_der.get(request_der)
        if known is None or known.plain is None or known.reuse_until <= self._monotonic() \
                or self._revisions.get(known.authority_id) != known.revision:
            return None
        return known.plain

    def revisions_age(self) -> float:
        """Seconds since the revocation revisions were last read (infinite: never)."""
        return self._monotonic() - self._revisions_read_at

    def read_revisions(self) -> None:
        """Read every authority's revocation revision (and whether a newer signer exists): one
        small query, run about once a second, off the request path."""
        started = self._monotonic()
        with read(self._service.engine) as conn:
            revisions = {row.id: row.revocation_revision
                         for row in conn.execute(select(t.authorities.c.id, t.authorities.c.revocation_revision))}
            newest_signer = conn.execute(select(func.max(t.ocsp_signers.c.id))).scalar()
        for authority_id, revision in revisions.items():
            self._note_revision(authority_id, revision)
        if newest_signer != self._newest_signer_id:
            self._newest_signer_id = newest_signer
            self._signers_checked.clear()  # look for the new one at the next answer that signs
        self._revisions_read_at = max(self._revisions_read_at, started)

    def _note_revision(self, authority_id: int, revision: int) -> None:
        with self._revision_lock:  # two readers at once must not set an older one last
            if revision > self._revisions.get(authority_id, -1):  # revisions only grow
                self._revisions[authority_id] = revision

    # -- the full path: blocking (database, signature); run in a thread ----------------------

    def answer_from_memory(self, request_der: bytes, now: dt.datetime) -> OCSPAnswer | None:
        """What :meth:`respond` answers when that takes neither the database nor a new signer: a
        malformed request, or one about a certificate whose status is cached, signed now when it
        carries a nonce (a signature, about 0.1 ms, no I/O: cheaper on the event loop than the trip
        to a thread). None: ask :meth:`respond`, in a thread."""
        try:
            parsed = parse_request(request_der)
        except MalformedRequest:
            return failure("malformedRequest")
        known = self._current(parsed.cert_id)
        if known is None:
            return None
        held = self._signers.get(known.authority_id)
        if held is None or not self._usable(known.authority_id, held, now):
            return None
        return self._signed(request_der, parsed, known, held)

    def respond(self, request_der: bytes, now: dt.datetime) -> OCSPAnswer:
        """The answer to a DER OCSPRequest. Raises only when the database fails (the caller
        answers ``tryLater``) or on a bug (``internalError``)."""
        try:
            parsed = parse_request(request_der)
        except MalformedRequest:
            return failure("malformedRequest")
        if parsed.nonce is None:
            answer = self.cached(request_der)
            if answer is not None:
                return answer
        known = self._current(parsed.cert_id)
        if known is None:
            found = self._read_status(parsed.cert_id, now)
            if found is None:
                return failure("unauthorized")
            known = found
        return self._signed(request_der, parsed, known, self._signer_for(known.authority_id, now))

    def _signed(self, request_der: bytes, parsed: ParsedRequest, known: _Known, signer: _Signer) -> OCSPAnswer:
        """The answer to ``parsed`` from what is known: signed with its nonce, or the answer
        without nonce (signed once, then kept)."""
        if parsed.nonce is not None:
            return OCSPAnswer(build_response(parsed.cert_id, known.answer, signer.signer, parsed.nonce),
                              "successful", known.answer.status)
        if known.plain is None:
            single = known.answer
            known.plain = OCSPAnswer(build_response(parsed.cert_id, single, signer.signer, None), "successful",
                                     single.status, this_update=single.this_update, next_update=single.next_update,
                                     reuse_until=known.reuse_until)
        self._remember_request(request_der, known)
        return known.plain

    def _current(self, cert_id: CertID) -> _Known | None:
        known = self._by_id.get(cert_id) or self._unknown.get(cert_id)
        if known is None or known.reuse_until <= self._monotonic() \
                or self._revisions.get(known.authority_id) != known.revision:
            return None
        return known

    def _read_status(self, cert_id: CertID, now: dt.datetime) -> _Known | None:
        """The certificate's status from the database, remembered; None when we are not its issuer."""
        validity = self._service.publishing.ocsp_validity
        started = self._monotonic()
        with read(self._service.engine) as conn:
            authority = self._issuer(self._service.state.get(conn), cert_id, now)
            if authority is None:
                return None
            # the revision first: a revocation committed between the two reads leaves the answer
            # marked older than it is (re-read at once), never the other way round
            revision = conn.execute(select(t.authorities.c.revocation_revision)
                                    .where(t.authorities.c.id == authority.id)).scalar_one()
            row = conn.execute(select(t.certificates.c.status, t.certificates.c.revoked_at,
                                      t.certificates.c.revocation_reason).where(and_(
                t.certificates.c.authority_id == authority.id,
                t.certificates.c.serial == serial_hex(cert_id.serial)))).first()
        self._note_revision(authority.id, revision)
        signer = self._signer_for(authority.id, now)
        next_update = min(now + validity, signer.record.not_after)
        if row is None or row.status != "issued":
            answer = SingleAnswer("unknown", now, next_update)
            known = _Known(authority.id, revision, answer, started + min(validity.total_seconds() / 2, UNKNOWN_FOR))
            _bounded_put(self._unknown, cert_id, known, MAX_CACHED_UNKNOWN)
            return known
        if row.revoked_at is not None:
            answer = SingleAnswer("revoked", now, next_update, revoked_at=row.revoked_at,
                                  reason=row.revocation_reason)
        else:
            answer = SingleAnswer("good", now, next_update)
        reuse = min((next_update - now).total_seconds(), validity.total_seconds()) / 2
        known = _Known(authority.id, revision, answer, started + reuse)
        _bounded_put(self._by_id, cert_id, known, MAX_CACHED)
        return known

    def _remember_request(self, request_der: bytes, known: _Known) -> None:
        if known.answer.status != "unknown":
            _bounded_put(self._by_der, request_der, known, MAX_CACHED)

    def _issuer(self, snapshot: Snapshot, cert_id: CertID, now: dt.datetime) -> Authority | None:
        """The issuing authority the CertID names, if it is ours and valid now."""
        issuers = self._issuers
        if issuers is None or issuers[0] != snapshot.generation:
            table = {key: a for a in snapshot.authorities if a.role == "issuer" and a.key_file is not None
                     for key in issuer_keys(a.certificate)}
            issuers = self._issuers = (snapshot.generation, table)
        authority = issuers[1].get(cert_id.issuer)
        return authority if authority is not None and authority.valid_at(now) else None

    # -- the delegated signers --------------------------------------------------------------

    def _signer_for(self, authority_id: int, now: dt.datetime) -> _Signer:
        """This authority's delegated signer: the one held while valid; the newest valid one from
        the database when ours is due for renewal (looked for at most once a minute) or a newer
        one appeared (:meth:`read_revisions` notices); a new one when there is none at all."""
        held = self._signers.get(authority_id)
        if held is not None and self._usable(authority_id, held, now):
            return held
        with self._signer_lock:
            held = self._signers.get(authority_id)
            if held is not None and self._usable(authority_id, held, now):
                return held
            mono = self._monotonic()
            with read(self._service.engine) as conn:
                record = newest_signers(conn, now).get(authority_id)
                snapshot = self._service.state.get(conn)
            if record is None or not (self._service.keyring.directory / record.key_file).exists():
                # none valid, or its key is not on this machine (removed, another host's folder)
                record = issue_signer(self._service, snapshot.authority(authority_id), now)
            label = f"OCSP signer {serial_hex(record.certificate.serial_number)}"
            key = self._service.keyring.load(record.key_file, label)
            held = _Signer(record, ResponseSigner(record.certificate, key))
            self._signers[authority_id] = held
            self._signers_checked[authority_id] = mono
            return held

    def _usable(self, authority_id: int, held: _Signer, now: dt.datetime) -> bool:
        checked = self._signers_checked.get(authority_id)
        if checked is None or held.record.not_after <= now:
            return False
        return not held.record.renewal_due(now) or self._monotonic() - checked < SIGNER_CHECK_EVERY


def _bounded_put(cache: dict[Any, _Known], key: Any, known: _Known, limit: int) -> None:
    """Insert, dropping the oldest entry first when full (dicts keep insertion order)."""
    if key not in cache and len(cache) >= limit:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread emptied or changed it
            del cache[next(iter(cache))]
    cache[key] = known


__all__ = ["OCSPAnswer", "OCSPResponder", "ResponseStatus", "failure"]
