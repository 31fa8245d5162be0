"""Counts an operator watches, read from the CA database: requests, refusals, certificates.

Why from the database and not from counters kept in memory: the database is the one record
every worker process of ``ca serve`` shares and that survives restarts, so the numbers are
right however many processes answer and however often they restart -- and counting costs
nothing on the paths that issue certificates. The price is paid when someone asks (a
metrics scrape): a handful of grouped queries, each one pass over its table. Nothing here
knows about HTTP or any metrics format; :mod:`certpulse.frontends.metrics` renders the result,
and asks for it through :func:`current_stats` (front ends never read the database themselves).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict

from cryptography import x509
from sqlalchemy import Connection, Engine, and_, case, func, select

from certpulse.ca.storage import schema as t
from certpulse.errors import Reason
from certpulse.sql.db import read

UNKNOWN_TEMPLATE = "(unknown)"
"""The template label of refusals that named no template this CA has. Template names are
letters, digits, '.', '_' and '-', so this never collides with a real one; folding unknown
names into one value keeps a caller who sends random names from creating unbounded series."""

_REFUSAL_REASONS = tuple(r.value for r in Reason)


@dataclasses.dataclass(frozen=True)
class CertificateCounts:
    issued: int = 0
    valid: int = 0  # issued, not revoked, not expired
    revoked: dict[str, int] = dataclasses.field(default_factory=dict)  # by revocation reason


@dataclasses.dataclass(frozen=True)
class CAStats:
    """A consistent reading of the CA's counts at ``now``."""

    now: dt.datetime
    templates: tuple[str, ...]
    requests: dict[tuple[str, str], int]  # (template, final status) -> count; pending excluded
    refused: dict[str, int]  # submission refusals by template (UNKNOWN_TEMPLATE for unknown names)
    pending: dict[str, int]  # template -> requests awaiting a CA manager
    oldest_pending: dt.datetime | None
    refusals: dict[tuple[str, str], int]  # (audit action, reason) -> count, every refusal audited
    certificates: dict[tuple[str, str], CertificateCounts]  # (issuer name, template)
    authorities: tuple[tuple[str, str, dt.datetime], ...]  # (name, role, notAfter)

    @property
    def oldest_pending_age(self) -> float:
        """Seconds the oldest pending request has waited; 0 when nothing waits."""
        if self.oldest_pending is None:
            return 0.0
        return max(0.0, (self.now - self.oldest_pending).total_seconds())


def current_stats(engine: Engine, now: dt.datetime) -> CAStats:
    """Every count, in a read transaction of its own."""
    with read(engine) as conn:
        return read_stats(conn, now)


def probe_database(engine: Engine) -> None:
    """Read one row of a small table, in a transaction of its own; raises what the database
    raises when it does not answer."""
    with read(engine) as conn:
        conn.execute(select(t.templates.c.name).limit(1)).first()


def read_stats(conn: Connection, now: dt.datetime) -> CAStats:
    """Every count in one read transaction (the caller's ``conn``)."""
    templates = tuple(sorted(conn.execute(select(t.templates.c.name)).scalars()))

    requests: dict[tuple[str, str], int] = {}
    pending: dict[str, int] = {}
    oldest: dt.datetime | None = None
    for row in conn.execute(
        select(t.requests.c.template_name, t.requests.c.status, func.count(), func.min(t.requests.c.created_at))
        .group_by(t.requests.c.template_name, t.requests.c.status)
    ):
        name, status, count, first = row
        if status == "pending":
            # Pending is a state a request leaves (approved or denied), so it is a gauge and not
            # an outcome: counting it among outcomes would make that counter go down.
            pending[name] = int(count)
            oldest = first if oldest is None or first < oldest else oldest
        else:
            requests[(name, status)] = int(count)

    # One pass over the audit table for both refusal families. A refusal row is one whose
    # reason is a refusal Reason (denials and revocations carry reasons of their own).
    # Submission refusals are action "refused" with the template the caller named; joining
    # the templates table folds names this CA does not have into UNKNOWN_TEMPLATE.
    # (Grouped by parameter-free expressions: PostgreSQL matches GROUP BY to SELECT by text.)
    unnamed = t.audit.c.template_name.is_(None)
    refused: dict[str, int] = defaultdict(int)
    refusals: dict[tuple[str, str], int] = defaultdict(int)
    for row in conn.execute(
        select(t.audit.c.action, t.audit.c.reason, t.templates.c.name, unnamed, func.count())
        .select_from(t.audit.outerjoin(t.templates, t.templates.c.name == t.audit.c.template_name))
        .where(t.audit.c.reason.in_(_REFUSAL_REASONS))
        .group_by(t.audit.c.action, t.audit.c.reason, t.templates.c.name, unnamed)
    ):
        action, reason, template, no_template, count = row
        refusals[(action, reason)] += int(count)
        if action == "refused" and not no_template:
            refused[template if template is not None else UNKNOWN_TEMPLATE] += int(count)

    authority_rows = conn.execute(
        select(t.authorities.c.id, t.authorities.c.name, t.authorities.c.role, t.authorities.c.certificate_der)
        .order_by(t.authorities.c.id)
    ).all()
    names = {row.id: row.name for row in authority_rows}
    authorities = tuple(
        (row.name, row.role, x509.load_der_x509_certificate(row.certificate_der).not_valid_after_utc)
        for row in authority_rows
    )

    # One pass over certificates: grouped by whether and why revoked, with the still-valid ones
    # summed alongside. Reserved rows (a serial recorded, not yet signed) are not certificates yet.
    valid = case((and_(t.certificates.c.revoked_at.is_(None), t.certificates.c.not_after > now), 1), else_=0)
    not_revoked = t.certificates.c.revoked_at.is_(None)
    grouped: dict[tuple[str, str], tuple[int, int, dict[str, int]]] = {}
    for row in conn.execute(
        select(t.certificates.c.authority_id, t.certificates.c.template_name, not_revoked,
               t.certificates.c.revocation_reason, func.count(), func.sum(valid))
        .where(t.certificates.c.status == "issued")
        .group_by(t.certificates.c.authority_id, t.certificates.c.template_name, not_revoked,
                  t.certificates.c.revocation_reason)
    ):
        authority_id, template, unrevoked, reason, count, valid_count = row
        key = (names.get(authority_id, str(authority_id)), template)
        issued, still_valid, revoked = grouped.get(key, (0, 0, {}))
        if not unrevoked:
            revoked[reason or "unspecified"] = revoked.get(reason or "unspecified", 0) + int(count)
        grouped[key] = (issued + int(count), still_valid + int(valid_count or 0), revoked)
    certificates = {key: CertificateCounts(*value) for key, value in grouped.items()}

    return CAStats(
        now=now, templates=templates, requests=requests, refused=dict(refused), pending=pending,
        oldest_pending=oldest, refusals=dict(refusals), certificates=certificates, authorities=authorities,
    )
