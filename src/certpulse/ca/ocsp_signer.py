"""The delegated OCSP signers: one short-lived certificate per issuing authority, made and renewed
by the CA itself.

Why delegated: the OCSP responder signs thousands of answers; it must not need the issuing CA's
own key for that (RFC 6960 4.2.2.2). Each issuing authority certifies a key of its own for the
one purpose id-kp-OCSPSigning, with id-pkix-ocsp-nocheck (a client does not ask about the
responder's certificate: its short life, ``ocsp_signer_validity`` in ``ca.toml``, is its
revocation). Clients verify a response with the issuer alone, since the response carries the
signer's certificate.

Only issuing authorities (role ``issuer``) get one, enabled or not (a disabled issuer's
certificates are still out there); the root does not: what the root signs (issuing CAs) is not
in the ``certificates`` table and is published by the root's CRL, so a request about a root's
child is answered ``unauthorized``.

Like every certificate the CA makes, the signer's serial is recorded in ``certificates`` before
it is signed (template ``_ocsp-signer``, as the API server's own certificate uses
``_api-server``), then the certificate and a row in ``ocsp_signers``; the issuance is audited
(``ocsp-signer-issued``). The key goes to the CA's ``keys/`` folder (0600) before the row that
names it is committed.

``ca serve``'s parent process makes sure every issuer has one before the workers start and
renews it from a :class:`SignerRenewer` thread when a third of its life is left (the same thread
deletes the keys of expired signers); workers load
the newest valid row (``ca/ocsp.py``) and, when none is valid (a process that never went
through ``ca serve``, e.g. a test calling the route in-process), make one themselves. Two
processes doing so at once make two signers: harmless, the newest is used.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from sqlalchemy import Connection, select

from certpulse.ca.model import Authority
from certpulse.ca.storage import schema as t
from certpulse.pki.build import backdated_start, inclusive_not_after, random_serial, signature_hash
from certpulse.pki.certs import der, serial_hex, thumbprint
from certpulse.pki.keys import generate_private_key, write_private_key
from certpulse.pki.ocsp import ocsp_signer_builder
from certpulse.sql.db import read, write

if TYPE_CHECKING:  # the service holds the responder, which issues signers: no import at run time
    from certpulse.ca.service import CAService

SIGNER_TEMPLATE = "_ocsp-signer"  # the template name its records carry: no real template issues it
SIGNER_KEY = "ec-p256"
RENEW_WHEN_LEFT = 3  # renew when less than 1/RENEW_WHEN_LEFT of the lifetime remains
SERIAL_ATTEMPTS = 5

log = logging.getLogger("certpulse.serve")


@dataclasses.dataclass(frozen=True)
class SignerRecord:
    """A row of ``ocsp_signers``, its certificate parsed."""

    id: int
    authority_id: int
    certificate: x509.Certificate
    key_file: str
    not_before: dt.datetime
    not_after: dt.datetime

    def renewal_due(self, now: dt.datetime) -> bool:
        """Less than a third of its life left, or not valid yet (a clock that went back)."""
        lifetime = self.not_after - self.not_before
        return now < self.not_before or self.not_after - now < lifetime / RENEW_WHEN_LEFT


def signing_authorities(authorities: tuple[Authority, ...], now: dt.datetime) -> list[Authority]:
    """The authorities that get a delegated signer: issuers with a key here, valid at ``now``."""
    return [a for a in authorities if a.role == "issuer" and a.key_file is not None and a.valid_at(now)]


def newest_signers(conn: Connection, now: dt.datetime) -> dict[int, SignerRecord]:
    """Per authority id, the valid signer that lives longest (the newest)."""
    rows = conn.execute(select(t.ocsp_signers).where(t.ocsp_signers.c.not_after > now)
                        .where(t.ocsp_signers.c.not_before <= now).order_by(t.ocsp_signers.c.not_after)).all()
    newest: dict[int, SignerRecord] = {}
    for row in rows:  # ordered by not_after: the last one per authority wins
        newest[row.authority_id] = SignerRecord(
            id=row.id, authority_id=row.authority_id,
            certificate=x509.load_der_x509_certificate(row.certificate_der), key_file=row.key_file,
            not_before=row.not_before, not_after=row.not_after)
    return newest


def ensure_signers(service: CAService, now: dt.datetime, *, renew: bool = True) -> list[SignerRecord]:
    """Issue a signer for every :func:`signing_authorities` that has no valid one, whose newest
    one's key is not in the keys folder, or (``renew``) whose newest one is due for renewal; the
    signers issued."""
    with read(service.engine) as conn:
        snap = service.state.get(conn)
        current = newest_signers(conn, now)
    issued = []
    for authority in signing_authorities(snap.authorities, now):
        held = current.get(authority.id)
        if held is None or (renew and held.renewal_due(now)) \
                or not (service.keyring.directory / held.key_file).exists():
            issued.append(issue_signer(service, authority, now))
    return issued


def remove_expired_keys(service: CAService, now: dt.datetime) -> list[str]:
    """Delete the key files of signers whose certificate has expired (the rows stay, for the
    record): an expired signer's answers are refused by every client, and a key that signs
    nothing anyone accepts is better gone. The files removed."""
    with read(service.engine) as conn:
        expired = set(conn.execute(select(t.ocsp_signers.c.key_file).where(t.ocsp_signers.c.not_after <= now))
                      .scalars())
        alive = set(conn.execute(select(t.ocsp_signers.c.key_file).where(t.ocsp_signers.c.not_after > now))
                    .scalars())
    removed = []
    for key_file in sorted(expired - alive):
        path = service.keyring.directory / key_file
        if path.parent == service.keyring.directory and path.name.startswith("ocsp-") and path.exists():
            path.unlink()
            removed.append(key_file)
    return removed


def issue_signer(service: CAService, authority: Authority, now: dt.datetime) -> SignerRecord:
    """A new delegated signer for ``authority``: key written (0600), serial reserved, certificate
    signed, recorded and audited, in one transaction."""
    validity = service.publishing.ocsp_signer_validity
    issuer_cert = authority.certificate
    issuer_key = service.keyring.key(authority)
    key = generate_private_key(SIGNER_KEY)
    start = backdated_start(now, validity, floor=issuer_cert.not_valid_before_utc)
    not_after = min(inclusive_not_after(start, validity), issuer_cert.not_valid_after_utc)
    builder = ocsp_signer_builder(authority_name=authority.name, public_key=key.public_key(),
                                  issuer_cert=issuer_cert, issuer_key=issuer_key, not_before=start,
                                  not_after=not_after)
    with write(service.engine) as conn:
        serial, certificate_id = _reserve_serial(conn, authority, now, start, not_after)
        cert = builder.serial_number(serial).sign(issuer_key, signature_hash(issuer_key))
        key_file = f"ocsp-{authority.name}-{serial_hex(serial)[:16]}.key"
        write_private_key(service.keyring.directory / key_file, key)  # before the row that names it commits
        conn.execute(t.certificates.update().where(t.certificates.c.id == certificate_id).values(
            status="issued", der=der(cert), thumbprint=thumbprint(cert)))
        signer_id = conn.execute(t.ocsp_signers.insert().values(
            authority_id=authority.id, serial=serial_hex(serial), certificate_der=der(cert), key_file=key_file,
            not_before=start, not_after=not_after, created_at=now).returning(t.ocsp_signers.c.id)).scalar_one()
        service.audit.record(conn, now, "operator:serve", "ocsp-signer-issued", template=SIGNER_TEMPLATE,
                             serial=serial_hex(serial), names=[cert.subject.rfc4514_string()],
                             detail=f"delegated OCSP signer of {authority.name}; valid until {not_after.isoformat()}")
    log.info("OCSP signer of %s issued: serial %s, valid until %s", authority.name, serial_hex(serial),
             not_after.isoformat())
    return SignerRecord(id=signer_id, authority_id=authority.id, certificate=cert, key_file=key_file,
                        not_before=start, not_after=not_after)


def _reserve_serial(conn: Connection, authority: Authority, now: dt.datetime, start: dt.datetime,
                    not_after: dt.datetime) -> tuple[int, int]:
    """A fresh serial recorded (status ``reserved``) at ``authority`` before anything is signed
    with it; the serial and the row's id."""
    for _ in range(SERIAL_ATTEMPTS):
        serial = random_serial()
        taken = conn.execute(select(t.certificates.c.id).where(t.certificates.c.authority_id == authority.id)
                             .where(t.certificates.c.serial == serial_hex(serial))).first()
        if taken is not None:
            continue
        row_id = conn.execute(t.certificates.insert().values(
            authority_id=authority.id, serial=serial_hex(serial), template_name=SIGNER_TEMPLATE,
            subject=f"CN={authority.name} OCSP responder", names="[]", not_before=start, not_after=not_after,
            status="reserved", created_at=now).returning(t.certificates.c.id)).scalar_one()
        return serial, int(row_id)
    raise RuntimeError("could not reserve a unique serial number")  # 159 random bits: never


