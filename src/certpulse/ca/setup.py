"""Creating a CA on disk and opening it: keys, certificates, database, first admin key."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import Engine, select

from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CAConfig, CADir, check_public_url
from certpulse.ca.issuance import publication_pointers
from certpulse.ca.model import Caller
from certpulse.ca.service import CAService
from certpulse.ca.state import KeyRing, bump_generation
from certpulse.ca.storage import migrate
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki.build import (
    backdated_start,
    build_ca_certificate,
    build_kra_certificate,
    inclusive_not_after,
    simple_name,
)
from certpulse.pki.certs import der, pem, thumbprint
from certpulse.pki.fingerprint import ca_fingerprint
from certpulse.pki.keys import generate_private_key, write_private_key
from certpulse.sql.db import make_engine, write

ROOT_VALIDITY = dt.timedelta(days=20 * 365)
ISSUER_VALIDITY = dt.timedelta(days=10 * 365)
KRA_VALIDITY = dt.timedelta(days=5 * 365)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def init_ca(ca_dir: CADir, *, name: str, key_type: str, now: dt.datetime,
            database_url: str | None = None, issuer_validity: dt.timedelta = ISSUER_VALIDITY,
            public_url: str | None = None) -> str:
    """Create a root CA, an issuing CA and a KRA in ``ca_dir``; return the admin API key (shown once).

    With ``public_url`` (where relying parties reach the CA's CRLs, OCSP responder and CA
    certificates) the first issuing CA already points at the root's CRL and certificate."""
    if ca_dir.exists():
        raise Refusal(Reason.CONFLICT, f"{ca_dir.root} already holds a CA")
    public_url = check_public_url(public_url) if public_url is not None else None
    root_key = generate_private_key(key_type)  # validates key_type before anything is written
    _private_dir(ca_dir.root)
    _private_dir(ca_dir.keys)
    ca_dir.certs.mkdir(exist_ok=True)
    config = CAConfig(name=name, database_url=database_url or ca_dir.default_database_url(),
                      policy_id=str(uuid.uuid4()), public_url=public_url)
    engine = make_engine(config.database_url, writer_lock=True)
    try:
        migrate(engine)
        with write(engine) as conn:
            if conn.execute(select(t.authorities.c.id)).first() is not None:
                raise Refusal(Reason.CONFLICT, "the database already holds a CA")
        root_start = backdated_start(now, ROOT_VALIDITY)
        root_cert = build_ca_certificate(
            subject=simple_name(f"{name} Root CA", name), public_key=root_key.public_key(),
            issuer_cert=None, signing_key=root_key, not_before=root_start,
            not_after=inclusive_not_after(root_start, ROOT_VALIDITY), path_length=1)
        write_private_key(ca_dir.keys / "root.key", root_key)
        (ca_dir.certs / "root.pem").write_text(pem(root_cert))
        kra_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        kra_start = backdated_start(now, KRA_VALIDITY, floor=root_cert.not_valid_before_utc)
        kra_cert = build_kra_certificate(
            subject=simple_name(f"{name} Key Recovery Agent", name), public_key=kra_key.public_key(),
            issuer_cert=root_cert, issuer_key=root_key, not_before=kra_start,
            not_after=inclusive_not_after(kra_start, KRA_VALIDITY))
        write_private_key(ca_dir.keys / "kra.key", kra_key)
        (ca_dir.certs / "kra.pem").write_text(pem(kra_cert))
        with write(engine) as conn:
            root_id = conn.execute(t.authorities.insert().values(
                name="root", role="root", certificate_der=der(root_cert), key_file="root.key",
                cost=0, renewal_only=False, enabled=True, created_at=now).returning(t.authorities.c.id)).scalar_one()
            conn.execute(t.authorities.insert().values(
                name="kra", role="kra", certificate_der=der(kra_cert), key_file="kra.key",
                parent_id=root_id, cost=0, renewal_only=False, enabled=True, created_at=now))
            bump_generation(conn)
        ca_dir.save(config)
        service = open_service(ca_dir, engine=engine, config=config)
        add_issuer(ca_dir, service, name="issuing-1", key_type=key_type, cost=10, templates=[],
                   renewal_only=False, now=now, validity=issuer_validity, ca_name=name)
        return CAAdmin(service, Caller(kind="operator", name="init")).add_api_key("admin", now)
    finally:
        engine.dispose()


