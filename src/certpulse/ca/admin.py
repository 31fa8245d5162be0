"""Administration of the CA's directory and catalogue: templates, principals, groups, issuers, API keys.

Credentials are withdrawn here too: API keys revoked (never the last valid one), principals
disabled, enabled again or removed, enrollment tokens superseded by a newer one.

Every change bumps the state generation (so serving processes reload their snapshot) and
writes an audit row with the acting operator.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import secrets
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from certpulse.ca.auth import api_key_valid
from certpulse.ca.model import IMPLICIT_GROUPS, MANAGER_ROLE, Caller, new_secret
from certpulse.ca.service import CAService
from certpulse.ca.state import bump_generation
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import Template, parse_template, parse_template_toml
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from certpulse.pki.template_info import new_template_oid
from certpulse.sql.db import read, write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ROLES = (MANAGER_ROLE,)
KINDS = ("machine", "user")


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")


class CAAdmin:
    def __init__(self, service: CAService, caller: Caller) -> None:
        self.service = service
        self.engine = service.engine
        self.caller = caller

    def _audit(self, conn: Connection, now: dt.datetime, action: str, **fields: Any) -> None:
        self.service.audit.record(conn, now, self.caller.actor, action, **fields)

    # -- templates ----------------------------------------------------------------------

    def add_template(self, text: str, now: dt.datetime, issuers: list[str] | None = None) -> Template:
        template = parse_template_toml(text, default_oid=new_template_oid())
        with write(self.engine) as conn:
            if conn.execute(select(t.templates.c.name).where(t.templates.c.name == template.name)).first():
                raise Refusal(Reason.CONFLICT, f"template {template.name!r} exists; use 'template edit'")
            self._check_references(conn, template)
            try:
                with conn.begin_nested():
                    conn.execute(t.templates.insert().values(
                        name=template.name, oid=template.oid, major_version=template.major_version,
                        minor_version=template.minor_version, document=json.dumps(template.document()),
                        created_at=now, updated_at=now))
            except IntegrityError:
                raise Refusal(Reason.CONFLICT, f"template OID {template.oid} is already used") from None
            issuer_rows = conn.execute(
                select(t.authorities.c.id, t.authorities.c.name).where(t.authorities.c.role == "issuer")
            ).all()
            chosen = [r for r in issuer_rows if issuers is None or r.name in issuers]
            unknown = set(issuers or ()) - {r.name for r in issuer_rows}
            if unknown:
                raise Refusal(Reason.UNKNOWN_ISSUER, f"no issuer named {sorted(unknown)[0]!r}")
            for row in chosen:
                conn.execute(t.issuer_templates.insert().values(authority_id=row.id, template_name=template.name))
            bump_generation(conn)
            self._audit(conn, now, "template-added", template=template.name,
                        detail=f"version {template.version}; issuers {', '.join(r.name for r in chosen) or 'none'}")
        return template

    def edit_template(self, name: str, text: str, now: dt.datetime) -> Template:
        """Replace a template's settings; raises the minor version (no forced re-enrollment)."""
        with write(self.engine) as conn:
            row = self._template_row(conn, name)
            template = parse_template_toml(text, default_oid=row.oid)
            if template.name != name:
                raise Refusal(Reason.INVALID_TEMPLATE, f"the file defines {template.name!r}, not {name!r}")
            if template.oid != row.oid:
                raise Refusal(Reason.INVALID_TEMPLATE, "a template's OID cannot change")
            self._check_references(conn, template)
            template = template.with_versions(row.major_version, row.minor_version + 1)
            self._store_template(conn, template, now)
            self._audit(conn, now, "template-edited", template=name, detail=f"version {template.version}")
        return template

    def reenroll_all(self, name: str, now: dt.datetime) -> Template:
        """Raise the major version: every holder renews at its next pulse (the seed's "Reenroll All")."""
        with write(self.engine) as conn:
            row = self._template_row(conn, name)
            template = parse_template(json.loads(row.document), default_oid=row.oid)
            template = template.with_versions(row.major_version + 1, 0)
            self._store_template(conn, template, now)
            self._audit(conn, now, "template-reenroll-all", template=name, detail=f"version {template.version}")
        return template

    def _store_template(self, conn: Connection, template: Template, now: dt.datetime) -> None:
        conn.execute(update(t.templates).where(t.templates.c.name == template.name).values(
            major_version=template.major_version, minor_version=template.minor_version,
            document=json.dumps(template.document()), updated_at=now))
        bump_generation(conn)

    @staticmethod
    def _template_row(conn: Connection, name: str) -> Any:
        row = conn.execute(select(t.templates).where(t.templates.c.name == name)).first()
        if row is None:
            raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {name!r}")
        return row

    @staticmethod
    def _check_references(conn: Connection, template: Template) -> None:
        known = set(conn.execute(select(t.templates.c.name)).scalars())
        for old in template.supersedes:
            if old not in known:
                raise Refusal(Reason.INVALID_TEMPLATE, f"supersedes names unknown template {old!r}")

    def templates(self) -> list[Template]:
        with read(self.engine) as conn:
            return sorted(self.service.state.get(conn).templates.values(), key=lambda x: x.name)

    def template(self, name: str) -> Template:
        with read(self.engine) as conn:
            template = self.service.state.get(conn).templates.get(name)
        if template is None:
            raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {name!r}")
        return template

    # -- principals and groups ----------------------------------------------------------

    def add_principal(self, name: str, kind: str, now: dt.datetime, groups: list[str] | None = None,
                      roles: list[str] | None = None) -> dict[str, Any]:
        _check_name("principal", name)
        if kind not in KINDS:
            raise Refusal(Reason.INVALID_ARGUMENT, f"kind must be one of {', '.join(KINDS)}")
        for group in groups or ():
            _check_name("group", group)
        for role in roles or ():
            if role not in ROLES:
                raise Refusal(Reason.INVALID_ARGUMENT, f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        with write(self.engine) as conn:
            try:
                with conn.begin_nested():
                    principal_id = conn.execute(t.principals.insert().values(
                        name=name, kind=kind, roles=",".join(sorted(set(roles or ()))), enabled=True,
                        created_at=now).returning(t.principals.c.id)).scalar_one()
            except IntegrityError:
                raise Refusal(Reason.CONFLICT,
                              f"principal {name!r} exists; use 'principal token' for a new token") from None
            for group in sorted(set(groups or ())):
                conn.execute(t.group_members.insert().values(group_name=group, principal_id=principal_id))
            token, expires = self._new_token(conn, principal_id, now)
            bump_generation(conn)
            self._audit(conn, now, "principal-added", detail=f"{kind} {name}; groups {sorted(set(groups or ()))}")
        return {"name": name, "kind": kind, "token": token, "expires_at": expires.isoformat()}

    def new_token(self, name: str, now: dt.datetime) -> dict[str, Any]:
        """A fresh one-time token (e.g. to re-bootstrap a rebuilt machine).

        The principal's earlier unused tokens are superseded: only the newest can be exchanged.
        Its current credential keeps working until the new token is exchanged, which replaces it
        (as a new bootstrap token does elsewhere); to cut the credential off now, disable it."""
        with write(self.engine) as conn:
            principal_id = self._principal_id(conn, name)
            superseded = conn.execute(
                update(t.enrollment_tokens).where(
                    t.enrollment_tokens.c.principal_id == principal_id, t.enrollment_tokens.c.used_at.is_(None),
                    t.enrollment_tokens.c.superseded_at.is_(None),
                ).values(superseded_at=now)
            ).rowcount
            if superseded:
                self._audit(conn, now, "token-superseded", detail=f"principal {name}: {superseded} unused token(s)")
            token, expires = self._new_token(conn, principal_id, now)
            self._audit(conn, now, "token-issued", detail=f"principal {name}")
        return {"name": name, "token": token, "expires_at": expires.isoformat(), "superseded": superseded}

    def set_principal_enabled(self, name: str, enabled: bool, now: dt.datetime) -> bool:
        """Disable a principal (its credential opens nothing, in every process, from the commit
        on; its tokens cannot be exchanged; its pending requests cannot be approved) or enable it
        again. Returns whether it changed."""
        with write(self.engine) as conn:
            row = conn.execute(select(t.principals).where(t.principals.c.name == name).with_for_update()).first()
            if row is None:
                raise Refusal(Reason.NOT_FOUND, f"no principal named {name!r}")
            changed = bool(row.enabled) != enabled
            conn.execute(update(t.principals).where(t.principals.c.id == row.id).values(enabled=enabled))
            bump_generation(conn)
            self._audit(conn, now, "principal-enabled" if enabled else "principal-disabled",
                        detail=f"{row.kind} {name}" + ("" if changed else " (unchanged)"))
        return changed

    def remove_principal(self, name: str, now: dt.datetime) -> dict[str, Any]:
        """Remove a principal: its row, groups and tokens go, so its credential opens nothing and
        its name is free; a principal added later under that name is a new one (a new id: it
        cannot read, renew or co-sign with what the removed one had). Its pending requests are
        denied. Its certificates and requests stay on record (unlinked from any principal; the
        requests keep the requester's name) and the audit trail keeps every row. Certificates
        are not revoked: revoke them separately when the key is not to be trusted."""
        with write(self.engine) as conn:
            row = conn.execute(select(t.principals).where(t.principals.c.name == name).with_for_update()).first()
            if row is None:
                raise Refusal(Reason.NOT_FOUND, f"no principal named {name!r}")
            pending = conn.execute(
                select(t.requests.c.id, t.requests.c.template_name).where(
                    t.requests.c.principal_id == row.id, t.requests.c.status == "pending",
                ).with_for_update()
            ).all()
            why = f"principal {name} was removed"
            for request in pending:
                conn.execute(update(t.requests).where(t.requests.c.id == request.id).values(
                    status="denied", reason=why, decided_at=now, decided_by=self.caller.actor))
                self._audit(conn, now, "denied", template=request.template_name, request_id=request.id,
                            reason="denied-by-manager", detail=why)
            certificates = conn.execute(update(t.certificates).where(t.certificates.c.principal_id == row.id)
                                        .values(principal_id=None)).rowcount
            requests = conn.execute(update(t.requests).where(t.requests.c.principal_id == row.id)
                                    .values(principal_id=None)).rowcount
            conn.execute(delete(t.group_members).where(t.group_members.c.principal_id == row.id))
            conn.execute(delete(t.enrollment_tokens).where(t.enrollment_tokens.c.principal_id == row.id))
            # ACME: its binding keys go; its accounts stay on record, bound to nothing (they open nothing)
            conn.execute(delete(t.acme_eab_keys).where(t.acme_eab_keys.c.principal_id == row.id))
            conn.execute(update(t.acme_accounts).where(t.acme_accounts.c.principal_id == row.id)
                         .values(principal_id=None, status="deactivated", updated_at=now))
            conn.execute(delete(t.principals).where(t.principals.c.id == row.id))
            bump_generation(conn)
            self._audit(conn, now, "principal-removed",
                        detail=f"{row.kind} {name} (id {row.id}); kept {certificates} certificate(s) and "
                               f"{requests} request(s); denied {len(pending)} pending")
        return {"name": name, "kind": row.kind, "certificates_kept": certificates, "requests_kept": requests,
                "pending_denied": len(pending)}

    def _new_token(self, conn: Connection, principal_id: int, now: dt.datetime) -> tuple[str, dt.datetime]:
        token, digest = new_secret("cpe")
        expires = now + self.service.token_lifetime
        conn.execute(t.enrollment_tokens.insert().values(
            token_hash=digest, principal_id=principal_id, expires_at=expires, created_at=now))
        return token, expires

    @staticmethod
    def _principal_id(conn: Connection, name: str) -> int:
        principal_id = conn.execute(select(t.principals.c.id).where(t.principals.c.name == name)).scalar()
        if principal_id is None:
            raise Refusal(Reason.NOT_FOUND, f"no principal named {name!r}")
        return int(principal_id)

    def set_groups(self, name: str, now: dt.datetime, add: list[str], remove: list[str]) -> None:
        for group in add:
            _check_name("group", group)
        with write(self.engine) as conn:
            principal_id = self._principal_id(conn, name)
            current = set(conn.execute(select(t.group_members.c.group_name)
                                       .where(t.group_members.c.principal_id == principal_id)).scalars())
            for group in set(add) - current:
                conn.execute(t.group_members.insert().values(group_name=group, principal_id=principal_id))
            for group in set(remove) & current:
                conn.execute(delete(t.group_members).where(
                    (t.group_members.c.principal_id == principal_id) & (t.group_members.c.group_name == group)))
            bump_generation(conn)
            self._audit(conn, now, "principal-groups", detail=f"{name}: +{sorted(add)} -{sorted(remove)}")

    def principals(self) -> list[dict[str, Any]]:
        with read(self.engine) as conn:
            members: dict[int, list[str]] = {}
            for row in conn.execute(select(t.group_members)):
                members.setdefault(row.principal_id, []).append(row.group_name)
            return [
                {"name": r.name, "kind": r.kind, "groups": sorted([*members.get(r.id, []), IMPLICIT_GROUPS[r.kind]]),
                 "roles": [x for x in r.roles.split(",") if x], "enrolled": r.credential_hash is not None,
                 "enabled": r.enabled, "created_at": r.created_at.isoformat()}
                for r in conn.execute(select(t.principals).order_by(t.principals.c.name))
            ]

    # -- ACME external account binding ---------------------------------------------------

    def add_acme_eab(self, name: str, now: dt.datetime, expires: dt.timedelta | None = None) -> dict[str, Any]:
        """A one-time external account binding key for the principal ``name``: the ACME account
        a client makes with it acts as that principal. Returned once: the key id and the HMAC key
        (base64url of 96 random bytes). Only the SHA-256 of the key is kept: being longer than
        SHA-256's 64-byte block, the key enters HMAC-SHA256 (HS256) as that digest (RFC 2104),
        so the digest verifies the binding and the key itself is never stored or logged."""
        lifetime = expires if expires is not None else self.service.acme.config.duration("eab_key_lifetime")
        if lifetime <= dt.timedelta(0):
            raise Refusal(Reason.INVALID_ARGUMENT, "a binding key's lifetime must be positive")
        raw = secrets.token_bytes(96)
        kid = secrets.token_urlsafe(24)
        expires_at = now + lifetime
        try:
            with write(self.engine) as conn:
                row = conn.execute(select(t.principals.c.id, t.principals.c.enabled)
                                   .where(t.principals.c.name == name)).first()
                if row is None:
                    raise Refusal(Reason.NOT_FOUND, f"no principal named {name!r}")
                if not row.enabled:
                    raise Refusal(Reason.INVALID_ARGUMENT, f"principal {name!r} is disabled; enable it first")
                conn.execute(t.acme_eab_keys.insert().values(
                    kid=kid, principal_id=row.id, key_digest=hashlib.sha256(raw).hexdigest(), created_at=now,
                    expires_at=expires_at))
                self._audit(conn, now, "acme-eab-created",
                            detail=f"principal {name}; key id {kid}; expires {expires_at.isoformat()}")
        except Refusal as refusal:
            self.service.audit.refusal(self.caller.actor, "acme-eab-refused", refusal, now)
            raise
        return {"principal": name, "kid": kid, "hmac_key": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
                "expires_at": expires_at.isoformat()}

    # -- issuers ------------------------------------------------------------------------

    def issuers(self) -> list[dict[str, Any]]:
        with read(self.engine) as conn:
            snap = self.service.state.get(conn)
        return [
            {"name": a.name, "role": a.role, "cost": a.cost, "renewal_only": a.renewal_only,
             "enabled": a.enabled, "templates": sorted(a.templates), "subject": a.certificate.subject.rfc4514_string(),
             "not_after": a.certificate.not_valid_after_utc.isoformat(), "thumbprint": thumbprint(a.certificate)}
            for a in snap.authorities
        ]

    def set_issuer(self, name: str, now: dt.datetime, *, cost: int | None = None,
                   renewal_only: bool | None = None, enabled: bool | None = None,
                   serve: list[str] | None = None, unserve: list[str] | None = None) -> None:
        with write(self.engine) as conn:
            row = conn.execute(select(t.authorities).where(
                (t.authorities.c.name == name) & (t.authorities.c.role == "issuer"))).first()
            if row is None:
                raise Refusal(Reason.UNKNOWN_ISSUER, f"no issuer named {name!r}")
            values: dict[str, Any] = {}
            if cost is not None:
                values["cost"] = cost
            if renewal_only is not None:
                values["renewal_only"] = renewal_only
            if enabled is not None:
                values["enabled"] = enabled
            if values:
                conn.execute(update(t.authorities).where(t.authorities.c.id == row.id).values(**values))
            known = set(conn.execute(select(t.templates.c.name)).scalars())
            served = set(conn.execute(select(t.issuer_templates.c.template_name)
                                      .where(t.issuer_templates.c.authority_id == row.id)).scalars())
            for template in serve or ():
                if template not in known:
                    raise Refusal(Reason.UNKNOWN_TEMPLATE, f"no template named {template!r}")
                if template not in served:
                    conn.execute(t.issuer_templates.insert().values(authority_id=row.id, template_name=template))
            for template in unserve or ():
                conn.execute(delete(t.issuer_templates).where(
                    (t.issuer_templates.c.authority_id == row.id) & (t.issuer_templates.c.template_name == template)))
            bump_generation(conn)
            self._audit(conn, now, "issuer-changed", detail=f"{name}: {values}; +{serve or []} -{unserve or []}")

    # -- API keys -----------------------------------------------------------------------

    def add_api_key(self, name: str, now: dt.datetime, expires: dt.timedelta | None = None) -> str:
        """A new CA-manager key (valid for ``expires`` when given); only its hash is kept."""
        _check_name("API key", name)
        if expires is not None and expires <= dt.timedelta(0):
            raise Refusal(Reason.INVALID_ARGUMENT, "an API key's lifetime must be positive")
        expires_at = now + expires if expires is not None else None
        key, digest = new_secret("cpa")
        with write(self.engine) as conn:
            try:
                with conn.begin_nested():
                    conn.execute(t.api_keys.insert().values(key_hash=digest, name=name, role="admin", created_at=now,
                                                            expires_at=expires_at))
            except IntegrityError:
                raise Refusal(Reason.CONFLICT,
                              f"an API key named {name!r} exists (names are not reused, even when revoked)") from None
            self._audit(conn, now, "api-key-added",
                        detail=name + (f"; expires {expires_at.isoformat()}" if expires_at else ""))
        return key

    def api_keys(self, now: dt.datetime) -> list[dict[str, Any]]:
        """Every API key ever made, oldest first: never the key itself (only its hash is kept)."""
        with read(self.engine) as conn:
            rows = conn.execute(select(t.api_keys).order_by(t.api_keys.c.created_at, t.api_keys.c.name)).all()
        return [
            {"name": r.name, "role": r.role, "created_at": r.created_at.isoformat(),
             "expires_at": r.expires_at.isoformat() if r.expires_at else None,
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
             "state": "revoked" if r.revoked_at else "valid" if api_key_valid(r, now) else "expired"}
            for r in rows
        ]

    def revoke_api_key(self, name: str, now: dt.datetime) -> None:
        """Revoke an API key by name: it opens nothing from the commit on, in every process.

        The last valid key (unrevoked, unexpired) cannot be revoked, so that remote management
        over HTTP is never locked out; add another first. (The command line on the CA host needs
        no key: it acts as the operator.)"""
        try:
            with write(self.engine) as conn:
                # Every key locked: two revocations at once cannot each count the other as remaining
                keys = conn.execute(select(t.api_keys).order_by(t.api_keys.c.name).with_for_update()).all()
                target = next((k for k in keys if k.name == name), None)
                if target is None:
                    raise Refusal(Reason.NOT_FOUND, f"no API key named {name!r}")
                if target.revoked_at is not None:
                    raise Refusal(Reason.CONFLICT, f"API key {name!r} was already revoked")
                if api_key_valid(target, now) and not any(
                        k.name != name and api_key_valid(k, now) for k in keys):
                    raise Refusal(Reason.CONFLICT,
                                  f"API key {name!r} is the last valid one; add another first "
                                  f"('certpulse apikey add NAME'), then revoke it")
                conn.execute(update(t.api_keys).where(t.api_keys.c.key_hash == target.key_hash)
                             .values(revoked_at=now))
                self._audit(conn, now, "api-key-revoked", detail=name)
        except Refusal as refusal:
            self.service.audit.refusal(self.caller.actor, "api-key-revoke-refused", refusal, now)
            raise
