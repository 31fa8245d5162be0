"""Certificate revocation lists: the full CRL of each authority that signs certificates.

Every issuing authority (and the root, whose CRL lists the issuing CAs it revoked: normally
none) publishes one full CRL, shard 0 of :mod:`certpulse.ca.publishing`'s URL scheme. The
latest one is kept in the ``crls`` table and served from there (and from each process's memory)
while it is fresh:

* its ``revision`` equals the authority's ``revocation_revision`` (bumped in the transaction of
  every revocation, hold and release), and
* it is younger than the CA's ``crl_period`` (thisUpdate + crl_period > now).

Otherwise it is made again: right after a revocation, hold or release by the process that made
it (:meth:`CRLs.after_change`; a failure there is logged and never fails the revocation), by
the next fetch that finds it stale, and by ``ca serve``'s :class:`CRLPublisher` thread, which
re-signs each CRL once its period is over, so that a served CRL is never past its nextUpdate
(thisUpdate + ``crl_validity``, longer than the period).

Entries: every certificate of the authority that is revoked (or on hold: reason
certificateHold) and not expired at thisUpdate, with its revocation date and reason (no reason
extension for unspecified, RFC 5280 5.3.1). The entry of an expired certificate is dropped: a
relying party refuses an expired certificate anyway, and a CRL that kept every revocation for
ever would only grow. RFC 5280 (3.3) allows it once the certificate's validity is over; the
previous CRL, still listing it, was issued before the expiry.

The CRL number grows by one with each CRL signed (RFC 5280 5.2.3). Two processes may make one at
once: each signs number N+1 from the row it read, and the store is conditional on the row still
holding N; the loser serves the winner's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from certpulse.ca.model import Authority
from certpulse.ca.publishing import Publishing
from certpulse.ca.results import PublishedCRL
from certpulse.ca.state import KeyRing, SnapshotCache
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki.crl import DEFAULT_CACHE_ENTRIES, EntryCache, sign_crl
from certpulse.sql.db import DirectStatement, read, write

log = logging.getLogger("certpulse.crl")

CRL_SIGNERS = ("root", "issuer")  # the roles whose keys sign certificates, hence CRLs
ROWS_PER_FETCH = 20_000  # rows streamed from the database per round trip while a CRL is made

_STATE = select(
    t.authorities.c.revocation_revision, t.crls.c.number, t.crls.c.revision, t.crls.c.this_update,
).select_from(t.authorities.outerjoin(t.crls, t.crls.c.authority_id == t.authorities.c.id))


@dataclasses.dataclass(frozen=True)
class _Stored:
    """What the database says of an authority's CRL: the revision it must reflect, and the
    stored CRL's number, revision and thisUpdate (None without one)."""

    revision: int
    number: int | None
    crl_revision: int | None
    this_update: dt.datetime | None

    def fresh(self, now: dt.datetime, period: dt.timedelta) -> bool:
        return (self.number is not None and self.crl_revision == self.revision
                and self.this_update is not None and now < self.this_update + period)