def open_service(ca_dir: CADir, *, engine: Engine | None = None, config: CAConfig | None = None,
                 pool_size: int = 8) -> CAService:
    config = config or ca_dir.load()
    engine = engine or make_engine(config.database_url, pool_size=pool_size, writer_lock=True)
    return CAService(engine, KeyRing(ca_dir.keys), policy_id=config.policy_id,
                     token_lifetime=dt.timedelta(hours=config.token_lifetime_hours), publishing=config.publishing(),
                     acme=config.acme)


def add_issuer(ca_dir: CADir, service: CAService, *, name: str, key_type: str, cost: int,
               templates: list[str], renewal_only: bool, now: dt.datetime,
               validity: dt.timedelta = ISSUER_VALIDITY, ca_name: str | None = None) -> None:
    """A new issuing CA signed by the root, serving ``templates`` at ``cost``; with a public URL it
    points at the root's CRL and certificate (:func:`ca_pointers`)."""
    with write(service.engine) as conn:
        if conn.execute(select(t.authorities.c.id).where(t.authorities.c.name == name)).first():
            raise Refusal(Reason.CONFLICT, f"an authority named {name!r} exists")
        # the newest root: after a rollover, new issuing CAs are signed by the new root
        root = conn.execute(select(t.authorities).where(t.authorities.c.role == "root")
                            .order_by(t.authorities.c.id.desc())).first()
        if root is None:
            raise Refusal(Reason.STORE, "the CA has no root")
        known = set(conn.execute(select(t.templates.c.name)).scalars())
    for template in templates:
        if template not in known:
            raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {template!r}")
    root_cert = x509.load_der_x509_certificate(root.certificate_der)
    root_key = service.keyring.load(root.key_file, "root")
    key = generate_private_key(key_type)
    org = ca_name or str(root_cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value)
    start = backdated_start(now, validity, floor=root_cert.not_valid_before_utc)
    cert = build_ca_certificate(
        subject=simple_name(f"{org} Issuing CA {name}", str(org)), public_key=key.public_key(),
        issuer_cert=root_cert, signing_key=root_key, not_before=start,
        not_after=min(inclusive_not_after(start, validity), root_cert.not_valid_after_utc), path_length=0,
        extra=ca_pointers(service, root.name))
    key_file = f"issuer-{name}.key"
    write_private_key(ca_dir.keys / key_file, key)
    (ca_dir.certs / f"issuer-{name}.pem").write_text(pem(cert))
    with write(service.engine) as conn:
        authority_id = conn.execute(t.authorities.insert().values(
            name=name, role="issuer", certificate_der=der(cert), key_file=key_file, parent_id=root.id,
            cost=cost, renewal_only=renewal_only, enabled=True, created_at=now,
        ).returning(t.authorities.c.id)).scalar_one()
        for template in templates:
            conn.execute(t.issuer_templates.insert().values(authority_id=authority_id, template_name=template))
        bump_generation(conn)
        service.audit.record(conn, now, "operator:cli", "issuer-added",
                             detail=f"{name}; cost {cost}; renewal-only {renewal_only}; thumbprint {thumbprint(cert)}")


def ca_pointers(service: CAService, parent_name: str) -> tuple[x509.ExtensionType, ...]:
    """What a CA certificate signed by the root ``parent_name`` carries when the CA has a public
    URL: the root's CRL (where a revoked issuing CA is listed) and the root's certificate (AIA
    caIssuers). No OCSP pointer: relying parties check a CA certificate against its root's CRL.
    A root itself carries none (nothing above it could list it)."""
    return publication_pointers(service.publishing.public_url, parent_name, crl=True, ocsp=False, ca_issuers=True)


