"""What a person does by hand: request a certificate (the seed's certreq), import, export, move,
and repair a store that lost its database.

Only a request talks to the CA. Import, export, move and repair work on the machine's store
alone, so they need no credential and work while the CA is down.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from certpulse.agent.config import AgentConfig, open_agent_store
from certpulse.agent.csr import build_csr
from certpulse.agent.executor import ActionOutcome
from certpulse.agent.gather import cached_templates, parse_policy, policy_cache_key
from certpulse.agent.model import Action, Kind
from certpulse.agent.policy_view import serving_issuers
from certpulse.agent.pulse import Agent
from certpulse.errors import Reason, Refusal
from certpulse.machine import recovery
from certpulse.machine.certstore import CertRecord, LocalStore
from certpulse.machine.events import EventDraft, EventId
from certpulse.pki import template_info
from certpulse.pki.keys import generate_private_key, key_matches


def parse_san(value: str) -> x509.GeneralName:
    """``dns:host``, ``ip:10.0.0.1``, ``email:a@b`` or a bare host name or address."""
    kind, sep, rest = value.partition(":")
    if sep and kind.lower() in ("dns", "ip", "email"):
        if kind.lower() == "ip":
            return x509.IPAddress(ipaddress.ip_address(rest))
        return x509.DNSName(rest) if kind.lower() == "dns" else x509.RFC822Name(rest)
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def request_certificate(agent: Agent, template_name: str, now: dt.datetime, *, subject: str | None,
                        sans: list[str]) -> ActionOutcome:
    """Enroll by hand: the certificate is marked manually enrolled (renewed by ``manage``)."""
    agent.fetch_policies(now, force=True)
    for policy in agent.policies:
        template = policy.server.template(template_name)
        if template is None:
            continue
        if "enroll" not in template.rights and "autoenroll" not in template.rights:
            raise Refusal(Reason.TEMPLATE_NOT_PERMITTED, f"this principal may not enroll for {template_name!r}")
        issuers = [issuer for _, issuer in serving_issuers((policy.server,), template.name, new_request=True)]
        if not issuers:
            raise Refusal(Reason.NO_ISSUER, f"no issuer serves {template_name!r} for new requests")
        try:
            name = x509.Name.from_rfc4514_string(subject) if subject else None
            general = [parse_san(s) for s in sans]
        except ValueError as exc:
            raise Refusal(Reason.INVALID_ARGUMENT, f"bad subject or SAN: {exc}") from None
        key = generate_private_key(template.default_key_type)
        csr = build_csr(key, name, general)
        action = Action(Kind.RENEW_MANUAL, "manual:request", template=template.name,
                        issuers=tuple(i.name for i in issuers), policy_url=policy.server.url, new_request=True)
        flight = agent.store.begin_flight(
            kind="request", template=template.name, policy_url=policy.server.url, issuers=action.issuers, key=key,
            csr=csr, renewal_of=None, replaces=(), replace_action=None, source="manual", now=now)
        return agent.executor().submit(action, flight, now)
    raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {template_name!r} in the policy")


def import_p12(store: LocalStore, config: AgentConfig, path: Path, password: str | None,
               now: dt.datetime) -> CertRecord:
    """Import a key and certificate as manually enrolled; its template is named from the policy
    each server gave last (no network)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot read {path}: {exc.strerror}") from None
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password.encode() if password else None)
    except ValueError:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path} is not a PKCS#12 file, or the password is wrong") from None
    if cert is None:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path} holds no certificate")
    if key is not None and not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise Refusal(Reason.KEY_NOT_ALLOWED, "only EC and RSA keys can be imported")
    if key is not None and not key_matches(key, cert.public_key()):
        raise Refusal(Reason.INVALID_ARGUMENT, f"the key in {path} does not belong to its certificate")
    info = template_info.decode(cert)
    templates = cached_templates(config.servers, store.get_state, now)
    template = templates.get(info.oid) if info is not None else None
    name = template.name if template is not None else None
    return store.install(key=key, cert=cert, chain=list(extra or []), source="manual", now=now,
                               template_name=name, action="import")


