"""The certificate authority proper: turns a policy decision into a signed, recorded certificate.

Issuance comes in two steps, as in Boulder's CA. :meth:`CertificateAuthority.prepare` assembles
the certificate a decision describes (subject, key, names, extensions from the template, the
issuer's identifiers), everything but its serial and signature: CPU work that needs no
database, so a submission does it before its write transaction (on SQLite, outside the one
writer's turn). Inside the transaction, :meth:`~CertificateAuthority.sign` first records a
fresh serial in a ``reserved`` row (the unique constraint on issuer and serial makes reuse
impossible), then signs; the registration authority writes the request row, and
:meth:`~CertificateAuthority.record` stores the certificate and audits it. Nothing leaves the
process before the transaction commits, so one transaction is enough for "serial recorded
before it is used".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

from cryptography import x509
from sqlalchemy import Connection

from certpulse.ca.audit import AuditTrail
from certpulse.ca.model import Authority, Signer
from certpulse.ca.policy import Decision
from certpulse.ca.publishing import ca_cert_url, crl_url, ocsp_url
from certpulse.ca.results import Issued
from certpulse.ca.state import KeyRing, SnapshotCache
from certpulse.ca.storage.statements import Statements
from certpulse.errors import Reason, Refusal
from certpulse.pki import template_info
from certpulse.pki.build import end_entity_builder, random_serial, signature_hash
from certpulse.pki.certs import der, pem, serial_hex, thumbprint
from certpulse.pki.publication import pointer_extensions

SERIAL_ATTEMPTS = 5  # 159 random bits: a second attempt is already a curiosity


@dataclasses.dataclass(frozen=True, slots=True)
class Unsigned:
    """A decided certificate, assembled but for its serial and signature."""

    decision: Decision
    builder: x509.CertificateBuilder
    signer: Signer


@dataclasses.dataclass(frozen=True, slots=True)
class Signed:
    """A signed certificate and the row its serial was reserved in (not yet marked issued)."""

    certificate_id: int
    serial: int
    certificate: x509.Certificate
    thumbprint: str


class CertificateAuthority:
    def __init__(self, keyring: KeyRing, statements: Statements, audit: AuditTrail, state: SnapshotCache,
                 public_url: str | None = None) -> None:
        self.keyring = keyring
        self.public_url = public_url  # ca.toml's: None, no CRL distribution point or AIA
        self._reserve = statements.reserve
        self._mark_issued = statements.mark_issued
        self._audit = audit
        self._state = state
        self._lock = threading.Lock()
        self._issuer_skis: dict[str, x509.SubjectKeyIdentifier] = {}  # by key file
        self._template_extensions: dict[template_info.TemplateInfo, x509.UnrecognizedExtension] = {}
        self._pointers: dict[tuple[int, bool, bool], tuple[x509.ExtensionType, ...]] = {}

    def prepare(self, d: Decision) -> Unsigned:
        """The decided certificate, assembled but for its serial and signature."""
        signer = self.keyring.signer(d.issuer)
        builder = end_entity_builder(
            subject=d.subject, public_key=d.public_key, issuer_cert=d.issuer.certificate,
            issuer_key=signer.key, not_before=d.not_before, not_after=d.not_after,
            sans=d.sans(), key_usage=d.template.key_usage_extension(), ekus=d.template.ekus,
            extra=(self._template_extension(d), *self._pointer_extensions(d)) if self.public_url is not None
            else (self._template_extension(d),),
            issuer_ski=self._issuer_ski(signer),
        )
        return Unsigned(d, builder, signer)

    def sign(self, conn: Connection, unsigned: Unsigned, now: dt.datetime, *, request_id: int | None,
             principal_id: int | None) -> Signed:
        """Reserve a serial in ``conn``'s transaction, then sign with it."""
        serial, certificate_id = self._reserve_serial(conn, unsigned.decision, request_id, principal_id, now)
        key = unsigned.signer.key
        cert = unsigned.builder.serial_number(serial).sign(key, signature_hash(key))
        return Signed(certificate_id, serial, cert, thumbprint(cert))

    def record(self, conn: Connection, unsigned: Unsigned, signed: Signed, *, request_id: int, actor: str,
               now: dt.datetime, generation: int) -> Issued:
        """Store the signed certificate in its reserved row and audit the issuance; ``generation``
        (read by this transaction) names the state whose issuer chain goes with the answer."""
        d = unsigned.decision
        self._mark_issued.run(conn, {"certificate_id": signed.certificate_id, "der": der(signed.certificate),
                                     "thumbprint": signed.thumbprint, "request_id": request_id})
        serial = serial_hex(signed.serial)
        self._audit.record(conn, now, actor, "issued", template=d.template.name, request_id=request_id,
                           serial=serial, names=d.names.all() or (d.subject_text(),),
                           detail=f"{d.kind}; issuer {d.issuer.name}; thumbprint {signed.thumbprint}")
        return Issued(request_id=request_id, serial=serial, thumbprint=signed.thumbprint,
                      certificate=pem(signed.certificate),
                      chain=self._state.at(conn, generation).chain(d.issuer.id))

    def _reserve_serial(self, conn: Connection, d: Decision, request_id: int | None,
                        principal_id: int | None, now: dt.datetime) -> tuple[int, int]:
        """Insert the serial's row before signing; the serial and the row's id."""
        for _ in range(SERIAL_ATTEMPTS):
            serial = random_serial()
            row = self._reserve.run(conn, {
                "authority_id": d.issuer.id, "serial": serial_hex(serial), "request_id": request_id,
                "principal_id": principal_id, "template_name": d.template.name,
                "subject": d.subject_text(), "names": d.names_json(),
                "not_before": d.not_before, "not_after": d.not_after, "status": "reserved", "created_at": now,
            }).fetchone()
            if row is not None:
                return serial, int(row[0])
        raise Refusal(Reason.STORE, "could not reserve a unique serial number")

    def _issuer_ski(self, signer: Signer) -> x509.SubjectKeyIdentifier:
        """The issuing key's identifier (what the certificates' AKI names), computed once per key."""
        key_file = signer.authority.key_file or signer.authority.name
        ski = self._issuer_skis.get(key_file)
        if ski is None:
            ski = x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key())
            self._issuer_skis[key_file] = ski
        return ski

    def _template_extension(self, d: Decision) -> x509.UnrecognizedExtension:
        """The template-information extension: the same bytes for every certificate of a template
        version, so encoded once per version."""
        info = template_info.TemplateInfo(d.template.oid, d.template.major_version, d.template.minor_version)
        extension = self._template_extensions.get(info)
        if extension is None:
            extension = template_info.encode(info)
            with self._lock:
                if len(self._template_extensions) > 1024:
                    self._template_extensions.clear()
                self._template_extensions[info] = extension
        return extension

    def _pointer_extensions(self, d: Decision) -> tuple[x509.ExtensionType, ...]:
        """The CRL distribution point and AIA the template asks for: the same for every
        certificate of an issuer, so built once per issuer and pair of template switches."""
        template = d.template
        key = (d.issuer.id, template.crl_distribution_point, template.authority_information_access)
        extensions = self._pointers.get(key)
        if extensions is None:
            extensions = self.pointers_for(d.issuer, crl=key[1], aia=key[2])
            with self._lock:
                self._pointers[key] = extensions
        return extensions

    def pointers_for(self, issuer: Authority, *, crl: bool = True, aia: bool = True) -> tuple[x509.ExtensionType, ...]:
        """What a certificate ``issuer`` signs carries to point at its CRL, OCSP responder and
        certificate; nothing without a public URL."""
        return publication_pointers(self.public_url, issuer.name, crl=crl, ocsp=aia, ca_issuers=aia)


def publication_pointers(public_url: str | None, issuer_name: str, *, crl: bool, ocsp: bool,
                         ca_issuers: bool) -> tuple[x509.ExtensionType, ...]:
    """The CRL distribution point and AIA of a certificate signed by the authority
    ``issuer_name``, at :mod:`certpulse.ca.publishing`'s URLs under ``public_url``; nothing
    when the CA has no public URL (then its certificates point nowhere, as before issue 17)."""
    if public_url is None:
        return ()
    return pointer_extensions(
        crl_url=crl_url(public_url, issuer_name) if crl else None,
        ocsp_url=ocsp_url(public_url) if ocsp else None,
        ca_issuers_url=ca_cert_url(public_url, issuer_name) if ca_issuers else None)
