"""What the store decides from its own state after a kill or a lost database, with no clock.

Two rules, so that no private key outlives its record and no lost record goes unnoticed:

* **Flights.** A request's row is committed before its key is written, and the key is written
  under a hidden staging name and renamed into ``flights/<id>/`` (:func:`flights_lock` held
  throughout, by :meth:`LocalStore.begin_flight` and by :func:`settle_flights`). So a key in
  ``flights/`` always has its row, except after a kill between the commit of a removal and the
  removal of the folder; and a row without its key was never sent. At every pulse
  :func:`settle_flights` removes every key that has no row and drops every row that has no key:
  state alone decides, where an age rule against the wall clock used to keep a key for hours.
* **A lost database.** ``meta.db`` deleted, emptied or without a single record, while ``certs/``
  still holds certificate folders, is not a new store: enrolling afresh would leave the old keys
  unrecorded and unmanaged. :func:`open_checked` refuses to open such a store, and a damaged
  ``meta.db`` (not a SQLite database), naming the count and ``certpulse agent repair``, which
  (:func:`repair`) moves a damaged database aside and re-imports every folder whose certificate
  and key belong together, in one transaction, never deleting a key.

A folder without a record whose deletion (event 1004) is in the log is the rest of a deletion a
kill interrupted: :func:`finish_deletions` removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.util.exc import CommandError
from cryptography import x509
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DatabaseError

from certpulse.errors import Reason, Refusal
from certpulse.machine import log as event_log
from certpulse.machine import schema as t
from certpulse.machine.db import DATABASE_NAME, MIGRATIONS
from certpulse.machine.events import CertFacts, EventDraft, EventId
from certpulse.pki import template_info
from certpulse.pki.certs import thumbprint
from certpulse.pki.keys import key_matches, load_private_key_pem
from certpulse.sql.db import make_engine, migrate, read, write

if TYPE_CHECKING:
    from certpulse.machine.certstore import LocalStore

log = logging.getLogger("certpulse.agent")

FLIGHTS_LOCK = "flights.lock"
REPAIR_COMMAND = "certpulse agent repair"
_THUMBPRINT = re.compile(r"[0-9A-F]{40}")


# -- flights --------------------------------------------------------------------------------------

@contextlib.contextmanager
def flights_lock(store_root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<store>/flights.lock``: held while a flight's row and key are
    written, and while recovery judges them, so recovery never sees a flight half begun by a
    ``cert request`` running beside the daemon. A killed holder releases it with its descriptors."""
    fd = os.open(store_root / FLIGHTS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a commit and a file write at most
        yield
    finally:
        os.close(fd)


def settle_flights(store: LocalStore, now: dt.datetime) -> None:
    """Remove request keys that have no row, drop rows that have no key (see the module)."""
    with flights_lock(store.root):
        for leftover in store.flights_dir.glob(".*"):  # a key staged when the writer was killed
            _remove(leftover)
        # Folders first, then rows: a row is committed before its folder exists, so a folder
        # listed here has its row in the listing that follows, unless it is being removed.
        folders = [p for p in store.flights_dir.iterdir() if not p.name.startswith(".")]
        flights = {f.id: f for f in store.flights()}
        for folder in folders:
            if folder.name not in flights:
                log.info("removed the request key %s: no request records it", folder.name)
                _remove(folder)
        for flight in flights.values():
            if (store.flights_dir / flight.id / "key.pem").is_file():
                continue
            if flight.status == "pending":
                log.warning("request %s (%s) is pending but its key is gone: dropped", flight.request_id,
                            flight.template_name)
                store.drop_flight(flight.id, now, EventDraft(
                    EventId.PENDING_DROPPED, template=flight.template_name,
                    old=store.facts_if_held(flight.renewal_of), detail="its private key is gone from the store",
                    data={"request_id": flight.request_id, "issuer": flight.issuer}))
            else:  # recorded, then killed before its key was written: never sent
                log.info("dropped the request for %s that was recorded but never sent", flight.template_name)
                store.drop_flight(flight.id)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- a lost or damaged database -------------------------------------------------------------------

def version_folders(certs_dir: Path) -> list[Path]:
    """The certificate folders in ``certs/`` (staging folders are hidden and not counted)."""
    try:
        return sorted(p for p in certs_dir.iterdir()
                      if not p.name.startswith(".") and p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def _lost(store_root: Path, state: str, count: int) -> Refusal:
    return Refusal(Reason.STORE, (
        f"the store's database {store_root / DATABASE_NAME} {state}, but {store_root / 'certs'} holds {count} "
        f"certificate folder{'s' if count != 1 else ''} it has no record of: refusing to start over as a new "
        f"store (that would enroll again and leave their keys unmanaged); run '{REPAIR_COMMAND} --dir "
        f"{store_root.parent}' to re-import them"))


def _damaged(store_root: Path, why: object) -> Refusal:
    return Refusal(Reason.STORE, (
        f"the store's database {store_root / DATABASE_NAME} is damaged ({why}); it is left as it is: run "
        f"'{REPAIR_COMMAND} --dir {store_root.parent}' to move it aside and re-import the certificate folders"))


def open_migrated(store_root: Path) -> Engine:
    """The engine of ``meta.db``, migrated; a damaged database is refused, never overwritten."""
    engine = make_engine(f"sqlite:///{(store_root / DATABASE_NAME).resolve()}", pool_size=2)
    try:
        migrate(engine, MIGRATIONS)
    except DatabaseError as exc:
        engine.dispose()
        raise _damaged(store_root, exc.orig) from None
    except CommandError as exc:  # a sound database this version cannot migrate (a newer one's)
        engine.dispose()
        raise Refusal(Reason.STORE, f"the store's database {store_root / DATABASE_NAME} has a schema this version "
                                    f"of certpulse does not know ({exc}); it is left as it is") from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def open_checked(store_root: Path) -> Engine:
    """Open ``meta.db`` unless the store lost it: refused when the database is missing, empty or
    holds no certificate and no request while ``certs/`` holds folders it has no record of (a
    missing one is then not created), and when it is damaged."""
    path = store_root / DATABASE_NAME
    if not path.exists() or path.stat().st_size == 0:
        count = len(version_folders(store_root / "certs"))
        if count:
            raise _lost(store_root, "is missing" if not path.exists() else "is empty", count)
    engine = open_migrated(store_root)
    try:
        unrecorded = _unrecorded_in_empty(engine, store_root / "certs")
    except DatabaseError as exc:
        engine.dispose()
        raise _damaged(store_root, exc.orig) from None
    except BaseException:
        engine.dispose()
        raise
    if unrecorded:
        engine.dispose()
        raise _lost(store_root, "has no records", len(unrecorded))
    return engine


def _unrecorded_in_empty(engine: Engine, certs_dir: Path) -> list[Path]:
    """Folders nothing explains in a database without a certificate or a request: empty."""
    with read(engine) as conn:
        certificates = conn.execute(select(func.count()).select_from(t.certificates)).scalar_one()
        flights = conn.execute(select(func.count()).select_from(t.flights)).scalar_one()
    if certificates or flights:
        return []
    folders = version_folders(certs_dir)
    deleted = _deleted(engine, [p.name for p in folders])
    return [p for p in folders if p.name not in deleted]


def _deleted(engine: Engine, prints: list[str]) -> set[str]:
    """Which of these thumbprints the log says were deleted (event 1004)."""
    if not prints:
        return set()
    with read(engine) as conn:
        rows = conn.execute(select(t.events.c.old_thumbprint).where(
            t.events.c.event_id == int(EventId.DELETED), t.events.c.old_thumbprint.in_(prints)))
        return {r.old_thumbprint for r in rows}


def unrecorded_folders(store: LocalStore) -> list[Path]:
    """Certificate folders with no record (a folder being installed right now included)."""
    with read(store.engine) as conn:
        known = {r.thumbprint for r in conn.execute(select(t.certificates.c.thumbprint))}
    return [p for p in version_folders(store.certs_dir) if p.name not in known]


def finish_deletions(store: LocalStore) -> list[Path]:
    """Remove folders whose record a deletion removed before a kill stopped it removing the files;
    warn about the others that have no record (``agent repair`` imports them). Returns those."""
    orphans = unrecorded_folders(store)
    deleted = _deleted(store.engine, [p.name for p in orphans])
    for folder in orphans:
        if folder.name in deleted:
            log.info("removed %s: its certificate was deleted before the agent stopped", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
    left = [p for p in orphans if p.name not in deleted]
    if left and not store.flights():  # with a request in flight, a folder may be its install under way
        log.warning("%d certificate folder(s) in %s have no record; run '%s' to import them", len(left),
                    store.certs_dir, REPAIR_COMMAND)
    return left


def set_aside_damaged(store_root: Path, now: dt.datetime) -> Path | None:
    """Move a ``meta.db`` that is not a sound SQLite database to ``meta.db.damaged-<time>`` (with
    its journal files), so that a new one can be built; the path it was moved to, or None."""
    path = store_root / DATABASE_NAME
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = str(connection.execute("PRAGMA quick_check").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.Error as exc:
        verdict = str(exc)
    if verdict == "ok":
        return None
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = store_root / f"{DATABASE_NAME}.damaged-{stamp}"
    serial = 1
    while target.exists():
        serial += 1
        target = store_root / f"{DATABASE_NAME}.damaged-{stamp}-{serial}"
    for suffix in ("-wal", "-shm", ""):  # the database last: a kill in between leaves it to judge again
        journal = store_root / f"{DATABASE_NAME}{suffix}"
        if journal.exists():
            os.rename(journal, Path(f"{target}{suffix}"))
    log.warning("moved the damaged %s aside to %s (%s)", path, target, verdict)
    return target


# -- repair ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Known:
    """What the agent knows of a template from its policy: name, server and policy."""

    name: str
    policy_url: str | None = None
    policy_id: str | None = None


@dataclasses.dataclass
class RepairReport:
    moved_aside: str | None = None
    imported: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    not_imported: list[dict[str, str]] = dataclasses.field(default_factory=list)
    request_keys_without_record: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Found:
    folder: Path
    cert: x509.Certificate
    has_key: bool


def _examine(folder: Path) -> _Found | str:
    """The folder's certificate, or why it cannot be imported."""
    if not _THUMBPRINT.fullmatch(folder.name):
        return "its name is not a certificate thumbprint"
    try:
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    except OSError as exc:
        return f"cert.pem cannot be read: {exc.strerror}"
    except ValueError:
        return "cert.pem is not a PEM certificate"
    if thumbprint(cert) != folder.name:
        return f"cert.pem is the certificate {thumbprint(cert)}, not the one the folder is named for"
    key_path = folder / "key.pem"
    if not key_path.exists():
        return _Found(folder, cert, has_key=False)  # a version stored without its key
    try:
        key = load_private_key_pem(key_path.read_bytes())
    except OSError as exc:
        return f"key.pem cannot be read: {exc.strerror}"
    except (ValueError, TypeError, Refusal):
        return "key.pem is not a private key this agent can use"
    if not key_matches(key, cert.public_key()):
        return "key.pem does not belong to cert.pem"
    return _Found(folder, cert, has_key=True)


def _linked(store: LocalStore) -> dict[str, str]:
    """Thumbprint -> template, from the live links left on disk."""
    found: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for link in store.live_dir.iterdir():
            if link.is_symlink() and not link.name.startswith("."):
                found[Path(os.readlink(link)).name] = link.name
    return found


def repair(store: LocalStore, now: dt.datetime, *, known: Mapping[str, Known],
           default_policy_url: str | None = None, moved_aside: Path | None = None) -> RepairReport:
    """Re-import every certificate folder that has no record, in one transaction (1006, action
    ``repair``, for each one with its key), and point the live links by the current rule.

    A folder is imported when its certificate is the one it is named for and its key (if it has
    one) belongs to it; any other is reported with the reason and left as it is: no file is
    deleted. The template is named from the policy the agent knows (``known``, by template OID),
    else from the live link that names the folder, else from another version of the same template
    OID that a link names. Run again, it imports nothing new."""
    report = RepairReport(moved_aside=str(moved_aside) if moved_aside else None)
    found: list[_Found] = []
    for folder in unrecorded_folders(store):
        examined = _examine(folder)
        if isinstance(examined, str):
            report.not_imported.append({"folder": str(folder), "reason": examined})
        else:
            found.append(examined)
    linked = _linked(store)
    names_by_oid: dict[str, str] = {}
    for item in found:
        info = template_info.decode(item.cert)
        if info is not None and item.folder.name in linked:
            names_by_oid.setdefault(info.oid, linked[item.folder.name])
    drafts: list[EventDraft] = []
    with write(store.engine) as conn:
        for item in found:
            cert = item.cert
            info = template_info.decode(cert)
            policy = known.get(info.oid) if info is not None else None
            name = (policy.name if policy else linked.get(item.folder.name)
                    or (names_by_oid.get(info.oid) if info is not None else None))
            print_ = item.folder.name
            conn.execute(t.certificates.insert().values(  # the folder's name is the cert's thumbprint (examined)
                **t.certificate_columns(cert, info), template_name=name,
                source="auto" if info is not None else "manual", policy_id=policy.policy_id if policy else None,
                issuer_name=None, has_key=item.has_key, archived=False, installed_at=now,
                policy_url=(policy.policy_url if policy else None) or default_policy_url))
            if item.has_key:
                drafts.append(EventDraft(EventId.NEW, action="repair", new=CertFacts.of(cert, template=name),
                                         detail=f"re-imported from {item.folder} by agent repair"))
            report.imported.append({"thumbprint": print_, "template": name, "has_key": item.has_key,
                                    "not_after": cert.not_valid_after_utc.isoformat()})
        events = event_log.append(conn, drafts, now=now, channel=store.channel)
    store.announce(events)
    store.repair_links()
    with read(store.engine) as conn:
        flights = {r.id for r in conn.execute(select(t.flights.c.id))}
    report.request_keys_without_record = sum(
        1 for p in store.flights_dir.iterdir() if not p.name.startswith(".") and p.name not in flights)
    return report
