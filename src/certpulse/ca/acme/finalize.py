"""Finalize (RFC 8555 section 7.4) and certificate download (section 7.4.2).

A ready order's CSR goes to the same registration authority as a native request
(:meth:`certpulse.ca.requests.RegistrationAuthority.submit`), as the account's principal, under
the order's profile: so an ACME certificate is decided by the same policy chain, recorded,
audited, revocable and counted exactly like a native one. A template that needs a CA manager's
approval leaves the order ``processing`` until the request is approved or denied. An order that
``replaces`` a certificate (RFC 9773) is submitted with it as its lineage, as a native renewal is.

The order is claimed (``processing``) in a transaction of its own before submission, so two
finalize calls for one order never make two certificates; the submission is idempotent by the
order's id besides, should a claimed order be finalized again after its finalizer died.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import TYPE_CHECKING, Any

from cryptography import x509
from sqlalchemy import Connection, and_, bindparam, select, update

from certpulse.ca.acme import problems, records
from certpulse.ca.acme.accounts import actor_of
from certpulse.ca.acme.model import Account, CertificateChains, Identifier, Order
from certpulse.ca.acme.orders import ORDER, ORDER_OF_ACCOUNT_LOCKED, submission_key
from certpulse.ca.model import Caller, EnrollmentRequest
from certpulse.ca.results import Issued, Pending, Replayed
from certpulse.ca.state import Snapshot
from certpulse.ca.storage import schema as t
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import load_csr, pem
from certpulse.pki.names import csr_sans, names_of_sans
from certpulse.sql.db import read, write

if TYPE_CHECKING:
    from certpulse.ca.acme.service import ACMEAuthority

# Refusals about the CSR itself or a passing condition: the order stays ready, and the client
# may finalize again with another CSR (or later). Every other refusal is final: the order is
# invalid with it as its error.
RETRYABLE = frozenset({
    Reason.MALFORMED_CSR, Reason.BAD_CSR_SIGNATURE, Reason.WEAK_SIGNATURE_ALGORITHM, Reason.KEY_NOT_ALLOWED,
    Reason.KEY_BLOCKED, Reason.KEY_OF_ANOTHER_PRINCIPAL, Reason.STORE, Reason.UNAVAILABLE, Reason.RATE_LIMITED,
    Reason.CONFLICT,
})


def csr_names(csr: x509.CertificateSigningRequest) -> set[str]:
    """Every name a CSR asks for, spelled as order identifiers are: its SANs and its common name."""
    try:
        names = names_of_sans(csr_sans(csr))
        common = [str(a.value) for a in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    except (ValueError, Refusal) as exc:
        raise Refusal(Reason.MALFORMED_CSR, f"the CSR's names cannot be read: {exc}") from None
    found: set[str] = {n.lower().removesuffix(".") for n in names.dns}
    found |= {str(ipaddress.ip_address(n)) for n in names.ip}
    found |= set(names.email) | set(names.uri)
    for name in common:
        try:
            found.add(str(ipaddress.ip_address(name)))
        except ValueError:
            found.add(name.lower().removesuffix("."))
    return found


def check_csr_names(identifiers: tuple[Identifier, ...], csr: x509.CertificateSigningRequest) -> None:
    """MALFORMED_CSR ("badCSR") unless the CSR names exactly the order's identifiers."""
    wanted = {i.value for i in identifiers}
    found = csr_names(csr)
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    if missing or extra:
        parts = []
        if extra:
            parts.append("names the order does not: " + ", ".join(printable(n[:255]) for n in extra[:10]))
        if missing:
            parts.append("lacks the order's " + ", ".join(printable(n) for n in missing[:10]))
        raise Refusal(Reason.MALFORMED_CSR, "the CSR must name exactly the order's identifiers; it "
                      + "; it ".join(parts))



# Built once (bound parameters), as in orders.py
_o = t.acme_orders.c
_CLAIM = update(t.acme_orders).where(_o.id == bindparam("p_id")).values(status="processing",
                                                                       updated_at=bindparam("p_now"))
_REQUEST_OUTCOME = select(t.requests.c.status, t.requests.c.certificate_id).where(t.requests.c.id == bindparam("p_id"))
_ISSUED = update(t.acme_orders).where(_o.id == bindparam("p_id")).values(
    request_id=bindparam("p_request"), updated_at=bindparam("p_now"), status="valid",
    certificate_id=bindparam("p_certificate"))
_SUBMITTED = update(t.acme_orders).where(_o.id == bindparam("p_id")).values(
    request_id=bindparam("p_request"), updated_at=bindparam("p_now"))
_OWNED = select(_o.id).where(and_(_o.account_id == bindparam("p_account"), _o.certificate_id == bindparam("p_id"),
                                  _o.status == "valid"))
_ISSUED_CERTIFICATE = select(t.certificates).where(and_(t.certificates.c.id == bindparam("p_id"),
                                                        t.certificates.c.status == "issued"))

