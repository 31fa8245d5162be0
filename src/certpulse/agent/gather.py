"""Gather: read the policy servers and the local store into the planner's snapshots.

This is where the network and the disk are read and where the hostile policy answer is
checked field by field; the planner then decides with no I/O. The roots are the agent's pinned
roots (agent/trust.py), never the policy's: a policy root is accepted only when pinned or
cross-signed by a pinned root, and a policy carrying any other root is trusted for nothing.
Issuer and KRA certificates are validated against those roots (signature chain, validity at
``now``, CA constraints), and every stored certificate's chain is validated the same way
(RFC 5280 path basics).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from certpulse.agent.config import PolicyServerConfig
from certpulse.agent.model import (
    CLOCK_SKEW,
    IssuerPolicy,
    PendingRequest,
    PolicyServer,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
)
from certpulse.agent.planner import renewal_time
from certpulse.agent.trust import is_ca, judge_roots, signed_by, valid_at
from certpulse.errors import Reason, Refusal
from certpulse.machine.certstore import CertRecord, LocalStore
from certpulse.pki import template_info
from certpulse.pki.certs import thumbprint

log = logging.getLogger("certpulse.agent")

RA_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.1")
KRA_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.6")


class PolicyError(Refusal):
    def __init__(self, detail: str) -> None:
        super().__init__(Reason.MALFORMED_REQUEST, f"bad policy from the server: {detail}")


@dataclasses.dataclass(frozen=True)
class Trust:
    """Trust material (step 2): the accepted roots (pinned, or cross-signed by a pinned one), the
    policy's valid issuer CAs and valid KRA certificates under them."""

    roots: tuple[x509.Certificate, ...]
    issuers: dict[str, x509.Certificate]
    kra: tuple[x509.Certificate, ...]


@dataclasses.dataclass(frozen=True)
class GatheredPolicy:
    server: PolicyServer
    trust: Trust
    # Roots the policy's cross-certificates earned a place among the pins (a rollover; the caller
    # persists them), and why the policy is trusted for nothing (None when it is trusted).
    new_roots: tuple[x509.Certificate, ...] = ()
    distrust: str | None = None


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise PolicyError(f"{key} is not a list")
    return value


def _pems(data: dict[str, Any], key: str) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for item in _list(data, key):
        if not isinstance(item, str):
            raise PolicyError(f"{key} holds a non-string")
        try:
            certs.append(x509.load_pem_x509_certificate(item.encode()))
        except ValueError:
            raise PolicyError(f"{key} holds an unparsable certificate") from None
    return certs


