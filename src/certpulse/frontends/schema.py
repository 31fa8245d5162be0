"""The native API's request and response bodies, as its routes validate them and ``/openapi.json``
documents them (pydantic). Requests refuse unknown fields, so a misspelt option is an error
rather than silently ignored. What the answers hold is built by :mod:`.documents`; the
response models here describe it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from certpulse.ca.revocation import MAX_SERIALS_PER_CALL, REVOCATION_REASONS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenExchange(_Body):
    token: str = Field(max_length=200, description="The one-time enrollment token from 'principal add'")


class Credential(BaseModel):
    principal: str
    kind: str
    credential: str = Field(description="Bearer credential for every later call; shown once")


class SignedEvidence(_Body):
    certificate: str = Field(max_length=16_000, description="PEM certificate whose key signed the CSR")
    signature: str = Field(max_length=4_000, description="base64 signature over the CSR's DER")


class ArchivedKey(_Body):
    kra: str = Field(max_length=64)
    wrapped_key: str = Field(max_length=4_000)
    nonce: str = Field(max_length=64)
    ciphertext: str = Field(max_length=20_000)


class EnrollmentBody(_Body):
    template: str = Field(max_length=64)
    csr: str = Field(max_length=40_000, description="PKCS#10 request: PEM, or base64 DER")
    issuer: str | None = Field(default=None, max_length=64, description="Issuer chosen by the client (by cost)")
    renewal: SignedEvidence | None = Field(
        default=None,
        description="Present for a renewal: the old certificate and its key's signature over the new CSR",
    )
    ra_signatures: list[SignedEvidence] = Field(default_factory=list, max_length=5)
    archived_key: ArchivedKey | None = None


class RequestResult(BaseModel):
    id: int
    status: Literal["pending", "issued", "denied", "failed"]
    template: str | None = None
    kind: str | None = None
    requester: str | None = None
    subject: str | None = None
    names: list[str] | None = None
    created_at: str | None = None
    decided_at: str | None = None
    decided_by: str | None = None
    reason: str | None = None
    serial: str | None = None
    thumbprint: str | None = None
    certificate: str | None = None
    chain: list[str] | None = None
    replayed: bool | None = Field(
        default=None, description="True when an earlier request with the same Idempotency-Key answered"
    )


class DenyBody(_Body):
    reason: str = Field(min_length=1, max_length=1000)


class RevokeBody(_Body):
    reason: str = Field(default="unspecified", description=f"One of: {', '.join(REVOCATION_REASONS)}")
    issuer: str | None = Field(default=None, max_length=64)


class SerialEntry(_Body):
    serial: str = Field(max_length=64, description="Serial number in hex (colons and 0x allowed)")
    issuer: str | None = Field(default=None, max_length=64, description="The issuing CA's name, when known")


class StatusQuery(_Body):
    certificates: list[SerialEntry] = Field(
        max_length=MAX_SERIALS_PER_CALL,
        description=f"At most {MAX_SERIALS_PER_CALL} serials (what fits the default 64 KiB body limit)")


class SerialStatusResult(BaseModel):
    serial: str
    issuer: str | None = Field(description="The issuing CA; for an unknown serial, the one asked about")
    status: Literal["good", "revoked", "expired", "unknown"]
    revoked_at: str | None
    revocation_reason: str | None
    not_after: str | None


class StatusListResult(BaseModel):
    certificates: list[SerialStatusResult]
    next: str | None = Field(default=None, description="Cursor of the next page of the caller's own certificates "
                                                       "(GET ?after=); absent on the last page")
class UnrevokeBody(_Body):
    issuer: str | None = Field(default=None, max_length=64, description="When the serial exists at several issuers")