class CRLs:
    """The CA's CRLs: read the current one, make one now (``service.crls``)."""

    def __init__(self, engine: Engine, keyring: KeyRing, state: SnapshotCache, publishing: Publishing,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.engine = engine
        self._keyring = keyring
        self._state = state
        self.publishing = publishing
        self._memo: dict[int, PublishedCRL] = {}  # the last CRL read or made, per authority
        self._making = threading.Lock()  # one CRL made at a time in this process (they share the cache)
        self._cache = EntryCache(cache_entries)
        self._revoked_rows = DirectStatement(REVOKED_ROWS, engine.dialect)

    # -- which authorities ------------------------------------------------------------------

    def signers(self, now: dt.datetime | None = None) -> list[Authority]:
        """The authorities that publish a CRL (root and issuers with a key here), oldest first;
        with ``now``, only those whose certificate is valid then."""
        with read(self.engine) as conn:
            snapshot = self._state.get(conn)
        return [a for a in snapshot.authorities if a.role in CRL_SIGNERS and a.key_file is not None
                and (now is None or a.valid_at(now))]

    def authority(self, name: str) -> Authority:
        """The authority ``name`` when it publishes a CRL; else a NOT_FOUND refusal."""
        for authority in self.signers():
            if authority.name == name:
                return authority
        raise Refusal(Reason.NOT_FOUND, f"no CRL for {name!r}: not an authority of this CA that signs one")

    # -- reading and making -----------------------------------------------------------------

    def current(self, name: str, now: dt.datetime) -> PublishedCRL:
        """The authority's CRL as relying parties should see it at ``now``: the stored one while
        it is fresh (from memory when this process read it already), else a new one."""
        authority = self.authority(name)
        with read(self.engine) as conn:
            stored = _state(conn, authority.id)
            if stored.fresh(now, self.publishing.crl_period):
                known = self._memo.get(authority.id)
                if known is not None and known.number == stored.number:
                    return known
                loaded = self._load(conn, authority)
                if loaded is not None:
                    return loaded
        return self._make(authority, now, forced=False)

    def generate(self, name: str, now: dt.datetime) -> PublishedCRL:
        """A new CRL of the authority ``name`` made now (``ca crl``), stored as its current one."""
        return self._make(self.authority(name), now, forced=True)

    def refresh(self, now: dt.datetime) -> list[PublishedCRL]:
        """Every valid authority's CRL, made again where stale or due (the periodic task)."""
        return [self.current(authority.name, now) for authority in self.signers(now)]

    def after_change(self, authority_id: int, now: dt.datetime) -> None:
        """Make the authority's CRL again after a revocation, hold or release was committed. A
        failure is logged, never raised: the change stands, and the next fetch or the periodic
        task makes the CRL."""
        try:
            for authority in self.signers():
                if authority.id == authority_id:
                    self.current(authority.name, now)
        except Exception as exc:
            log.warning("could not make the CRL again after a revocation (the next fetch or the periodic "
                        "task will): %s", exc)

    def _load(self, conn: Connection, authority: Authority) -> PublishedCRL | None:
        row = conn.execute(select(t.crls).where(t.crls.c.authority_id == authority.id)).first()
        if row is None:
            return None
        published = self._published(authority, row.number, row.revision, row.this_update, row.next_update,
                                     row.entries, row.der)
        self._memo[authority.id] = published
        return published

    def _published(self, authority: Authority, number: int, revision: int, this_update: dt.datetime,
                   next_update: dt.datetime, entries: int, der: bytes) -> PublishedCRL:
        return PublishedCRL(authority=authority.name, number=number, revision=revision, this_update=this_update,
                            next_update=next_update, entries=entries, der=der,
                            refresh_at=min(this_update + self.publishing.crl_period, next_update))

    def _make(self, authority: Authority, now: dt.datetime, *, forced: bool) -> PublishedCRL:
        with self._making:
            with read(self.engine) as conn:
                # the revision before the rows: a revocation committed between the two makes the
                # CRL list more than its revision says, never less (it is then made again)
                stored = _state(conn, authority.id)
                if not forced and stored.fresh(now, self.publishing.crl_period):  # made meanwhile
                    loaded = self._load(conn, authority)
                    if loaded is not None:
                        return loaded
                with _no_cyclic_gc():
                    entries = self._cache.entries(_revoked_rows(conn, self._revoked_rows, authority.id, now))
            number = (stored.number or 0) + 1
            with _no_cyclic_gc():
                signed = sign_crl(issuer_cert=authority.certificate, issuer_key=self._keyring.key(authority),
                                  number=number, this_update=now, next_update=now + self.publishing.crl_validity,
                                  entries=entries)
            with write(self.engine) as conn:
                values = dict(number=number, revision=stored.revision, this_update=signed.this_update,
                              next_update=signed.next_update, entries=signed.entries, der=signed.der, created_at=now)
                if stored.number is None:
                    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
                    stored_now = conn.execute(insert(t.crls).values(authority_id=authority.id, **values)
                                              .on_conflict_do_nothing(index_elements=["authority_id"])).rowcount
                else:
                    stored_now = conn.execute(update(t.crls).where(and_(
                        t.crls.c.authority_id == authority.id, t.crls.c.number == stored.number)).values(**values)
                    ).rowcount
                if stored_now != 1:  # another process stored its CRL first: serve that one
                    winner = self._load(conn, authority)
                    if winner is not None:
                        return winner
                    raise Refusal(Reason.STORE, f"the CRL of {authority.name!r} vanished while it was made")
            published = self._published(authority, number, stored.revision, signed.this_update, signed.next_update,
                                        signed.entries, signed.der)
            self._memo[authority.id] = published
            log.info("CRL %d of %s signed: %d entries, %d bytes (%d entries built)", number, authority.name,
                     signed.entries, len(signed.der), self._cache.built)
            return published


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused: building a million entries allocates millions of
    objects, none in a reference cycle, and each collection it triggers walks all of them again
    (a sixth of the time at 100,000 entries, more beyond). Reference counting still frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _state(conn: Connection, authority_id: int) -> _Stored:
    row = conn.execute(_STATE.where(t.authorities.c.id == authority_id)).first()
    if row is None:
        raise Refusal(Reason.NOT_FOUND, f"authority {authority_id} is missing")
    return _Stored(row.revocation_revision, row.number, row.revision, row.this_update)


_C = t.certificates.c
# A CRL's rows, read from ix_certificates_crl_entries alone (0007)
REVOKED_ROWS = select(_C.serial, _C.revoked_at, _C.revocation_reason).where(
    _C.authority_id == bindparam("authority_id"), _C.revoked_at.is_not(None), _C.not_after >= bindparam("now"),
    _C.status == "issued")


def _revoked_rows(conn: Connection, statement: DirectStatement, authority_id: int, now: dt.datetime
                  ) -> Iterator[tuple[int, dt.datetime, str]]:
    """(serial, revocation date as naive UTC, reason) of the authority's revoked, unexpired
    certificates, streamed from the driver's cursor: a million rows through SQLAlchemy's result
    machinery and the UTC column type cost more than the query. SQLite gives the date as the
    text the column type wrote (naive UTC, ISO format), PostgreSQL as a naive datetime."""
    cursor = statement.run(conn, {"authority_id": authority_id, "now": now})
    parse_date = dt.datetime.fromisoformat
    try:
        while batch := cursor.fetchmany(ROWS_PER_FETCH):
            for serial, revoked_at, reason in batch:
                yield int(serial, 16), revoked_at if isinstance(revoked_at, dt.datetime) else parse_date(revoked_at), \
                    reason
    finally:
        cursor.close()


class CRLPublisher(threading.Thread):
    """``ca serve``'s periodic task: every :func:`check_interval`, each authority's CRL is made
    again when it is stale or its period is over (one cheap query per authority otherwise).

    A daemon thread in the ``ca serve`` parent process, beside the TLS renewer; a failed
    attempt (the database away) is logged and tried at the next check, while the stored CRL,
    valid until its nextUpdate, is still served.
    """

    def __init__(self, open_crls: Callable[[], tuple[CRLs, Callable[[], Any]]], now: Callable[[], dt.datetime],
                 interval: float) -> None:
        super().__init__(name="crl-publisher", daemon=True)
        self._open = open_crls
        self.now = now
        self.interval = interval
        self._stop = threading.Event()

    def run(self) -> None:
        crls: CRLs | None = None
        close: Callable[[], Any] | None = None
        try:
            while True:
                try:
                    if crls is None:
                        crls, close = self._open()
                    crls.refresh(self.now())
                except Exception as exc:
                    log.warning("making the CRLs failed (will retry): %s", exc)
                if self._stop.wait(self.interval):
                    break
        finally:
            if close is not None:
                close()

    def stop(self) -> None:
        self._stop.set()


def check_interval(period: dt.timedelta) -> float:
    """Seconds between two checks of the periodic task: a tenth of the CRL period, at least one
    second and at most a minute, so that a CRL is made again soon after its period ends."""
    return min(max(period.total_seconds() / 10, 1.0), 60.0)
