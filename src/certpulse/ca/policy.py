"""The request policy: an ordered chain of checks over state gathered beforehand. Pure.

The service first gathers everything a decision needs (the caller, the template, the CA's
authorities, what the database knows of presented certificates); :func:`decide` then runs
the checks in the order the issue fixes and returns a :class:`Decision` or raises a
:class:`~certpulse.errors.Refusal` naming the first one that failed:

1. template exists, and the caller may read and enroll;
2. the CSR parses and its signature verifies (proof of possession), with SHA-256 or better; its
   names are well formed (IP SANs of 4 or 16 bytes, no control characters anywhere);
3. renewal evidence, RA co-signatures and key archival, when the request or template needs them;
4. key type and size (global rules, then the template's); then the key's standing: never a key
   whose certificate was revoked for keyCompromise, never a key another principal requested;
5. the subject and every SAN against the template's rules (:mod:`certpulse.ca.name_checks`),
   also when a renewal copies them from the certificate being renewed
   (:data:`~certpulse.errors.Reason.NAME_NO_LONGER_ALLOWED`);
6. an issuer that serves the template, and the validity window (never past its notAfter).

An approval decides again (:func:`decide_approval`): the same checks but those that need the
requester's evidence, on the template, the requester's rights and the key's standing as they
are at approval.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from certpulse.ca.model import Authority, Caller, EnrollmentRequest, Evidence, KnownCertificate
from certpulse.ca.name_checks import checked_request_names
from certpulse.ca.templates import EKU_NAMES, Template
from certpulse.errors import Reason, Refusal
from certpulse.pki import key_archival
from certpulse.pki.build import backdated_start, inclusive_not_after
from certpulse.pki.certs import load_csr, thumbprint
from certpulse.pki.csr_signature import check_csr_signature
from certpulse.pki.keys import PrivateKey, PublicKey, check_public_key, key_matches, spki_sha256
from certpulse.pki.names import (
    RequestedNames,
    control_character_in,
    csr_sans,
    is_hostname,
    names_of_sans,
    names_to_json,
    to_general_names,
)
from certpulse.pki.signing import verify_bytes

DEFAULT_RA_POLICY = EKU_NAMES["certificate_request_agent"]


@dataclasses.dataclass(frozen=True)
class KeyStanding:
    """What the database says of the request's public key (by SPKI SHA-256)."""

    blocked_by: str | None = None  # serial of a certificate for it revoked for keyCompromise
    other_principal: bool = False  # another principal requested it (or was certified for it)


CLEAN_KEY = KeyStanding()


@dataclasses.dataclass(frozen=True)
class Gathered:
    """Everything :func:`decide` may look at, read from the store before deciding."""

    template: Template | None
    authorities: tuple[Authority, ...]
    known: Mapping[str, KnownCertificate]  # by thumbprint, for every presented certificate
    kra_key: rsa.RSAPrivateKey | None = None
    kra: Authority | None = None
    key: KeyStanding = CLEAN_KEY  # of the CSR's key; read in the transaction that records it


@dataclasses.dataclass(frozen=True)
class StoredRequest:
    """A pending request as recorded at submission, for :func:`decide_approval`."""

    template: str
    kind: str  # new | renewal
    csr_der: bytes
    subject: x509.Name  # what submission decided (copied from the old certificate, or the CSR's)
    names: RequestedNames
    issuer_id: int


@dataclasses.dataclass(frozen=True)
class Decision:
    template: Template
    kind: str  # new | renewal
    subject: x509.Name
    names: RequestedNames
    public_key: PublicKey
    csr_der: bytes
    issuer: Authority
    not_before: dt.datetime
    not_after: dt.datetime
    pending: bool
    renewal_of: KnownCertificate | None
    archived_key: Mapping[str, str] | None
    key_sha256: str  # SPKI SHA-256 of public_key, recorded with the request

    def sans(self) -> list[x509.GeneralName]:
        return to_general_names(self.names)

    def subject_text(self) -> str:
        return self._subject_text

    def names_json(self) -> str:
        """The names as the request and certificate rows store them (:func:`names_to_json`)."""
        return self._names_json

    # Each is written to two rows (the certificate's and the request's) and the text is costly
    # to make: made once per decision.
    @functools.cached_property
    def _subject_text(self) -> str:
        return self.subject.rfc4514_string()

    @functools.cached_property
    def _names_json(self) -> str:
        return names_to_json(self.names)


