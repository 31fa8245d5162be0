"""Value types shared by the CA core: who is asking, what they ask, and the CA's own authorities."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from cryptography import x509

from certpulse.errors import Reason, Refusal
from certpulse.pki.keys import PrivateKey

CallerKind = Literal["principal", "admin", "operator", "anonymous"]
MANAGER_ROLE = "ca-manager"
IMPLICIT_GROUPS = {"machine": "machines", "user": "users"}


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated party. ``operator`` is a person at the CA's own command line."""

    kind: CallerKind
    name: str
    principal_id: int | None = None
    principal_kind: str | None = None
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    # How a principal was authenticated, for re-checking a remembered caller inside the write
    # transaction that acts for it: the credential's hash, and the state generation its groups
    # were read at. Not part of its identity.
    credential_hash: str | None = dataclasses.field(default=None, compare=False, repr=False)
    generation: int | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def is_manager(self) -> bool:
        return self.kind in ("admin", "operator") or MANAGER_ROLE in self.roles


ANONYMOUS = Caller(kind="anonymous", name="-")


def require_manager(caller: Caller) -> None:
    """Refuse a caller that is not a CA manager (approval, denial, revocation, listings, audit)."""
    if not caller.is_manager:
        raise Refusal(Reason.FORBIDDEN, f"{caller.actor} is not a CA manager")


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A certificate and a signature its key made over the CSR (renewal or RA co-signature)."""

    certificate: x509.Certificate
    signature: bytes


@dataclasses.dataclass(frozen=True)
class EnrollmentRequest:
    template: str
    csr: bytes
    issuer: str | None = None
    renewal: Evidence | None = None
    ra_signatures: tuple[Evidence, ...] = ()
    archived_key: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    # The certificate (id) this request replaces, vouched for by a trusted front end that checked
    # it belongs to the requester (ACME's ``replaces``): recorded as the request's renewal_of and
    # kind "renewal", the lineage a native renewal gets from its evidence. Never from a client.
    lineage: int | None = None


@dataclasses.dataclass(frozen=True)
class Authority:
    """One of the CA's own keys: the root, an issuing CA, or the key recovery agent."""

    id: int
    name: str
    role: str  # root | issuer | kra
    certificate: x509.Certificate
    key_file: str | None
    cost: int
    renewal_only: bool
    enabled: bool
    templates: frozenset[str]
    parent_id: int | None

    def serves(self, template: str) -> bool:
        return self.enabled and self.role == "issuer" and template in self.templates

    def valid_at(self, now: dt.datetime) -> bool:
        cert = self.certificate
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@dataclasses.dataclass(frozen=True)
class KnownCertificate:
    """What the database says about a certificate a request presents as evidence."""

    id: int
    authority_id: int
    serial: str
    principal_id: int | None
    template_name: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Signer:
    authority: Authority
    key: PrivateKey


def new_secret(prefix: str) -> tuple[str, str]:
    """A 256-bit secret for a person to hold, and the hash the database keeps."""
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    return secret, hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