class Finalization:
    def __init__(self, authority: ACMEAuthority) -> None:
        self._acme = authority
        self.engine = authority.service.engine

    def finalize(self, account: Account, order_id: int, csr_der: bytes, now: dt.datetime) -> Order:
        records.require_id(order_id, "order")
        try:
            csr = load_csr(csr_der)
            with write(self.engine) as conn:
                row, caller = self._claim(conn, account, order_id, csr, now)
        except Refusal as refusal:
            self._acme.service.audit.refusal(actor_of(account), "acme-finalize-refused", refusal, now)
            raise
        try:
            submission = self._acme.service.requests.submit(caller, EnrollmentRequest(
                template=row.profile, csr=csr_der, idempotency_key=submission_key(order_id),
                lineage=row.replaces), now)
        except Refusal as refusal:  # audited by the registration authority
            self._after_refusal(order_id, refusal, now)
            raise
        with write(self.engine) as conn:
            return self._record(conn, order_id, submission, now)

    def _claim(self, conn: Connection, account: Account, order_id: int, csr: x509.CertificateSigningRequest,
               now: dt.datetime) -> tuple[Any, Caller]:
        """The order, claimed for this finalize (``processing``) once it is ready and the CSR names
        exactly its identifiers; with the principal the account acts as."""
        o = t.acme_orders.c
        row = conn.execute(ORDER_OF_ACCOUNT_LOCKED, {"p_id": order_id, "p_account": account.id}).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no order {order_id}")
        row = self._acme.ordering.bring_up_to_date(conn, row, now)
        if row.status != "ready":
            raise Refusal(Reason.ORDER_NOT_READY, f"order {order_id} is {row.status}, not ready"
                          + (" (it has authorizations left to validate)" if row.status == "pending" else ""))
        check_csr_names(records.identifiers_of(row.identifiers), csr)
        if row.replaces is not None:
            done = conn.execute(select(o.id).where(and_(
                o.replaces == row.replaces, o.id != order_id, o.status.in_(("processing", "valid"))))).first()
            if done is not None:
                raise Refusal(Reason.ALREADY_REPLACED, f"order {done.id} already replaced this certificate")
        caller = self._acme.caller(conn, account)
        conn.execute(_CLAIM, {"p_id": order_id, "p_now": now})
        return row, caller

    def _after_refusal(self, order_id: int, refusal: Refusal, now: dt.datetime) -> None:
        """The claimed order after the registration authority refused its CSR (the refusal is
        audited there): ready again for a refusal the client can mend, invalid otherwise."""
        if refusal.reason in RETRYABLE:
            values: dict[str, Any] = {"status": "ready"}
        else:
            values = {"status": "invalid", "error": problems.dumps(problems.from_refusal(refusal))}
        with write(self.engine) as conn:
            conn.execute(update(t.acme_orders).where(and_(
                t.acme_orders.c.id == order_id, t.acme_orders.c.status == "processing",
                t.acme_orders.c.request_id.is_(None))).values(updated_at=now, **values))

    def _record(self, conn: Connection, order_id: int, submission: Issued | Pending | Replayed,
                now: dt.datetime) -> Order:
        """The order after its submission: valid with its certificate, or processing with its request."""
        request_id = submission.request.request_id if isinstance(submission, Replayed) else submission.request_id
        request = conn.execute(_REQUEST_OUTCOME, {"p_id": request_id}).one()
        if request.status == "issued":
            conn.execute(_ISSUED, {"p_id": order_id, "p_request": request_id, "p_now": now,
                                   "p_certificate": request.certificate_id})
        else:
            conn.execute(_SUBMITTED, {"p_id": order_id, "p_request": request_id, "p_now": now})
        row = conn.execute(ORDER, {"p_id": order_id}).one()
        return self._acme.ordering.value(conn, self._acme.ordering.bring_up_to_date(conn, row, now))

    # -- download -----------------------------------------------------------------------

    def certificate(self, account: Account, certificate_id: int, alternate: int, now: dt.datetime) -> CertificateChains:
        """The certificate of one of the account's orders, with its issuer's chain up to its
        root (``alternate`` 0), or up to an older root through a cross-certificate (1..n, RFC
        8555 section 7.4.2): after ``ca rollover-root`` a client whose relying parties know only
        the old root can fetch a chain they accept."""
        records.require_id(certificate_id, "certificate")
        with read(self.engine) as conn:
            owned = conn.execute(_OWNED, {"p_id": certificate_id, "p_account": account.id}).first()
            row = conn.execute(_ISSUED_CERTIFICATE, {"p_id": certificate_id}).first()
            if owned is None or row is None:
                raise Refusal(Reason.NOT_FOUND, f"no certificate {certificate_id}")
            snapshot = self._acme.service.state.get(conn)
        chains = [snapshot.chain(row.authority_id), *alternate_chains(snapshot, row.authority_id)]
        if isinstance(alternate, bool) or not 0 <= alternate < len(chains):
            raise Refusal(Reason.NOT_FOUND, f"certificate {certificate_id} has no alternate chain {alternate}")
        leaf = pem(x509.load_der_x509_certificate(row.der))
        return CertificateChains(pem=leaf + "".join(chains[alternate]), alternates=len(chains) - 1)


def alternate_chains(snapshot: Snapshot, issuer_id: int) -> list[tuple[str, ...]]:
    """The issuer's chain ending instead in each cross-certificate of its root (the root's
    subject and key, signed by an older root) and that older root's own chain."""
    chain = snapshot.chain(issuer_id)
    root = snapshot.authority(issuer_id)
    while root.parent_id is not None:
        root = snapshot.authority(root.parent_id)
    return [
        (*chain[:-1], pem(cross.certificate), *snapshot.chain(cross.parent_id))
        for cross in snapshot.by_role("cross")
        if cross.parent_id is not None and cross.certificate.subject == root.certificate.subject
        and cross.certificate.public_key() == root.certificate.public_key()
    ]