def decide(caller: Caller, req: EnrollmentRequest, state: Gathered, now: dt.datetime) -> Decision:
    template = _check_template(caller, req, state)
    csr, csr_subject, csr_names = _check_csr(req.csr)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    renewal_of = _check_renewal(caller, req, template, state, csr_der, now)
    _check_ra_signatures(req.ra_signatures, template, state, csr_der, now)
    csr_key = csr.public_key()  # once: each call decodes the key again
    archived = _check_key_archival(req, template, state, csr_key)
    public_key = check_public_key(csr_key, template.key_types)
    _check_key_standing(state.key)
    if renewal_of is not None and req.renewal is not None and copies_names(template):
        old = req.renewal.certificate
        subject, names = check_copied_names(caller, template, old.subject, _sans_of(old))
    else:
        subject, names = _check_names(caller, template, csr_subject, csr_names)
    issuer = _choose_issuer(req, template, state, renewal=renewal_of is not None, now=now)
    not_before, not_after = validity(template, issuer, now)
    return Decision(
        template=template,
        kind="renewal" if renewal_of else "new",
        subject=subject,
        names=names,
        public_key=public_key,
        csr_der=csr_der,
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        pending=template.manager_approval,
        renewal_of=renewal_of,
        archived_key=archived,
        key_sha256=spki_sha256(public_key),
    )


def decide_approval(requester: Caller | None, stored: StoredRequest, state: Gathered,
                    now: dt.datetime) -> Decision:
    """A pending request's decision at approval, on the template, the requester's rights, the
    key's standing and the issuer as they are now. The CSR's proof of possession, renewal
    evidence, RA co-signatures and archived key were checked at submission and are not asked
    for again; everything that a later change can make wrong is checked again."""
    if requester is None or requester.kind != "principal":
        raise Refusal(Reason.REQUESTER_DISABLED, "the requester is disabled or no longer exists")
    template = state.template
    if template is None:
        raise Refusal(Reason.UNKNOWN_TEMPLATE, f"template {stored.template!r} no longer exists")
    rights = template.rights_of(requester.name, requester.groups)
    if "read" not in rights or not {"enroll", "autoenroll"} & rights:
        raise Refusal(Reason.TEMPLATE_NOT_PERMITTED,
                      f"{requester.actor} may no longer enroll for {template.name!r}")
    csr, csr_subject, csr_names = _check_csr(stored.csr_der)
    public_key = check_public_key(csr.public_key(), template.key_types)
    _check_key_standing(state.key)
    if stored.kind == "renewal" and copies_names(template):
        subject, names = check_copied_names(requester, template, stored.subject, to_general_names(stored.names))
    else:
        subject, names = _check_names(requester, template, csr_subject, csr_names)
    issuer = next((a for a in state.authorities if a.id == stored.issuer_id), None)
    if issuer is None or not issuer.serves(template.name) or not issuer.valid_at(now):
        name = issuer.name if issuer is not None else str(stored.issuer_id)
        raise Refusal(Reason.NO_ISSUER, f"issuer {name!r} no longer serves {template.name!r}")
    not_before, not_after = validity(template, issuer, now)
    return Decision(
        template=template, kind=stored.kind, subject=subject, names=names, public_key=public_key,
        csr_der=stored.csr_der, issuer=issuer, not_before=not_before, not_after=not_after, pending=True,
        renewal_of=None, archived_key=None, key_sha256=spki_sha256(public_key),
    )


def copies_names(template: Template) -> bool:
    """Whether a renewal under ``template`` takes its subject and SANs from the old certificate."""
    return template.subject_source == "request" and template.renewal_subject_from_existing


def check_copied_names(caller: Caller, template: Template, subject: x509.Name,
                       sans: list[x509.GeneralName]) -> tuple[x509.Name, RequestedNames]:
    """Names a renewal copies from the certificate it renews, through the same checks as a
    request's own names, against the template as it is now. A refusal says
    ``name-no-longer-allowed``: the template changed since, and a new request from what it
    allows is the way out (the agent makes one)."""
    try:
        stand_in = _as_request(subject, sans)
        return _check_names(caller, template, stand_in.subject, csr_sans(stand_in))
    except Refusal as refusal:
        raise Refusal(Reason.NAME_NO_LONGER_ALLOWED,
                      f"the names of the certificate being renewed are no longer allowed: {refusal.detail}",
                      refused_as=refusal.reason.value) from None


@functools.cache
def _copy_key() -> ed25519.Ed25519PrivateKey:
    """A throwaway key that signs the stand-in requests of :func:`_as_request` (never used
    to certify anything: only the stand-in's names are read)."""
    return ed25519.Ed25519PrivateKey.generate()


