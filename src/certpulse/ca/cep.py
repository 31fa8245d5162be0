"""The enrollment policy for one caller (the seeds' CEP server, and their directory).

An agent reads it at every pulse (at most every ``refresh_after_seconds``): the templates the
caller may read, with its rights on each; the enabled issuing CAs, their cost and the templates
each serves; the trust material (roots, the cross-certificates that vouch for a new root after a
rollover, intermediates, key-recovery agents); and the caller's
own valid certificates, which the seeds keep in the directory (a template that "checks the
directory" enrolls only when none of its certificates is published there).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, Engine, and_, select

from certpulse.ca.model import Caller
from certpulse.ca.results import IssuerOffer, PolicyDocument, PublishedCertificate, TemplateOffer
from certpulse.ca.state import SnapshotCache
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import Template
from certpulse.pki.certs import pem, thumbprint
from certpulse.sql.db import read

REFRESH_AFTER_SECONDS = 600  # the seeds' template cache: refreshed no more often than every 10 minutes


class EnrollmentPolicy:
    def __init__(self, engine: Engine, state: SnapshotCache, policy_id: str) -> None:
        self.engine = engine
        self.policy_id = policy_id
        self._state = state

    def document(self, caller: Caller, now: dt.datetime) -> PolicyDocument:
        with read(self.engine) as conn:
            snap = self._state.get(conn)
            directory = _directory(conn, caller, now)
        templates = []
        for template in sorted(snap.templates.values(), key=lambda x: x.name):
            rights = rights_of(caller, template)
            if "read" in rights:
                templates.append(TemplateOffer(template, rights))
        issuers = tuple(
            IssuerOffer(name=a.name, certificate=pem(a.certificate), cost=a.cost, renewal_only=a.renewal_only,
                        templates=tuple(sorted(a.templates)), thumbprint=thumbprint(a.certificate))
            for a in snap.by_role("issuer") if a.enabled
        )
        return PolicyDocument(
            policy_id=self.policy_id,
            generated_at=now,
            refresh_after_seconds=REFRESH_AFTER_SECONDS,
            templates=tuple(templates),
            issuers=issuers,
            roots=tuple(pem(a.certificate) for a in snap.by_role("root")),
            intermediates=tuple(pem(a.certificate) for a in snap.by_role("issuer")),
            kra=tuple(pem(a.certificate) for a in snap.by_role("kra") if a.enabled),
            directory=directory,
            cross_certificates=tuple(pem(a.certificate) for a in snap.by_role("cross")),
        )

    def roots(self) -> tuple[str, ...]:
        """The root certificates (PEM), for any caller: an agent pins the one whose fingerprint it
        was given and discards the rest (they are public, and worth nothing unpinned)."""
        with read(self.engine) as conn:
            snap = self._state.get(conn)
        return tuple(pem(a.certificate) for a in snap.by_role("root"))


def rights_of(caller: Caller, template: Template) -> frozenset[str]:
    """A principal's rights on a template; an API key (an administration tool) may read them all."""
    if caller.kind == "admin":
        return frozenset({"read"})
    if caller.kind == "principal":
        return template.rights_of(caller.name, caller.groups)
    return frozenset()


def _directory(conn: Connection, caller: Caller, now: dt.datetime) -> tuple[PublishedCertificate, ...]:
    """The caller's issued certificates that are neither revoked nor expired, oldest first."""
    if caller.principal_id is None:
        return ()
    rows = conn.execute(
        select(t.certificates.c.template_name, t.certificates.c.serial, t.certificates.c.thumbprint,
               t.certificates.c.not_after)
        .where(and_(
            t.certificates.c.principal_id == caller.principal_id,
            t.certificates.c.status == "issued",
            t.certificates.c.revoked_at.is_(None),
            t.certificates.c.not_after > now,
        ))
        .order_by(t.certificates.c.id)
    )
    return tuple(PublishedCertificate(template=r.template_name, serial=r.serial, thumbprint=r.thumbprint,
                                      not_after=r.not_after) for r in rows)