def chain_valid(cert: x509.Certificate, intermediates: Iterable[x509.Certificate],
                roots: Iterable[x509.Certificate], now: dt.datetime) -> bool:
    """Leaf -> (CA intermediates)* -> a root, every link signed, CA-flagged and valid at ``now``."""
    roots = list(roots)
    pool = [c for c in intermediates if is_ca(c)]
    current = cert
    for _ in range(6):
        if not valid_at(current, now):
            return False
        for root in roots:
            if signed_by(current, root) and valid_at(root, now):
                return True
        parent = next((c for c in pool if signed_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


def _duration(value: Any, what: str) -> dt.timedelta:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PolicyError(f"{what} is not a positive number of seconds")
    return dt.timedelta(seconds=value)


def _str(item: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = item.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise PolicyError(f"template field {key} is missing or not a string")
    return value


def _strs(item: dict[str, Any], key: str) -> tuple[str, ...]:
    value = item.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{key} is not a list of strings")
    return tuple(value)


def _template(item: Any) -> TemplatePolicy:
    if not isinstance(item, dict):
        raise PolicyError("a template is not an object")
    key = item.get("key")
    if not isinstance(key, dict):
        raise PolicyError("a template has no key settings")
    major, minor, ra = item.get("major_version"), item.get("minor_version"), item.get("ra_signatures", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (major, minor, ra)):
        raise PolicyError("template versions and RA count must be whole numbers")
    assert isinstance(major, int) and isinstance(minor, int) and isinstance(ra, int)
    return TemplatePolicy(
        name=_str(item, "name") or "", oid=_str(item, "oid") or "", major_version=major, minor_version=minor,
        validity=_duration(item.get("validity_seconds"), "validity_seconds"),
        renewal_period=_duration(item.get("renewal_period_seconds"), "renewal_period_seconds"),
        purpose=_str(item, "purpose") or "signature", key_types=_strs(key, "types"),
        default_key_type=_str(key, "default") or "ec-p256", archive_private_key=bool(key.get("archive", False)),
        subject_source=_str(item, "subject_source") or "principal",
        renewal_subject_from_existing=bool(item.get("renewal_subject_from_existing", False)),
        manager_approval=bool(item.get("manager_approval", False)), ra_signatures=ra,
        ra_policy=_str(item, "ra_policy", optional=True), supersedes=_strs(item, "supersedes"),
        old_certificate=_str(item, "old_certificate") or "archive",
        user_interaction=bool(item.get("user_interaction", False)),
        check_directory=bool(item.get("check_directory", False)), rights=frozenset(_strs(item, "rights")),
    )


def parse_policy(data: dict[str, Any], *, url: str, cost: int, auth: str, is_default: bool,
                 now: dt.datetime, pins: Sequence[x509.Certificate] = ()) -> GatheredPolicy:
    """The policy as the planner sees it, judged under ``pins`` (the server's pinned roots)."""
    policy_id = data.get("policy_id")
    if not isinstance(policy_id, str) or not policy_id or len(policy_id) > 64:
        raise PolicyError("policy_id is missing")
    judged = judge_roots(pins, _pems(data, "roots"), _pems(data, "cross_certificates"), now)
    roots = judged.roots
    trusted = judged.distrust is None
    templates = tuple(_template(item) for item in _list(data, "templates"))
    issuers: list[IssuerPolicy] = []
    issuer_certs: dict[str, x509.Certificate] = {}
    for item in _list(data, "issuers"):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("cost"), int):
            raise PolicyError("an issuer has no name or cost")
        certs = _pems({"c": [item.get("certificate")]}, "c")
        cert = certs[0]
        valid = trusted and is_ca(cert) and valid_at(cert, now) and chain_valid(cert, [], roots, now)
        if valid:
            issuer_certs[item["name"]] = cert
        starts = None if valid or not trusted else _starts_at(cert, [*roots, *pins], now)
        issuers.append(IssuerPolicy(name=item["name"], cost=item["cost"],
                                    renewal_only=bool(item.get("renewal_only", False)),
                                    templates=frozenset(_strs(item, "templates")), valid=valid, starts_at=starts))
    kra = tuple(k for k in _pems(data, "kra")
                if trusted and chain_valid(k, [], roots, now) and _has_eku(k, KRA_EKU))
    directory: list[tuple[str, dt.datetime]] = []
    for entry in _list(data, "directory"):
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("template"), str) and isinstance(entry.get("not_after"), str):
            try:
                directory.append((entry["template"], dt.datetime.fromisoformat(entry["not_after"])))
            except ValueError:
                raise PolicyError("a directory entry has a bad date") from None
    server = PolicyServer(url=url, policy_id=policy_id, cost=cost, auth=auth, is_default=is_default,
                          templates=templates, issuers=tuple(issuers), kra_valid=bool(kra),
                          directory=tuple(directory))
    return GatheredPolicy(server, Trust(roots, issuer_certs, kra), new_roots=judged.added, distrust=judged.distrust)


def _starts_at(cert: x509.Certificate, roots: Iterable[x509.Certificate], now: dt.datetime) -> dt.datetime | None:
    """When an issuer that is not valid at ``now`` becomes valid, if the only thing wrong is that
    it, or the pinned root that signed it, starts after ``now`` (this machine's clock is behind
    the CA's); None when something else is wrong with it."""
    if not is_ca(cert):
        return None
    for root in roots:
        at = max(cert.not_valid_before_utc, root.not_valid_before_utc)
        if at > now and signed_by(cert, root) and chain_valid(cert, [], [root], at):
            return at
    return None


def _has_eku(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        return oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False


def _template_name(record: CertRecord, template_names: dict[str, str] | None) -> str | None:
    """The template's name as the policy now calls it (by OID), else as it was recorded."""
    if record.template_oid and template_names and record.template_oid in template_names:
        return template_names[record.template_oid]
    return record.template_name


def stored_certificate(record: CertRecord, cert: x509.Certificate, chain: list[x509.Certificate],
                       trusts: Iterable[Trust], now: dt.datetime, *, revoked: bool = False,
                       template_names: dict[str, str] | None = None) -> StoredCertificate:
    trusts = list(trusts)
    # A certificate that starts within the allowed clock skew is validated at its start; so is
    # one of this machine's own (issued to its key) however late it starts: this machine's clock
    # is behind the CA's, and the certificate must not look missing (the plan notes it instead).
    own = record.has_key
    start = cert.not_valid_before_utc
    at = now if start <= now else start if own else min(start, now + CLOCK_SKEW)
    valid = any(chain_valid(cert, [*chain, *t.issuers.values()], t.roots, at) for t in trusts)
    name = _template_name(record, template_names)
    return StoredCertificate(
        thumbprint=record.thumbprint, subject=record.subject, not_before=record.not_before,
        not_after=record.not_after, template_oid=record.template_oid, template_name=name,
        major_version=record.major_version, minor_version=record.minor_version,
        source="manual" if record.source == "manual" else "auto", policy_id=record.policy_id,
        archived=record.archived, chain_valid=valid, revoked=revoked, is_ra=_has_eku(cert, RA_EKU), own=own,
    )


def recorded_certificate(record: CertRecord, *, revoked: bool = False,
                         template_names: dict[str, str] | None = None) -> StoredCertificate:
    """A certificate as its record describes it, for one whose files cannot be read: taken as it
    was when it was installed (its chain was checked then)."""
    name = _template_name(record, template_names)
    return StoredCertificate(
        thumbprint=record.thumbprint, subject=record.subject, not_before=record.not_before,
        not_after=record.not_after, template_oid=record.template_oid, template_name=name,
        major_version=record.major_version, minor_version=record.minor_version,
        source="manual" if record.source == "manual" else "auto", policy_id=record.policy_id,
        archived=record.archived, revoked=revoked)


def policy_cache_key(url: str) -> str:
    """The state entry holding the last policy ``url`` gave. The pulse writes it; readers that must
    not contact a server (status, metrics, manual enrollment) read it through :func:`cached_templates`."""
    return f"policy:{url}"


def cached_templates(servers: Iterable[PolicyServerConfig], state: Callable[[str], Any],
                     now: dt.datetime) -> dict[str, TemplatePolicy]:
    """Templates by OID from the last policy each server gave (no network). ``state`` reads a
    state entry, so a caller may pass values it already read in its own transaction. A cached
    policy that no longer parses is skipped, as if the server had not answered."""
    found: dict[str, TemplatePolicy] = {}
    for server in servers:
        cached = state(policy_cache_key(server.url))
        if not cached:
            continue
        try:
            gathered = parse_policy(cached["policy"], url=server.url, cost=server.cost, auth="token",
                                    is_default=server.is_default, now=now)
        except Refusal:
            continue
        for template in gathered.server.templates:
            found.setdefault(template.oid, template)
    return found


def planned_renewal(record: CertRecord, cert: x509.Certificate, templates: Mapping[str, TemplatePolicy],
                    now: dt.datetime) -> dt.datetime | None:
    """When the planner will renew ``record`` (its template as last cached), or None when its
    template is not in the policy. One definition for ``agent status`` and the metrics, so the
    two never disagree with each other or with the planner."""
    template = templates.get(record.template_oid or "")
    if template is None:
        return None
    return renewal_time(stored_certificate(record, cert, [], [], now), template)


def snapshot(store: LocalStore, policies: Iterable[GatheredPolicy], now: dt.datetime,
             revoked: frozenset[str] = frozenset(), additional: Iterable[Path] = (),
             broken: frozenset[str] = frozenset()) -> StoreSnapshot:
    """What the planner sees. ``broken`` certificates (files the pulse found unusable and
    reported) are seen from their records alone, so their template still counts as held (the
    agent does not enroll anew behind the operator's back; the pulse says what to do); an
    archived one whose files no longer parse is left out (logged). One damaged certificate never
    keeps the others from being planned."""
    policies = list(policies)
    names = {t.oid: t.name for p in policies for t in p.server.templates}
    trusts = [p.trust for p in policies]
    certs: list[StoredCertificate] = []
    for r in store.certificates():
        if r.thumbprint in broken:
            certs.append(recorded_certificate(r, revoked=r.thumbprint in revoked, template_names=names))
            continue
        try:
            cert, chain = store.certificate(r.thumbprint), store.chain(r.thumbprint)
        except (OSError, ValueError) as exc:
            if not r.archived:
                raise
            log.warning("the archived certificate %s cannot be read (%s); left out of planning", r.thumbprint, exc)
            continue
        certs.append(stored_certificate(r, cert, chain, trusts, now, revoked=r.thumbprint in revoked,
                                        template_names=names))
    certs += monitored(additional)
    pending = tuple(
        PendingRequest(request_id=f.request_id, template=f.template_name, issuer=f.issuer or "",
                       policy_url=f.policy_url, submitted_at=f.submitted_at or f.created_at, renewal_of=f.renewal_of)
        for f in store.flights() if f.status == "pending" and f.request_id is not None
    )
    in_flight = tuple(sorted({f.template_name for f in store.flights() if f.status == "created"}))
    return StoreSnapshot(certificates=tuple(certs), pending=pending, in_flight=in_flight)


def monitored_files(folders: Iterable[Path]) -> list[tuple[Path, x509.Certificate]]:
    """(folder, certificate) for the first certificate of every PEM file in the additional stores."""
    found: list[tuple[Path, x509.Certificate]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".pem", ".crt", ".cer") or not path.is_file():
                continue
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except (ValueError, OSError):
                continue
            found.append((folder, certs[0]))
    return found


def monitored(folders: Iterable[Path]) -> list[StoredCertificate]:
    """Certificates in additional stores: watched for expiry only, never renewed."""
    found: list[StoredCertificate] = []
    for folder, cert in monitored_files(folders):
        info = template_info.decode(cert)
        found.append(StoredCertificate(
            thumbprint=thumbprint(cert), subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            template_oid=info.oid if info else None, template_name=None,
            major_version=info.major if info else 0, minor_version=info.minor if info else 0,
            source="manual", policy_id=None, store=str(folder)))
    return found