def _as_request(subject: x509.Name, sans: list[x509.GeneralName]) -> x509.CertificateSigningRequest:
    """A stand-in CSR that carries copied names, so that they meet exactly the checks (and the
    code) that a request's own names meet."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_copy_key(), None)


def _sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _check_key_standing(standing: KeyStanding) -> None:
    """A compromised key is never certified again, for anyone; a key another principal requested
    is not certified to this one (a CSR captured from one principal gets another nothing)."""
    if standing.blocked_by is not None:
        raise Refusal(Reason.KEY_BLOCKED, f"this key's certificate {standing.blocked_by} was revoked for "
                      "key compromise; the key is never certified again: make a new key")
    if standing.other_principal:
        raise Refusal(Reason.KEY_OF_ANOTHER_PRINCIPAL,
                      "this key was requested by another principal; a key belongs to one principal: make a new key")


def validity(template: Template, issuer: Authority, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The validity window of a certificate issued at ``now``: from ``now`` backdated
    (:func:`~certpulse.pki.build.backdated_start`: 10 minutes, at most 1 % of the validity,
    never before the issuer's notBefore), for the template's validity counted from that start
    (notAfter inclusive), never past the issuer's own notAfter. Issuance at approval uses it
    too, so that a certificate's lifetime has one rule however it was decided."""
    start = backdated_start(now, template.validity, floor=issuer.certificate.not_valid_before_utc)
    return start, min(inclusive_not_after(start, template.validity), issuer.certificate.not_valid_after_utc)


def _check_template(caller: Caller, req: EnrollmentRequest, state: Gathered) -> Template:
    template = state.template
    if template is None:
        raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {req.template!r}")
    rights = template.rights_of(caller.name, caller.groups) if caller.kind == "principal" else frozenset()
    if "read" not in rights:
        # Do not confirm to an unauthorised caller that the template exists.
        raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {req.template!r}")
    if "enroll" not in rights and "autoenroll" not in rights:
        raise Refusal(
            Reason.TEMPLATE_NOT_PERMITTED, f"{caller.actor} may not enroll for {template.name!r}"
        )
    return template


def _check_csr(data: bytes) -> tuple[x509.CertificateSigningRequest, x509.Name, list[x509.GeneralName]]:
    """Parse the CSR and check what holds whatever the template: the signature (accepted hash,
    verifies with its own key), readable extensions and subject, IP SANs of 4 or 16 bytes, and no
    control character in any subject attribute or SAN. With the CSR, its subject and SANs as
    parsed here, for the name checks (each reading of them parses them again)."""
    csr = load_csr(data)
    check_csr_signature(csr)
    try:
        csr.extensions  # noqa: B018 - parse them now so a broken one is a clear refusal
    except Exception as exc:
        raise Refusal(Reason.MALFORMED_CSR, f"unreadable extensions in the CSR: {exc}") from None
    try:
        subject = csr.subject
        list(subject)
    except ValueError as exc:
        raise Refusal(Reason.MALFORMED_CSR, f"unreadable subject: {exc}") from None
    sans = csr_sans(csr)
    where = control_character_in(subject, sans)
    if where is not None:
        raise Refusal(Reason.NAME_NOT_ALLOWED, where)
    return csr, subject, sans


def _issued_by_us(cert: x509.Certificate, state: Gathered) -> Authority | None:
    """The issuing CA whose key signed ``cert``, if one of ours did. Only what verification raises
    for a certificate some other key signed means "not this one": a bad signature, or a key or
    algorithm that does not fit (ValueError, TypeError). Anything else is a fault, not a verdict."""
    for authority in state.authorities:
        if authority.role != "issuer" or authority.certificate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(authority.certificate)
        except (InvalidSignature, ValueError, TypeError):
            continue  # try the next authority
        return authority
    return None


def _check_renewal(
    caller: Caller, req: EnrollmentRequest, template: Template, state: Gathered,
    csr_der: bytes, now: dt.datetime,
) -> KnownCertificate | None:
    evidence = req.renewal
    if evidence is None:
        return None
    cert = evidence.certificate
    known = state.known.get(thumbprint(cert))
    if _issued_by_us(cert, state) is None or known is None:
        raise Refusal(Reason.RENEWAL_INVALID, "the certificate being renewed was not issued by this CA")
    if known.principal_id is None or known.principal_id != caller.principal_id:
        raise Refusal(Reason.RENEWAL_INVALID, "the certificate being renewed belongs to someone else")
    if known.revoked_at is not None:
        raise Refusal(Reason.RENEWAL_OF_REVOKED, "the certificate being renewed is revoked; make a new request")
    if now > known.not_after:
        raise Refusal(Reason.RENEWAL_OF_EXPIRED, "the certificate being renewed has expired; make a new request")
    if now < known.not_before:
        raise Refusal(Reason.RENEWAL_INVALID, "the certificate being renewed is not yet valid")
    if known.template_name != template.name and known.template_name not in template.supersedes:
        raise Refusal(
            Reason.RENEWAL_INVALID,
            f"a {known.template_name!r} certificate cannot be renewed as {template.name!r}",
        )
    if not verify_bytes(cert.public_key(), evidence.signature, csr_der):
        raise Refusal(Reason.RENEWAL_INVALID, "the renewal signature does not verify with the old certificate's key")
    return known