def check_interval(lifetime: dt.timedelta) -> float:
    """Seconds between two renewal checks: a hundredth of the lifetime, at least one second and
    at most an hour (a check that finds nothing to do is one small read)."""
    return min(max(lifetime.total_seconds() / 100, 1.0), 3600.0)


class SignerRenewer(threading.Thread):
    """Runs :func:`ensure_signers` every :func:`check_interval` until stopped, beside the server
    in the ``ca serve`` process (a daemon thread). A failed attempt is logged and tried again at
    the next check; workers go on with the signer they hold (still valid for a third of its life)."""

    def __init__(self, open_service: Callable[[], CAService], lifetime: dt.timedelta,
                 now: Callable[[], dt.datetime]) -> None:
        super().__init__(name="ocsp-signer-renewer", daemon=True)
        self._open_service = open_service
        self.lifetime, self.now = lifetime, now
        self._stop = threading.Event()

    def run(self) -> None:
        service: CAService | None = None
        try:
            while not self._stop.wait(check_interval(self.lifetime)):
                try:
                    service = service or self._open_service()
                    now = self.now()
                    ensure_signers(service, now)
                    remove_expired_keys(service, now)
                except Exception as exc:
                    log.warning("renewing the OCSP signers failed (will retry): %s", exc)
        finally:
            if service is not None:
                service.engine.dispose()

    def stop(self) -> None:
        self._stop.set()


__all__ = ["SIGNER_TEMPLATE", "SignerRecord", "SignerRenewer", "ensure_signers", "issue_signer", "newest_signers",
           "remove_expired_keys", "signing_authorities"]
