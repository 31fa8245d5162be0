"""The machine's certificate store on disk (the seeds' personal store and request store).

Layout under the store folder::

    meta.db                 the machine-local database (:mod:`certpulse.machine.schema`)
    certs/<THUMBPRINT>/     one folder per certificate version: key.pem (0600), cert.pem,
                            chain.pem, fullchain.pem; written whole, then renamed into place
    live/<template>         symlink to the current version's folder, swapped atomically
    flights/<id>/key.pem    the key of a request that is at the CA (kept, never regenerated)

A consumer resolves ``live/<template>`` once and reads key and certificate from the folder it
points to: a version folder never changes after it is renamed into place, so a reader never
sees a key with the wrong certificate, whenever the agent is killed. :meth:`recover` repairs a
link left behind by a kill between the database commit and the link swap. Which version a
template's link names is :func:`certpulse.machine.current.current`'s rule, the one rebind and the
planner use too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, Engine, delete, select, update

from certpulse.errors import Reason, Refusal
from certpulse.faults import fault_point
from certpulse.machine import current as current_rule
from certpulse.machine import log as event_log
from certpulse.machine import recovery
from certpulse.machine import schema as t
from certpulse.machine.events import CertFacts, Event, EventDraft, EventId
from certpulse.machine.syslog import SyslogForwarder
from certpulse.pki import template_info
from certpulse.pki.certs import normalize_thumbprint, pem, thumbprint
from certpulse.pki.keys import PrivateKey, load_private_key_pem, private_key_pem
from certpulse.sql.db import read, write


@dataclasses.dataclass(frozen=True)
class CertRecord:
    thumbprint: str
    sha256: str
    subject: str
    names: tuple[str, ...]
    serial: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    template_oid: str | None
    template_name: str | None
    major_version: int
    minor_version: int
    source: str
    policy_id: str | None
    issuer_name: str | None
    has_key: bool
    archived: bool
    replaced_by: str | None
    installed_at: dt.datetime
    policy_url: str | None = None  # the policy server that issued it (None: imported, or not recorded)

    @classmethod
    def from_row(cls, row: Any) -> CertRecord:
        return cls(
            thumbprint=row.thumbprint, sha256=row.sha256, subject=row.subject, names=tuple(json.loads(row.names)),
            serial=row.serial, issuer=row.issuer, not_before=row.not_before, not_after=row.not_after,
            template_oid=row.template_oid, template_name=row.template_name, major_version=row.major_version,
            minor_version=row.minor_version, source=row.source, policy_id=row.policy_id,
            issuer_name=row.issuer_name, has_key=row.has_key, archived=row.archived,
            replaced_by=row.replaced_by, installed_at=row.installed_at, policy_url=row.policy_url,
        )

    def to_dict(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, which deep-copies every value: listing
        # 10,000 certificates spent most of its time copying datetimes it then replaced.
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for key in ("not_before", "not_after", "installed_at"):
            data[key] = data[key].isoformat()
        data["names"] = list(self.names)
        return data


@dataclasses.dataclass(frozen=True)
class Flight:
    id: str
    kind: str
    template_name: str
    policy_url: str
    issuers: tuple[str, ...]
    issuer: str | None
    request_id: int | None
    status: str
    csr_der: bytes
    renewal_of: str | None
    replaces: tuple[str, ...]
    replace_action: str | None
    source: str
    created_at: dt.datetime
    submitted_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Flight:
        return cls(
            id=row.id, kind=row.kind, template_name=row.template_name, policy_url=row.policy_url,
            issuers=tuple(json.loads(row.issuers)), issuer=row.issuer, request_id=row.request_id,
            status=row.status, csr_der=row.csr_der, renewal_of=row.renewal_of,
            replaces=tuple(json.loads(row.replaces)), replace_action=row.replace_action, source=row.source,
            created_at=row.created_at, submitted_at=row.submitted_at,
        )


def _held(conn: Connection, thumbprints: Sequence[str]) -> set[str]:
    """Which of these certificates a binding still serves."""
    if not thumbprints:
        return set()
    rows = conn.execute(select(t.bindings.c.thumbprint).where(t.bindings.c.thumbprint.in_(list(thumbprints))))
    return {r.thumbprint for r in rows}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode``, its bytes synced to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


EventListener = Callable[[Sequence[Event]], None]


class LocalStore:
    """The personal store. Every change writes its lifecycle event in the same transaction
    (``channel`` is the agent's: ``system`` for the machine context, ``user`` otherwise);
    listeners hear about events only after they are committed."""

    def __init__(self, root: Path, *, channel: str = "system", check: bool = True) -> None:
        self.root = root
        self.channel = channel
        self.listeners: list[EventListener] = []
        self.certs_dir = root / "certs"
        self.live_dir = root / "live"
        self.flights_dir = root / "flights"
        for folder in (root, self.certs_dir, self.live_dir, self.flights_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Refused when the store lost its database (:func:`recovery.open_checked`); ``agent repair``
        # opens it unchecked, to re-import what is on disk.
        self.engine: Engine = recovery.open_checked(root) if check else recovery.open_migrated(root)

    def close(self) -> None:
        self.engine.dispose()

    # -- reading ------------------------------------------------------------------------

    def certificates(self, *, include_archived: bool = True, template: str | None = None) -> list[CertRecord]:
        """Every version in the store (by installation), or those of one ``template``."""
        query = select(t.certificates).order_by(t.certificates.c.installed_at, t.certificates.c.thumbprint)
        if not include_archived:
            query = query.where(t.certificates.c.archived.is_(False))
        if template is not None:
            query = query.where(t.certificates.c.template_name == template)
        with read(self.engine) as conn:
            return [CertRecord.from_row(r) for r in conn.execute(query)]

    def find(self, prefix: str) -> CertRecord:
        """A certificate by thumbprint or any unique prefix of it (case-insensitive)."""
        wanted = normalize_thumbprint(prefix)
        if not wanted or any(c not in "0123456789ABCDEF" for c in wanted):
            raise Refusal(Reason.INVALID_ARGUMENT, f"{prefix!r} is not a hexadecimal thumbprint")
        with read(self.engine) as conn:
            rows = conn.execute(select(t.certificates).where(t.certificates.c.thumbprint.like(f"{wanted}%"))).all()
        if not rows:
            raise Refusal(Reason.NOT_FOUND, f"no certificate with thumbprint {wanted}")
        if len(rows) > 1:
            raise Refusal(Reason.INVALID_ARGUMENT, f"thumbprint prefix {wanted} matches {len(rows)} certificates")
        return CertRecord.from_row(rows[0])

    def folder(self, thumbprint_: str) -> Path:
        return self.certs_dir / thumbprint_

    def certificate(self, thumbprint_: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.folder(thumbprint_) / "cert.pem").read_bytes())

    def chain(self, thumbprint_: str) -> list[x509.Certificate]:
        path = self.folder(thumbprint_) / "chain.pem"
        data = path.read_bytes() if path.exists() else b""
        return x509.load_pem_x509_certificates(data) if data.strip() else []

    def key(self, thumbprint_: str) -> PrivateKey:
        return load_private_key_pem((self.folder(thumbprint_) / "key.pem").read_bytes())

    def live_link(self, template: str) -> Path:
        return self.live_dir / template

    # -- installing -----------------------------------------------------------------------

    def install(
        self, *, key: PrivateKey | None, cert: x509.Certificate, chain: list[x509.Certificate], source: str,
        now: dt.datetime, policy_id: str | None = None, issuer_name: str | None = None,
        replaces: tuple[str, ...] = (), flight_id: str | None = None, template_name: str | None = None,
        action: str = "enroll", replace_action: str | None = None, policy_url: str | None = None,
    ) -> CertRecord:
        """Install a certificate version and, in the same transaction, archive what it replaces and
        write the events: 1006 (``action``) when it comes with its key, then for each certificate
        it replaces a 1001 (``replace_action``, default ``renew``) and a 1005."""
        print_ = thumbprint(cert)
        info = template_info.decode(cert)
        self._write_version(print_, key, cert, chain, replaces)
        new_facts = CertFacts.of(cert, template=template_name)
        replaced = [(old, self.facts_if_held(old)) for old in dict.fromkeys(replaces) if old != print_]
        with write(self.engine) as conn:
            exists = conn.execute(select(t.certificates.c.thumbprint)
                                  .where(t.certificates.c.thumbprint == print_)).first()
            drafts: list[EventDraft] = []
            if exists is None:
                conn.execute(t.certificates.insert().values(
                    **t.certificate_columns(cert, info), template_name=template_name, source=source,
                    policy_id=policy_id, issuer_name=issuer_name, has_key=key is not None, archived=False,
                    installed_at=now, policy_url=policy_url))
                if key is not None:
                    drafts.append(EventDraft(EventId.NEW, action=action, new=new_facts))
            held = _held(conn, [old for old, _ in replaced])
            for old, old_facts in replaced:
                # A certificate a binding still serves is replaced but not archived yet: the rebind
                # archives it once no binding serves it any more (release()).
                changed = conn.execute(update(t.certificates).where(
                    t.certificates.c.thumbprint == old, t.certificates.c.archived.is_(False),
                    t.certificates.c.replaced_by.is_(None))
                    .values(archived=old not in held, archived_at=None if old in held else now,
                            replaced_by=print_)).rowcount
                if changed and old_facts is not None:
                    drafts.append(EventDraft(EventId.REPLACE, action=replace_action or "renew", old=old_facts,
                                             new=new_facts))
                    if old not in held:
                        drafts.append(EventDraft(EventId.ARCHIVED, action="cleanup", old=old_facts,
                                                 detail=f"replaced by {print_}"))
            if flight_id is not None:
                conn.execute(delete(t.flights).where(t.flights.c.id == flight_id))
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)
        fault_point("before-link", self.root)
        if template_name:
            self._repair_link(template_name)  # the new version, unless a more recent one is current
        if flight_id is not None:
            shutil.rmtree(self.flights_dir / flight_id, ignore_errors=True)
        return self.find(print_)

    def facts(self, print_: str) -> CertFacts:
        """What an event says about a stored certificate."""
        record = self.find(print_)
        return CertFacts.of(self.certificate(record.thumbprint), template=record.template_name)

    def facts_if_held(self, print_: str | None) -> CertFacts | None:
        """Event facts of a stored certificate, or None when there is none (or it is gone)."""
        if not print_:
            return None
        try:
            return self.facts(print_)
        except (Refusal, OSError, ValueError):
            return None

    def announce(self, events: Sequence[Event]) -> None:
        """Tell listeners (syslog, the task dispatcher) about committed events; never fails the change."""
        if not events:
            return
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                listener(events)

    def record(self, drafts: Iterable[EventDraft], now: dt.datetime) -> list[Event]:
        """Write events that accompany no store change (expiry, export, failures)."""
        drafts = list(drafts)
        if not drafts:
            return []
        with write(self.engine) as conn:
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)
        return events

    def _write_version(self, print_: str, key: PrivateKey | None, cert: x509.Certificate,
                       chain: list[x509.Certificate], replaces: tuple[str, ...]) -> None:
        final = self.folder(print_)
        if final.exists():
            return  # a version folder never changes once in place (e.g. a resumed install)
        staging = self.certs_dir / f".{print_}.{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        owner = self._key_owner(replaces)
        cert_pem = pem(cert).encode()
        chain_pem = "".join(pem(c) for c in chain).encode()
        if key is not None:
            write_file(staging / "key.pem", private_key_pem(key), 0o600)
            if owner is not None and os.geteuid() == 0:
                os.chown(staging / "key.pem", owner[0], owner[1])
        write_file(staging / "cert.pem", cert_pem, 0o644)
        write_file(staging / "chain.pem", chain_pem, 0o644)
        write_file(staging / "fullchain.pem", cert_pem + chain_pem, 0o644)
        os.chmod(staging, 0o755 if key is None else 0o711)
        os.rename(staging, final)
        _fsync_dir(self.certs_dir)

    def _key_owner(self, replaces: tuple[str, ...]) -> tuple[int, int] | None:
        """Owner and group of the key being replaced: carried over to its successor (mode stays 0600)."""
        for old in replaces:
            path = self.folder(old) / "key.pem"
            with contextlib.suppress(OSError):
                st = path.stat()
                return st.st_uid, st.st_gid
        return None

    def _point_live(self, template: str, print_: str) -> None:
        link = self.live_link(template)
        tmp = self.live_dir / f".{template}.{secrets.token_hex(4)}"
        os.symlink(os.path.join("..", "certs", print_), tmp)
        os.replace(tmp, link)
        _fsync_dir(self.live_dir)

    def recover(self, now: dt.datetime) -> None:
        """Repair what a kill can leave: half-written version folders and stale live links."""
        for leftover in list(self.certs_dir.glob(".*")) + list(self.live_dir.glob(".*")):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        recovery.settle_flights(self, now)  # no request key outlives its row, decided without a clock
        recovery.finish_deletions(self)
        self._repair_links()

    def repair_links(self) -> None:
        """Point every template's live link at its current version."""
        self._repair_links()

    def current(self, template: str) -> CertRecord | None:
        """The template's current certificate (:func:`certpulse.machine.current.current`)."""
        return current_rule.current(self.certificates(include_archived=False, template=template), template)

    def _repair_link(self, template: str) -> None:
        """Point the template's live link at its current version (if it has one)."""
        record = self.current(template)
        if record is not None:
            self._point_live_if_moved(template, record.thumbprint)

    def point_live(self, template: str, print_: str) -> None:
        """Point the template's live link at ``print_`` (a repair: :mod:`certpulse.machine.live_repair`)."""
        self._point_live_if_moved(template, print_)

    def _point_live_if_moved(self, template: str, print_: str) -> None:
        link = self.live_link(template)
        if not link.is_symlink() or os.readlink(link) != os.path.join("..", "certs", print_):
            self._point_live(template, print_)

    def _repair_links(self) -> None:
        """Point every template's live link at its current version (a replaced one never is,
        even while a binding still serves it)."""
        current = current_rule.current_by_template(self.certificates(include_archived=False))
        for template, record in current.items():
            self._point_live_if_moved(template, record.thumbprint)

    def archive(self, print_: str, now: dt.datetime, *, action: str = "cleanup") -> None:
        facts = self.facts_if_held(print_)
        with write(self.engine) as conn:
            changed = conn.execute(update(t.certificates).where(
                t.certificates.c.thumbprint == print_, t.certificates.c.archived.is_(False))
                .values(archived=True, archived_at=now)).rowcount
            drafts = [EventDraft(EventId.ARCHIVED, action=action, old=facts)] if changed and facts else []
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)

    def served_by_binding(self, print_: str) -> bool:
        with read(self.engine) as conn:
            return bool(_held(conn, [print_]))

    def release(self, print_: str, now: dt.datetime) -> bool:
        """Archive a replaced certificate that no binding serves any more (its 1005). True when it
        was archived now."""
        facts = self.facts_if_held(print_)
        with write(self.engine) as conn:
            if _held(conn, [print_]):
                return False
            changed = conn.execute(update(t.certificates).where(
                t.certificates.c.thumbprint == print_, t.certificates.c.archived.is_(False),
                t.certificates.c.replaced_by.is_not(None)).values(archived=True, archived_at=now)).rowcount
            drafts = [EventDraft(EventId.ARCHIVED, action="cleanup", old=facts,
                                 detail="replaced, and no binding serves it any more")] if changed and facts else []
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)
        return bool(changed)

    def replace(self, old: str, new: str, now: dt.datetime) -> tuple[CertRecord, CertRecord]:
        """``cert replace OLD NEW`` (the seed's Replace-Certificate): OLD is archived as replaced by
        NEW, with a 1001 (action ``replace``) and a 1005."""
        old_record, new_record = self.find(old), self.find(new)
        if old_record.thumbprint == new_record.thumbprint:
            raise Refusal(Reason.INVALID_ARGUMENT, "a certificate cannot replace itself")
        if old_record.archived or old_record.replaced_by:
            raise Refusal(Reason.CONFLICT, f"{old_record.thumbprint} is already replaced")
        if new_record.archived:
            raise Refusal(Reason.CONFLICT, f"{new_record.thumbprint} is archived: it cannot replace anything")
        old_facts, new_facts = self.facts(old_record.thumbprint), self.facts(new_record.thumbprint)
        with write(self.engine) as conn:
            held = bool(_held(conn, [old_record.thumbprint]))
            changed = conn.execute(update(t.certificates).where(
                t.certificates.c.thumbprint == old_record.thumbprint, t.certificates.c.archived.is_(False))
                .values(archived=not held, archived_at=None if held else now,
                        replaced_by=new_record.thumbprint)).rowcount
            if not changed:
                raise Refusal(Reason.CONFLICT, f"{old_record.thumbprint} was archived meanwhile")
            drafts = [EventDraft(EventId.REPLACE, action="replace", old=old_facts, new=new_facts)]
            if not held:
                drafts.append(EventDraft(EventId.ARCHIVED, action="replace", old=old_facts,
                                         detail=f"replaced by {new_record.thumbprint}"))
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)
        self._repair_links()
        return self.find(old_record.thumbprint), new_record

    def delete(self, print_: str, now: dt.datetime, *, action: str = "cleanup", force: bool = False) -> CertRecord:
        """Remove a certificate and its key, with its 1004 (``action``: cleanup, manual, move). One
        that a binding still serves is kept unless ``force``: the service would lose its files."""
        record = self.find(print_)
        facts = self.facts_if_held(record.thumbprint)
        with write(self.engine) as conn:
            if not force and _held(conn, [record.thumbprint]):
                raise Refusal(Reason.CONFLICT, f"a binding still serves {record.thumbprint}: it is kept until "
                                               "the binding has moved to its successor (or use --force)")
            changed = conn.execute(delete(t.certificates)
                                   .where(t.certificates.c.thumbprint == record.thumbprint)).rowcount
            drafts = [EventDraft(EventId.DELETED, action=action, old=facts)] if changed and facts else []
            events = event_log.append(conn, drafts, now=now, channel=self.channel)
        self.announce(events)
        if record.template_name:
            link = self.live_link(record.template_name)
            if link.is_symlink() and os.readlink(link).endswith(record.thumbprint):
                link.unlink()
        shutil.rmtree(self.folder(record.thumbprint), ignore_errors=True)
        self._repair_links()
        return record

    # -- expiry notices ------------------------------------------------------------------

    def expiry_raised(self) -> frozenset[tuple[str, str]]:
        """(thumbprint, threshold) pairs whose 1003/1002 was raised already."""
        with read(self.engine) as conn:
            rows = conn.execute(select(t.expiry_notices.c.thumbprint, t.expiry_notices.c.threshold)).all()
        return frozenset((r.thumbprint, r.threshold) for r in rows)

    def raise_expiry(self, notices: Sequence[tuple[str, str, EventDraft]], now: dt.datetime) -> list[Event]:
        """Write each (thumbprint, threshold, event) with the record that it was raised, in one step:
        an event is never raised twice, and never recorded as raised without being written."""
        if not notices:
            return []
        with write(self.engine) as conn:
            events = event_log.append(conn, [draft for _, _, draft in notices], now=now, channel=self.channel)
            for (print_, threshold, _), event in zip(notices, events, strict=True):
                conn.execute(t.expiry_notices.insert().values(
                    thumbprint=print_, threshold=threshold, raised_at=now, event_seq=event.seq))
        self.announce(events)
        return events

    # -- flights (requests at the CA) -----------------------------------------------------

    def begin_flight(self, *, kind: str, template: str, policy_url: str, issuers: tuple[str, ...],
                     key: PrivateKey, csr: x509.CertificateSigningRequest, renewal_of: str | None,
                     replaces: tuple[str, ...], replace_action: str | None, source: str,
                     now: dt.datetime) -> Flight:
        """Persist the request, then its key, before anything is sent: the row is committed first
        and the key renamed into ``flights/<id>/`` whole, so that recovery can tell from state alone
        that a key without a row is a leftover and a row without a key was never sent
        (:mod:`certpulse.machine.recovery`)."""
        flight_id = secrets.token_hex(16)
        with recovery.flights_lock(self.root):
            with write(self.engine) as conn:
                conn.execute(t.flights.insert().values(
                    id=flight_id, kind=kind, template_name=template, policy_url=policy_url,
                    issuers=json.dumps(issuers), status="created",
                    csr_der=csr.public_bytes(serialization.Encoding.DER), renewal_of=renewal_of,
                    replaces=json.dumps(replaces), replace_action=replace_action, source=source, created_at=now))
            fault_point("flight-recorded", self.root)
            staging = self.flights_dir / f".{flight_id}"
            staging.mkdir(mode=0o700)
            write_file(staging / "key.pem", private_key_pem(key), 0o600)
            os.rename(staging, self.flights_dir / flight_id)
            _fsync_dir(self.flights_dir)
        return self.flight(flight_id)

    def flight(self, flight_id: str) -> Flight:
        with read(self.engine) as conn:
            row = conn.execute(select(t.flights).where(t.flights.c.id == flight_id)).one()
        return Flight.from_row(row)

    def flights(self) -> list[Flight]:
        with read(self.engine) as conn:
            return [Flight.from_row(r) for r in conn.execute(select(t.flights).order_by(t.flights.c.created_at))]

    def flight_key(self, flight_id: str) -> PrivateKey:
        return load_private_key_pem((self.flights_dir / flight_id / "key.pem").read_bytes())

    def mark_pending(self, flight_id: str, issuer: str, request_id: int, now: dt.datetime) -> None:
        with write(self.engine) as conn:
            conn.execute(update(t.flights).where(t.flights.c.id == flight_id).values(
                status="pending", issuer=issuer, request_id=request_id, submitted_at=now))

    def drop_flight(self, flight_id: str, now: dt.datetime | None = None, event: EventDraft | None = None) -> None:
        """Forget a request (and its key); with ``event``, the event that says why, in the same step."""
        with write(self.engine) as conn:
            gone = conn.execute(delete(t.flights).where(t.flights.c.id == flight_id)).rowcount
            events = (event_log.append(conn, [event], now=now, channel=self.channel)
                      if event is not None and gone and now is not None else [])
        self.announce(events)
        shutil.rmtree(self.flights_dir / flight_id, ignore_errors=True)

    # -- state ----------------------------------------------------------------------------

    def get_state(self, name: str) -> Any:
        with read(self.engine) as conn:
            value = conn.execute(select(t.state.c.value).where(t.state.c.name == name)).scalar()
        return json.loads(value) if value is not None else None

    def set_state(self, name: str, value: Any) -> None:
        encoded = json.dumps(value, default=str)
        with write(self.engine) as conn:
            if conn.execute(update(t.state).where(t.state.c.name == name).values(value=encoded)).rowcount == 0:
                conn.execute(t.state.insert().values(name=name, value=encoded))


def open_store(directory: Path, *, channel: str, syslog_address: str | None = None,
               syslog_facility: str = "daemon", check: bool = True) -> LocalStore:
    """The store of the agent folder ``directory`` (``<directory>/store``), writing events on
    ``channel``; with ``syslog_address`` its events also go to syslog, whichever command raised
    them. ``check=False`` opens a store that lost its database (for ``agent repair``)."""
    store = LocalStore(directory / "store", channel=channel, check=check)
    if syslog_address:
        store.listeners.append(SyslogForwarder(syslog_address, syslog_facility))
    return store