def _check_ra_signatures(
    evidence: tuple[Evidence, ...], template: Template, state: Gathered, csr_der: bytes, now: dt.datetime
) -> None:
    if template.ra_signatures == 0:
        return
    policy = template.ra_policy or DEFAULT_RA_POLICY
    holders: set[int] = set()
    for item in evidence:
        cert = item.certificate
        known = state.known.get(thumbprint(cert))
        if known is None or known.revoked_at is not None or known.principal_id is None:
            continue
        if not known.not_before <= now <= known.not_after or _issued_by_us(cert, state) is None:
            continue
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if x509.ObjectIdentifier(policy) not in usages:
            continue
        if verify_bytes(cert.public_key(), item.signature, csr_der):
            holders.add(known.principal_id)
    if len(holders) < template.ra_signatures:
        raise Refusal(
            Reason.RA_SIGNATURES_MISSING,
            f"template {template.name!r} needs {template.ra_signatures} registration-authority "
            f"signature(s) from different agents; {len(holders)} valid",
        )


def _check_key_archival(
    req: EnrollmentRequest, template: Template, state: Gathered, public_key: CertificatePublicKeyTypes
) -> Mapping[str, str] | None:
    if not template.archive_private_key:
        return None
    if state.kra is None or state.kra_key is None:
        raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED, "the template archives keys but this CA has no KRA")
    if req.archived_key is None:
        raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED,
                      f"template {template.name!r} requires the private key, encrypted to the KRA")
    if req.archived_key.get("kra") != thumbprint(state.kra.certificate):
        raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED, "the archived key is not encrypted to this CA's KRA")
    private: PrivateKey = key_archival.open_envelope(req.archived_key, state.kra_key)
    if not key_matches(private, public_key):
        raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED, "the archived key is not the CSR's key")
    return {str(k): str(v) for k, v in req.archived_key.items()}


def _principal_names(caller: Caller) -> tuple[x509.Name, RequestedNames]:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, caller.name)])
    if caller.principal_kind == "machine" and is_hostname(caller.name.lower(), allow_wildcard=False):
        return subject, RequestedNames(dns=(caller.name.lower(),))
    return subject, RequestedNames()


def _check_names(
    caller: Caller, template: Template, subject: x509.Name, sans: list[x509.GeneralName]
) -> tuple[x509.Name, RequestedNames]:
    """The subject and names the certificate will carry: the principal's own for a template that
    builds them, else the CSR's subject and SANs (a renewal that copies names passes them in
    through a stand-in CSR), each checked against the template's rules as they are now."""
    if template.subject_source == "principal":
        return _principal_names(caller)
    return checked_request_names(caller, template, subject, names_of_sans(sans))


def _choose_issuer(
    req: EnrollmentRequest, template: Template, state: Gathered, *, renewal: bool, now: dt.datetime
) -> Authority:
    issuers = [a for a in state.authorities if a.role == "issuer"]
    if req.issuer is not None:
        named = [a for a in issuers if a.name == req.issuer]
        if not named:
            raise Refusal(Reason.UNKNOWN_ISSUER, f"no issuer named {req.issuer!r}")
        issuer = named[0]
        if not issuer.serves(template.name) or not issuer.valid_at(now):
            raise Refusal(Reason.NO_ISSUER, f"issuer {issuer.name!r} does not serve {template.name!r}")
        if issuer.renewal_only and not renewal:
            raise Refusal(Reason.ISSUER_RENEWAL_ONLY, f"issuer {issuer.name!r} only renews certificates")
        return issuer
    candidates = sorted(
        (a for a in issuers if a.serves(template.name) and a.valid_at(now) and (renewal or not a.renewal_only)),
        key=lambda a: (a.cost, a.name),
    )
    if not candidates:
        raise Refusal(Reason.NO_ISSUER, f"no issuer serves template {template.name!r} for this request")
    return candidates[0]