def rollover_root(ca_dir: CADir, service: CAService, *, key_type: str, now: dt.datetime,
                  validity: dt.timedelta = ROOT_VALIDITY) -> tuple[x509.Certificate, x509.Certificate, str]:
    """A new root, its cross-certificate from the current root, and a new issuing CA under the new
    root that takes over the enabled issuers' templates (they are disabled: new certificates chain
    to the new root). Returns the new root, the cross-certificate and the new issuer's name.

    Agents pinned to the current root accept the new one because the policy publishes the
    cross-certificate (the new root's subject and key, signed by the current root)."""
    key = generate_private_key(key_type)  # validates key_type before anything is written
    with write(service.engine) as conn:
        roots = conn.execute(select(t.authorities).where(t.authorities.c.role == "root")
                             .order_by(t.authorities.c.id)).all()
        if not roots:
            raise Refusal(Reason.STORE, "the CA has no root")
        issuers = conn.execute(select(t.authorities).where(
            (t.authorities.c.role == "issuer") & t.authorities.c.enabled).order_by(t.authorities.c.id)).all()
        served = set(conn.execute(select(t.issuer_templates.c.template_name).where(
            t.issuer_templates.c.authority_id.in_([i.id for i in issuers]))).scalars())
    current = roots[-1]
    generation = len(roots) + 1
    old_cert = x509.load_der_x509_certificate(current.certificate_der)
    old_key = service.keyring.load(current.key_file, current.name)
    org = str(old_cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value)
    subject = simple_name(f"{org} Root CA R{generation}", org)
    start = backdated_start(now, validity)
    new_root = build_ca_certificate(subject=subject, public_key=key.public_key(), issuer_cert=None, signing_key=key,
                                    not_before=start, not_after=inclusive_not_after(start, validity), path_length=1)
    cross = build_ca_certificate(subject=subject, public_key=key.public_key(), issuer_cert=old_cert,
                                 signing_key=old_key,
                                 not_before=backdated_start(now, validity, floor=old_cert.not_valid_before_utc),
                                 not_after=min(new_root.not_valid_after_utc, old_cert.not_valid_after_utc),
                                 path_length=1, extra=ca_pointers(service, current.name))
    name = f"root-r{generation}"
    write_private_key(ca_dir.keys / f"{name}.key", key)
    (ca_dir.certs / f"{name}.pem").write_text(pem(new_root))
    (ca_dir.certs / f"cross-r{generation}.pem").write_text(pem(cross))
    with write(service.engine) as conn:
        conn.execute(t.authorities.insert().values(
            name=name, role="root", certificate_der=der(new_root), key_file=f"{name}.key", cost=0,
            renewal_only=False, enabled=True, created_at=now))
        conn.execute(t.authorities.insert().values(
            name=f"cross-r{generation}", role="cross", certificate_der=der(cross), key_file=None,
            parent_id=current.id, cost=0, renewal_only=False, enabled=True, created_at=now))
        bump_generation(conn)
        service.audit.record(conn, now, "operator:cli", "root-rolled-over",
                             detail=f"{name} (SHA-256 {ca_fingerprint(new_root)}) "
                                    f"cross-signed by {current.name}")
    issuer = f"issuing-r{generation}"
    add_issuer(ca_dir, service, name=issuer, key_type=key_type, cost=min((i.cost for i in issuers), default=10),
               templates=sorted(served), renewal_only=False, now=now, ca_name=org)
    with write(service.engine) as conn:
        for old in issuers:
            conn.execute(t.authorities.update().where(t.authorities.c.id == old.id).values(enabled=False))
            service.audit.record(conn, now, "operator:cli", "issuer-disabled",
                                 detail=f"{old.name}: replaced by {issuer} under {name}")
        bump_generation(conn)
    return new_root, cross, issuer



def set_public_url(ca_dir: CADir, service: CAService, public_url: str | None, now: dt.datetime) -> CAConfig:
    """Save a new public URL (None: none) in ``ca.toml``, audited. Only what is signed from now on
    carries it: certificates already issued keep the pointers they were signed with (or none),
    and a running ``ca serve`` reads ``ca.toml`` when it starts."""
    url = check_public_url(public_url) if public_url is not None else None
    config = dataclasses.replace(ca_dir.load(), public_url=url)
    with write(service.engine) as conn:
        # in the audit row's transaction: a file that cannot be written leaves no audit row
        service.audit.record(conn, now, "operator:cli", "public-url-set", detail=url or "none")
        ca_dir.save(config)
    return config
