"""The tables. Migrations in ``migrations/versions`` build exactly this (a test compares them).

Design notes:
* ``certificates`` holds one row per serial, inserted (status ``reserved``) before the
  certificate is signed, so a serial is recorded before it is used and the unique constraint
  on (authority, serial) makes reuse impossible. Revocation lives in the same row
  (``revoked_at``, ``revocation_reason``) so a CRL is one indexed query per authority and an
  OCSP answer is one primary-key lookup: neither needs a migration to start.
* Secrets (API keys, credentials, enrollment tokens) are stored only as SHA-256 hashes: they
  are 256-bit random values, so a slow password hash would add cost and no safety.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from certpulse.sql.types import UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

authorities = Table(
    "authorities",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # root | issuer | kra
    Column("certificate_der", LargeBinary, nullable=False),
    Column("key_file", String(255), nullable=True),
    Column("parent_id", Integer, ForeignKey("authorities.id"), nullable=True),
    Column("cost", Integer, nullable=False, default=0),
    Column("renewal_only", Boolean, nullable=False, default=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", UTCDateTime, nullable=False),
    # Bumped in the transaction of every revocation, hold or release of a certificate this
    # authority issued (0006): a CRL or a cached OCSP answer made at an older revision is stale.
    Column("revocation_revision", Integer, nullable=False, default=0, server_default=text("0")),
)

issuer_templates = Table(
    "issuer_templates",
    metadata,
    Column("authority_id", Integer, ForeignKey("authorities.id"), primary_key=True),
    Column("template_name", String(64), primary_key=True),
)

templates = Table(
    "templates",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("oid", String(128), nullable=False, unique=True),
    Column("major_version", Integer, nullable=False),
    Column("minor_version", Integer, nullable=False),
    Column("document", Text, nullable=False),  # canonical JSON of the TOML document
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

principals = Table(
    "principals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # machine | user
    Column("roles", String(255), nullable=False, default=""),  # comma-separated, e.g. ca-manager
    Column("credential_hash", String(64), nullable=True, unique=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", UTCDateTime, nullable=False),
)

group_members = Table(
    "group_members",
    metadata,
    Column("group_name", String(64), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), primary_key=True),
    Index(None, "principal_id"),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # Set when a newer token was issued to the same principal before this one was used (0004)
    Column("superseded_at", UTCDateTime, nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # admin
    Column("created_at", UTCDateTime, nullable=False),
    # A key opens nothing at or after expires_at, nor once revoked; the row stays for the record (0004)
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

requests = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=True),
    Column("requester", String(128), nullable=False),  # principal:NAME or admin:NAME
    Column("template_name", String(64), nullable=False),
    Column("template_major", Integer, nullable=False),
    Column("template_minor", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # new | renewal
    Column("csr_der", LargeBinary, nullable=False),
    Column("subject", Text, nullable=False),
    Column("names", Text, nullable=False),  # JSON list of SAN values
    Column("renewal_of", Integer, ForeignKey("certificates.id"), nullable=True),
    Column("authority_id", Integer, ForeignKey("authorities.id"), nullable=False),
    Column("status", String(16), nullable=False),  # pending | issued | denied | failed
    Column("reason", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("decided_at", UTCDateTime, nullable=True),
    Column("decided_by", String(128), nullable=True),
    Column("certificate_id", Integer, nullable=True),
    # Chosen by the client and sent again when it retries, so a retry after a lost answer
    # gets the first request's result instead of a second certificate (migration 0002).
    Column("idempotency_key", String(64), nullable=True),
    # SHA-256 of the CSR's SubjectPublicKeyInfo, with principal_id: a key requested by one
    # principal is refused to every other (migration 0005; NULL in rows written before it).
    Column("key_sha256", String(64), nullable=True),
    # Listing by status reads in id order (migration 0003); the metrics count from an index.
    Index(None, "status", "id"),
    Index(None, "template_name", "status", "created_at"),
    Index(None, "principal_id"),
    UniqueConstraint("principal_id", "idempotency_key"),
    Index(None, "key_sha256", "principal_id"),
)

certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("authority_id", Integer, ForeignKey("authorities.id"), nullable=False),
    Column("serial", String(40), nullable=False),  # lower-case hex, no leading zeros
    Column("request_id", Integer, nullable=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=True),
    Column("template_name", String(64), nullable=False),
    Column("subject", Text, nullable=False),
    Column("names", Text, nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),  # reserved | issued
    Column("der", LargeBinary, nullable=True),
    Column("thumbprint", String(40), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("authority_id", "serial"),
    Index(None, "serial"),
    Index(None, "not_after"),
    Index(None, "principal_id", "template_name"),
    Index(None, "authority_id", "revoked_at"),
    Index(None, "thumbprint"),
    # The metrics' issued / revoked / still-valid counts, read from the index alone (0003). Not led
    # by status: SQLite, which has no statistics here, would take it for lookups by serial.
    Index("ix_certificates_counts", "authority_id", "template_name", "status", "revocation_reason",
          "revoked_at", "not_after"),
    # A CRL's entries (serial, date, reason of an authority's revoked, unexpired certificates) read
    # from the index alone; only revoked rows enter it (0007).
    Index("ix_certificates_crl_entries", "authority_id", "revoked_at", "not_after", "status", "revocation_reason",
          "serial", sqlite_where=text("revoked_at IS NOT NULL"), postgresql_where=text("revoked_at IS NOT NULL")),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("template_name", String(64), nullable=True),
    Column("request_id", Integer, nullable=True),
    Column("serial", String(40), nullable=True),
    Column("names", Text, nullable=True),
    Column("reason", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Index(None, "at"),
    Index(None, "request_id"),
    # Refusals only (the metrics count them); issuance and approval rows carry no reason (0003).
    Index(None, "reason", "action", "template_name", sqlite_where=text("reason IS NOT NULL"),
          postgresql_where=text("reason IS NOT NULL")),
)

archived_keys = Table(
    "archived_keys",
    metadata,
    Column("request_id", Integer, ForeignKey("requests.id"), primary_key=True),
    Column("authority_id", Integer, ForeignKey("authorities.id"), nullable=False),  # the KRA
    Column("envelope", Text, nullable=False),  # JSON: the key encrypted to the KRA certificate
    Column("created_at", UTCDateTime, nullable=False),
)

# Keys whose certificate was revoked for keyCompromise, by SPKI SHA-256: never certified again,
# for anyone. Written in the revocation's transaction (migration 0005).
blocked_keys = Table(
    "blocked_keys",
    metadata,
    Column("key_sha256", String(64), primary_key=True),
    Column("serial", String(40), nullable=False),  # the certificate whose revocation blocked it
    Column("authority_id", Integer, ForeignKey("authorities.id"), nullable=False),
    Column("blocked_at", UTCDateTime, nullable=False),
)


# The latest CRL of each authority that signs one (0006): what the CRL endpoint serves without
# signing, until it is stale (``revision`` behind the authority's ``revocation_revision``) or
# due (``this_update`` older than the CA's ``crl_period``). ``number`` only grows (RFC 5280 5.2.3).
crls = Table(
    "crls",
    metadata,
    Column("authority_id", Integer, ForeignKey("authorities.id"), primary_key=True),
    Column("number", Integer, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("this_update", UTCDateTime, nullable=False),
    Column("next_update", UTCDateTime, nullable=False),
    Column("entries", Integer, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Delegated OCSP signing certificates (0006): one current per issuing authority, issued by it
# (EKU id-kp-OCSPSigning, id-pkix-ocsp-nocheck, short validity), renewed by the CA itself. The
# certificate's serial is also recorded in ``certificates`` (template ``_ocsp-signer``) before
# it is signed, like every certificate the CA makes; the key lives in ``key_file`` (0600).
ocsp_signers = Table(
    "ocsp_signers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("authority_id", Integer, ForeignKey("authorities.id"), nullable=False),
    Column("serial", String(40), nullable=False),
    Column("certificate_der", LargeBinary, nullable=False),
    Column("key_file", String(255), nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "authority_id", "not_after"),
)

# -- ACME (0008) ---------------------------------------------------------------------------
# An ACME account is a public key (its JWK and RFC 7638 thumbprint) bound to a certpulse
# principal, by external account binding (``acme_eab_keys``) or, when ca.toml allows accounts
# without it, to the configured unbound principal. Orders, authorizations and challenges follow
# RFC 8555's objects; an order's certificate is requested through the same registration
# authority as a native request (``request_id``), so it is recorded, audited and revocable alike.
acme_accounts = Table(
    "acme_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_thumbprint", String(64), nullable=False, unique=True),  # RFC 7638, base64url SHA-256
    Column("jwk", Text, nullable=False),  # the public key as JSON
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=True),
    Column("status", String(16), nullable=False),  # valid | deactivated | revoked
    Column("contact", Text, nullable=False, default="[]"),  # JSON list of URLs
    Column("eab_kid", String(64), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "principal_id"),
)

# External account binding keys: handed out once by ``certpulse principal acme-eab NAME``. The
# HMAC key is longer than SHA-256's block, so HMAC itself uses only its SHA-256 (RFC 2104): that
# digest is what is kept, and what verifies the binding. One use, then spent; expiring.
acme_eab_keys = Table(
    "acme_eab_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("key_digest", String(64), nullable=False),  # hex SHA-256 of the HMAC key
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    Column("account_id", Integer, ForeignKey("acme_accounts.id"), nullable=True),
    Index(None, "principal_id"),
)

acme_orders = Table(
    "acme_orders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("acme_accounts.id"), nullable=False),
    Column("status", String(16), nullable=False),  # pending | ready | processing | valid | invalid
    Column("profile", String(64), nullable=False),  # the template
    Column("identifiers", Text, nullable=False),  # JSON list of {"type", "value"}
    Column("not_before", UTCDateTime, nullable=True),
    Column("not_after", UTCDateTime, nullable=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("replaces", Integer, ForeignKey("certificates.id"), nullable=True),  # ARI lineage
    Column("request_id", Integer, ForeignKey("requests.id"), nullable=True),
    Column("certificate_id", Integer, ForeignKey("certificates.id"), nullable=True),
    Column("error", Text, nullable=True),  # JSON problem document when invalid
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "account_id", "id"),
    Index(None, "request_id"),
    Index(None, "replaces"),
)

acme_authorizations = Table(
    "acme_authorizations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_id", Integer, ForeignKey("acme_orders.id"), nullable=False),
    Column("account_id", Integer, ForeignKey("acme_accounts.id"), nullable=False),
    Column("identifier_type", String(8), nullable=False),  # dns | ip
    Column("identifier_value", String(255), nullable=False),
    Column("wildcard", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),  # pending | valid | invalid | deactivated | expired | revoked
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "order_id"),
)

acme_challenges = Table(
    "acme_challenges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("authorization_id", Integer, ForeignKey("acme_authorizations.id"), nullable=False),
    Column("type", String(16), nullable=False),  # http-01 | dns-01 | tls-alpn-01
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # pending | processing | valid | invalid
    Column("started_at", UTCDateTime, nullable=True),  # when the client asked for validation
    Column("validated_at", UTCDateTime, nullable=True),
    Column("error", Text, nullable=True),  # JSON problem document when invalid
    Column("record", Text, nullable=True),  # JSON: what validation saw (address, port, URL)
    Index(None, "authorization_id"),
)

# Nonces are stateless (an HMAC over a counter and time, keyed by a secret in ``settings``), so
# any worker can check any nonce; a spent one is recorded here once, which makes it single-use
# across workers. Rows older than the nonce lifetime are deleted: such a nonce fails on age.
acme_spent_nonces = Table(
    "acme_spent_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("spent_at", UTCDateTime, nullable=False),
    Index(None, "spent_at"),
)