def export_p12(store: LocalStore, prefix: str, path: Path, password: str, now: dt.datetime) -> CertRecord:
    """Write the certificate with its key to PKCS#12 (0600): event 1007 once the file is written."""
    record = store.find(prefix)
    if not record.has_key:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{record.thumbprint} has no private key to export")
    if len(password) < 8:
        raise Refusal(Reason.INVALID_ARGUMENT, "use a password of at least 8 characters")
    data = pkcs12.serialize_key_and_certificates(
        record.subject.encode()[:64] or None, store.key(record.thumbprint),
        store.certificate(record.thumbprint), store.chain(record.thumbprint) or None,
        serialization.BestAvailableEncryption(password.encode()))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    store.record([EventDraft(EventId.EXPORTED, action="pkcs12", old=store.facts(record.thumbprint),
                             detail=f"exported with its private key to {path}")], now)
    return record


def export_pem(store: LocalStore, prefix: str, path: Path) -> CertRecord:
    """Write the certificate and its chain, no key: public data, so no event (the seed: only an
    export with the private key raises 1007)."""
    record = store.find(prefix)
    folder = store.folder(record.thumbprint)
    try:
        path.write_bytes((folder / "fullchain.pem").read_bytes())
    except OSError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot write {path}: {exc.strerror}") from None
    return record


def move_certificate(store: LocalStore, prefix: str, target: LocalStore, now: dt.datetime, *,
                     copy: bool) -> CertRecord:
    """Move (or copy) a certificate with its key into another agent's store (the seed's Move-Item):
    1006 with action ``move_or_copy`` there and, for a move, 1004 (action ``move``) here."""
    record = store.find(prefix)
    if not record.has_key:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{record.thumbprint} has no private key: only key-bearing "
                                               "certificates are moved")
    if not copy and store.served_by_binding(record.thumbprint):
        raise Refusal(Reason.CONFLICT, f"a binding still serves {record.thumbprint}: copy it (--copy), or move the "
                                       "binding to another certificate first")
    if target.root.resolve() == store.root.resolve():
        raise Refusal(Reason.INVALID_ARGUMENT, "the source and the target are the same store")
    try:
        target.find(record.thumbprint)
    except Refusal:
        pass
    else:
        raise Refusal(Reason.CONFLICT, f"{record.thumbprint} is already in the target store")
    installed = target.install(
        key=store.key(record.thumbprint), cert=store.certificate(record.thumbprint),
        chain=store.chain(record.thumbprint), source="manual", now=now, template_name=record.template_name,
        policy_id=record.policy_id, issuer_name=record.issuer_name, action="move_or_copy",
        policy_url=record.policy_url)
    if not copy:
        store.delete(record.thumbprint, now, action="move")
    return installed


def repair_store(directory: Path, config: AgentConfig, now: dt.datetime, *,
                 then: Callable[[LocalStore], None] | None = None) -> recovery.RepairReport:
    """``agent repair``: a damaged ``meta.db`` is moved aside, then every certificate folder without
    a record is re-imported with its key (:func:`certpulse.machine.recovery.repair`). Templates are
    named from the policy each server gave last, when the database still holds it, else from the
    live links; with one policy server, that server is the one that issued them. No network.
    ``then`` gets the repaired store (the CLI delivers the new events to tasks with it)."""
    moved = recovery.set_aside_damaged(directory / "store", now)
    store = open_agent_store(directory, config, check=False)
    try:
        known: dict[str, recovery.Known] = {}
        for server in config.servers:
            cached = store.get_state(policy_cache_key(server.url))
            if not cached:
                continue
            try:
                policy = parse_policy(cached["policy"], url=server.url, cost=server.cost, auth="token",
                                      is_default=server.is_default, now=now)
            except (Refusal, KeyError, TypeError):
                continue
            for template in policy.server.templates:
                known.setdefault(template.oid, recovery.Known(template.name, server.url, policy.server.policy_id))
        only = config.servers[0].url if len(config.servers) == 1 else None
        report = recovery.repair(store, now, known=known, default_policy_url=only, moved_aside=moved)
        if then is not None:
            then(store)
        return report
    finally:
        store.close()
