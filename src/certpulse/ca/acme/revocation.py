"""revokeCert (RFC 8555 section 7.6) and renewalInfo (RFC 9773) over the CA's own records.

A revocation goes through :meth:`certpulse.ca.revocation.Revocation.revoke`, so the CRL, the
OCSP answers, a keyCompromise key block and the audit row follow exactly as for a CA manager's
revocation. Who may ask: an account whose principal holds the certificate, or whoever holds the
certificate's key (the request signed by it). The revocation is made in the name of the
certificate's principal (a caller with the CA-manager role for this one call), since the check
that it may revoke this certificate is made here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography import x509
from sqlalchemy import and_, select

from certpulse.ca.acme.accounts import actor_of
from certpulse.ca.acme.model import Account, RenewalInfo
from certpulse.ca.acme.renewal_info import renewal_window
from certpulse.ca.model import ANONYMOUS, MANAGER_ROLE, Caller
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki import ari, jose
from certpulse.pki.certs import serial_hex
from certpulse.pki.keys import spki_sha256
from certpulse.sql.db import read

if TYPE_CHECKING:
    from certpulse.ca.acme.service import ACMEAuthority

# The RFC 5280 reason codes a subscriber may give (RFC 8555 section 7.6 leaves the choice to the
# CA): not certificateHold (a CA manager's decision), not the CA-side ones.
REASONS = {
    0: x509.ReasonFlags.unspecified.value,
    1: x509.ReasonFlags.key_compromise.value,
    3: x509.ReasonFlags.affiliation_changed.value,
    4: x509.ReasonFlags.superseded.value,
    5: x509.ReasonFlags.cessation_of_operation.value,
    9: x509.ReasonFlags.privilege_withdrawn.value,
}
DEFAULT_RENEWAL_PERIOD = dt.timedelta(weeks=6)  # templates' own default, for a template since removed


def _aki(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        return None


class ACMERevocation:
    def __init__(self, authority: ACMEAuthority) -> None:
        self._acme = authority
        self.engine = authority.service.engine

    def revoke(self, certificate_der: bytes, reason: int | None, *, account: Account | None,
               signer_jwk: Mapping[str, Any] | None, now: dt.datetime) -> None:
        actor = actor_of(account) if account is not None else ANONYMOUS.actor
        try:
            if reason is None:
                reason = 0
            if isinstance(reason, bool) or not isinstance(reason, int) or reason not in REASONS:
                raise Refusal(Reason.BAD_REVOCATION_REASON, f"reason code {str(reason)[:12]} is not accepted; use "
                              + ", ".join(f"{code} ({name})" for code, name in REASONS.items()))
            try:
                cert = x509.load_der_x509_certificate(certificate_der)
            except ValueError:
                raise Refusal(Reason.MALFORMED_REQUEST, "'certificate' is not a DER certificate") from None
            with read(self.engine) as conn:
                row = conn.execute(
                    select(t.certificates, t.authorities.c.name.label("issuer_name"),
                           t.principals.c.name.label("principal_name"))
                    .join(t.authorities, t.authorities.c.id == t.certificates.c.authority_id)
                    .outerjoin(t.principals, t.principals.c.id == t.certificates.c.principal_id)
                    .where(and_(t.certificates.c.serial == serial_hex(cert.serial_number),
                                t.certificates.c.der == certificate_der))).first()
            if row is None:
                raise Refusal(Reason.NOT_FOUND, "this CA did not issue that certificate")
            by_account = (account is not None and account.principal_id is not None
                          and row.principal_id == account.principal_id)
            if not by_account and not self._signed_by_its_key(cert, signer_jwk):
                raise Refusal(Reason.FORBIDDEN, "only an account of the certificate's principal, or a request "
                                                "signed by the certificate's key, may revoke it")
        except Refusal as refusal:
            self._acme.service.audit.refusal(actor, "acme-revoke-refused", refusal, now)
            raise
        caller = Caller(kind="principal", name=row.principal_name or "acme-certificate-key",
                        principal_id=row.principal_id, roles=frozenset({MANAGER_ROLE}))
        self._acme.service.revocation.revoke(caller, row.serial, REASONS[reason], now, issuer=row.issuer_name)

    @staticmethod
    def _signed_by_its_key(cert: x509.Certificate, signer_jwk: Mapping[str, Any] | None) -> bool:
        if signer_jwk is None:
            return False
        key = jose.public_key(signer_jwk).as_der(private=False)  # SubjectPublicKeyInfo, DER
        try:
            return bool(hashlib.sha256(key).hexdigest() == spki_sha256(cert.public_key()))
        except (ValueError, TypeError):
            return False

    def renewal_info(self, identifier: str, now: dt.datetime) -> RenewalInfo:
        key_id, serial = ari.decode(identifier)
        c = t.certificates.c
        with read(self.engine) as conn:
            rows = conn.execute(
                select(t.certificates, t.requests.c.template_major)
                .outerjoin(t.requests, t.requests.c.id == c.request_id)
                .where(and_(c.serial == serial_hex(serial), c.status == "issued"))).all()
            snapshot = self._acme.service.state.get(conn)
        row = next((r for r in rows if _aki(x509.load_der_x509_certificate(r.der)) == key_id), None)
        if row is None:
            raise Refusal(Reason.NOT_FOUND, "this CA issued no certificate with that identifier")
        template = snapshot.templates.get(row.template_name)
        superseded = (template is not None and row.template_major is not None
                      and template.major_version > row.template_major)
        window = renewal_window(
            not_before=row.not_before, not_after=row.not_after, serial=serial,
            renewal_period=template.renewal_period if template is not None else DEFAULT_RENEWAL_PERIOD,
            revoked=row.revoked_at is not None, superseded_major=superseded, now=now)
        return RenewalInfo(start=window.start, end=window.end,
                           retry_after=self._acme.config.duration("ari_retry_after"), explanation=window.explanation)
