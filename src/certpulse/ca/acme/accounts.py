"""ACME accounts (RFC 8555 section 7.3), each bound to a certpulse principal.

An account is made by a client's key. It acts as a principal: the one its external account
binding names (``certpulse principal acme-eab NAME`` handed out the binding's key id and MAC
key), or, when ca.toml's ``[acme] external_account_required`` is false, the configured
``unbound_principal``. An account whose principal is disabled or removed opens nothing, as the
principal's own credential would not. A binding key is spent in the transaction that makes the
account, so it makes one account however many clients race with it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Engine, and_, select, update
from sqlalchemy.exc import IntegrityError

from certpulse.ca.acme.model import Account, AccountKey
from certpulse.ca.audit import AuditTrail
from certpulse.ca.config import ACMEConfig
from certpulse.ca.model import ANONYMOUS
from certpulse.ca.storage import schema as t
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.pki import jose, mailbox
from certpulse.sql.db import read, write

MAX_CONTACTS = 4
MAX_CONTACT_LENGTH = 254 + len("mailto:")
VALID, DEACTIVATED = "valid", "deactivated"

_ACCOUNT = (select(t.acme_accounts, t.principals.c.name.label("principal_name"),
                   t.principals.c.enabled.label("principal_enabled"))
            .outerjoin(t.principals, t.principals.c.id == t.acme_accounts.c.principal_id))


def as_account(row: Any) -> Account:
    return Account(
        id=row.id, status=row.status, contact=tuple(json.loads(row.contact)), key_thumbprint=row.key_thumbprint,
        jwk=json.loads(row.jwk), principal_id=row.principal_id, principal_name=row.principal_name,
        eab_kid=row.eab_kid, created_at=row.created_at,
    )


def actor_of(account: Account) -> str:
    """Who an account's actions are audited as: its principal, as the native API audits it."""
    return f"principal:{account.principal_name}" if account.principal_name else f"acme-account:{account.id}"


def _contact_refusal(detail: str, *, unsupported: bool = False) -> Refusal:
    """A contact refused, with the ACME error the front end names it by."""
    if unsupported:
        return Refusal(Reason.UNSUPPORTED_CONTACT, detail, acme_type="unsupportedContact")
    return Refusal(Reason.INVALID_CONTACT, detail, acme_type="invalidContact")


def checked_contacts(contact: tuple[str, ...]) -> tuple[str, ...]:
    """Contacts an account may hold: at most :data:`MAX_CONTACTS` ``mailto:`` URLs, each one
    mailbox (no second address, no header fields), printable and bounded."""
    if len(contact) > MAX_CONTACTS:
        raise _contact_refusal(f"at most {MAX_CONTACTS} contacts are accepted")
    checked: list[str] = []
    for url in contact:
        if not isinstance(url, str) or len(url) > MAX_CONTACT_LENGTH or not url.isprintable():
            raise _contact_refusal(f"the contact {printable(str(url)[:80])} is not a printable URL of at most "
                                   f"{MAX_CONTACT_LENGTH} characters")
        scheme, sep, address = url.partition(":")
        if not sep or scheme.lower() != "mailto":
            raise _contact_refusal(f"the contact {printable(url[:80])} is not a mailto: URL; only mailto: contacts "
                                   "are accepted", unsupported=True)
        if any(c in address for c in ",?&;%"):
            raise _contact_refusal(f"the contact {printable(url[:80])} must be one address, without header fields")
        problem = mailbox.mailbox_problem(address)
        if problem is not None:
            raise _contact_refusal(f"the contact {printable(url[:80])}: the address {problem}")
        checked.append(f"mailto:{address}")
    return tuple(dict.fromkeys(checked))


class Accounts:
    def __init__(self, engine: Engine, audit: AuditTrail, config: ACMEConfig) -> None:
        self.engine = engine
        self._audit = audit
        self.config = config

    # -- reading ------------------------------------------------------------------------

    def by_key(self, thumbprint: str) -> Account | None:
        with read(self.engine) as conn:
            row = conn.execute(_ACCOUNT.where(t.acme_accounts.c.key_thumbprint == thumbprint)).first()
        return as_account(row) if row is not None else None

    def account(self, account_id: int, now: dt.datetime) -> Account:
        if isinstance(account_id, bool) or not isinstance(account_id, int) or not 0 < account_id < 2**63:
            raise Refusal(Reason.ACCOUNT_DOES_NOT_EXIST, f"no account {str(account_id)[:24]}")
        with read(self.engine) as conn:
            row = conn.execute(_ACCOUNT.where(t.acme_accounts.c.id == account_id)).first()
        if row is None:
            raise Refusal(Reason.ACCOUNT_DOES_NOT_EXIST, f"no account {account_id}")
        return self._usable(row, now)

    def _usable(self, row: Any, now: dt.datetime) -> Account:
        """The account, when it may act: valid, with an enabled principal."""
        if row.status != VALID:
            refusal = Refusal(Reason.UNAUTHENTICATED, f"account {row.id} is {row.status}")
        elif row.principal_id is None or row.principal_name is None:
            refusal = Refusal(Reason.UNAUTHENTICATED, f"the principal of account {row.id} was removed")
        elif not row.principal_enabled:
            refusal = Refusal(Reason.UNAUTHENTICATED, f"the principal of account {row.id} is disabled")
        else:
            return as_account(row)
        self._audit.refusal(ANONYMOUS.actor, "acme-account-refused", refusal, now)
        raise refusal

    # -- newAccount ---------------------------------------------------------------------

    def new_account(self, key: AccountKey, *, contact: tuple[str, ...], terms_agreed: bool,
                    only_return_existing: bool, external_binding: Mapping[str, Any] | None,
                    url: str, now: dt.datetime) -> tuple[Account, bool]:
        existing = self.by_key(key.thumbprint)
        if existing is not None:
            return self.account(existing.id, now), False
        try:
            if only_return_existing:
                raise Refusal(Reason.ACCOUNT_DOES_NOT_EXIST, "no account exists with this key")
            if self.config.terms_of_service and not terms_agreed:
                raise Refusal(Reason.USER_ACTION_REQUIRED,
                              f"agree to the terms of service at {self.config.terms_of_service} "
                              "(termsOfServiceAgreed: true)", instance=self.config.terms_of_service)
            contacts = checked_contacts(contact)
            kid: str | None = None
            if external_binding is not None:
                kid, principal_id = self._check_binding(external_binding, key, url, now)
            elif self.config.external_account_required:
                raise Refusal(Reason.EXTERNAL_ACCOUNT_REQUIRED,
                              "this CA binds every account to a principal: ask its operator for a key "
                              "('certpulse principal acme-eab NAME') and send it as externalAccountBinding")
            else:
                principal_id = self._unbound_principal()
            with write(self.engine) as conn:
                try:
                    with conn.begin_nested():
                        account_id = conn.execute(t.acme_accounts.insert().values(
                            key_thumbprint=key.thumbprint, jwk=json.dumps(dict(key.jwk), sort_keys=True),
                            principal_id=principal_id, status=VALID, contact=json.dumps(list(contacts)),
                            eab_kid=kid, created_at=now, updated_at=now,
                        ).returning(t.acme_accounts.c.id)).scalar_one()
                except IntegrityError:
                    raced = True  # the same key made an account meanwhile: that one is answered
                else:
                    raced = False
                    if kid is not None:
                        self._spend_binding(conn, kid, account_id, now)
                    row = conn.execute(_ACCOUNT.where(t.acme_accounts.c.id == account_id)).one()
                    account = as_account(row)
                    self._audit.record(conn, now, actor_of(account), "acme-account-created",
                                       detail=f"account {account_id}; key {key.thumbprint}"
                                              + (f"; binding {kid}" if kid else "; unbound"))
        except Refusal as refusal:
            self._audit.refusal(ANONYMOUS.actor, "acme-account-refused", refusal, now)
            raise
        if raced:
            found = self.by_key(key.thumbprint)
            if found is None:
                raise Refusal(Reason.CONFLICT, "the account could not be made; try again")
            return self.account(found.id, now), False
        return account, True

    def _check_binding(self, binding: Mapping[str, Any], key: AccountKey, url: str,
                       now: dt.datetime) -> tuple[str, int]:
        """The key id and principal of a verified external account binding (RFC 8555 section
        7.3.4): a JWS over the account's public key, MACed with the binding key, naming the
        newAccount URL; its key known, unused, unexpired, of an enabled principal."""
        if not isinstance(binding, Mapping):
            raise Refusal(Reason.MALFORMED_REQUEST, "externalAccountBinding must be a JWS object")
        message = jose.parse(binding, account_request=False)
        if message.algorithm != "HS256":
            # the key is longer than HMAC's block for HS384/HS512 too, but then HMAC uses it as
            # is; only its SHA-256 is kept, which is HMAC-SHA256's own key
            raise Refusal(Reason.BAD_SIGNATURE_ALGORITHM, "the external account binding must be MACed with HS256",
                          algorithms=["HS256"])
        if message.url != url:
            raise Refusal(Reason.MALFORMED_REQUEST, "the external account binding's 'url' is not this newAccount URL")
        kid = message.kid
        if kid is None or not kid or len(kid) > 64 or not kid.isprintable():
            raise Refusal(Reason.MALFORMED_REQUEST, "the external account binding has no usable 'kid'")
        payload = message.json_payload()
        if not isinstance(payload, dict) or jose.thumbprint(payload) != key.thumbprint:
            raise Refusal(Reason.MALFORMED_REQUEST,
                          "the external account binding must sign the account's own public key (its payload)")
        with read(self.engine) as conn:
            row = conn.execute(
                select(t.acme_eab_keys, t.principals.c.enabled)
                .join(t.principals, t.principals.c.id == t.acme_eab_keys.c.principal_id)
                .where(t.acme_eab_keys.c.kid == kid)).first()
        shown = printable(kid)
        if row is None:
            raise Refusal(Reason.UNAUTHENTICATED, f"the external account binding key {shown} is not known")
        if row.used_at is not None:
            raise Refusal(Reason.UNAUTHENTICATED, f"the external account binding key {shown} was already used")
        if now >= row.expires_at:
            raise Refusal(Reason.UNAUTHENTICATED, f"the external account binding key {shown} has expired")
        if not row.enabled:
            raise Refusal(Reason.UNAUTHENTICATED, f"the principal of binding key {shown} is disabled")
        jose.verify_mac(message, bytes.fromhex(row.key_digest))
        return kid, int(row.principal_id)

    @staticmethod
    def _spend_binding(conn: Connection, kid: str, account_id: int, now: dt.datetime) -> None:
        spent = conn.execute(update(t.acme_eab_keys).where(and_(
            t.acme_eab_keys.c.kid == kid, t.acme_eab_keys.c.used_at.is_(None),
        )).values(used_at=now, account_id=account_id))
        if spent.rowcount != 1:  # a concurrent newAccount spent it first: this one writes nothing
            raise Refusal(Reason.UNAUTHENTICATED, f"the external account binding key {printable(kid)} was already used")

    def _unbound_principal(self) -> int:
        name = self.config.unbound_principal
        if not name:
            raise Refusal(Reason.EXTERNAL_ACCOUNT_REQUIRED,
                          "this CA takes no accounts without an external account binding (no unbound principal is "
                          "configured)")
        with read(self.engine) as conn:
            row = conn.execute(select(t.principals.c.id, t.principals.c.enabled)
                               .where(t.principals.c.name == name)).first()
        if row is None or not row.enabled:
            raise Refusal(Reason.EXTERNAL_ACCOUNT_REQUIRED,
                          f"the principal {name!r} that unbound accounts act as is disabled or does not exist; "
                          "use an external account binding")
        return int(row.id)

    # -- changes ------------------------------------------------------------------------

    def update(self, account: Account, *, contact: tuple[str, ...] | None, deactivate: bool,
               now: dt.datetime) -> Account:
        try:
            values: dict[str, Any] = {"updated_at": now}
            if contact is not None:
                values["contact"] = json.dumps(list(checked_contacts(contact)))
            if deactivate:
                values["status"] = DEACTIVATED
            with write(self.engine) as conn:
                changed = conn.execute(update(t.acme_accounts).where(and_(
                    t.acme_accounts.c.id == account.id, t.acme_accounts.c.status == VALID)).values(**values))
                if changed.rowcount != 1:
                    raise Refusal(Reason.UNAUTHENTICATED, f"account {account.id} is no longer valid")
                if deactivate:
                    # its pending authorizations can never be completed now (RFC 8555 section 7.3.6)
                    conn.execute(update(t.acme_authorizations).where(and_(
                        t.acme_authorizations.c.account_id == account.id,
                        t.acme_authorizations.c.status == "pending")).values(status="deactivated"))
                    self._audit.record(conn, now, actor_of(account), "acme-account-deactivated",
                                       detail=f"account {account.id}")
                elif contact is not None:
                    self._audit.record(conn, now, actor_of(account), "acme-account-updated",
                                       detail=f"account {account.id}: {len(contact)} contact(s)")
                row = conn.execute(_ACCOUNT.where(t.acme_accounts.c.id == account.id)).one()
        except Refusal as refusal:
            self._audit.refusal(actor_of(account), "acme-account-refused", refusal, now)
            raise
        return as_account(row)

    def change_key(self, account: Account, new_key: AccountKey, now: dt.datetime) -> Account:
        try:
            holder = self.by_key(new_key.thumbprint)
            if holder is not None:
                raise Refusal(Reason.CONFLICT, "another account has this key", account_id=holder.id)
            with write(self.engine) as conn:
                try:
                    with conn.begin_nested():
                        changed = conn.execute(update(t.acme_accounts).where(and_(
                            t.acme_accounts.c.id == account.id, t.acme_accounts.c.status == VALID,
                            t.acme_accounts.c.key_thumbprint == account.key_thumbprint,
                        )).values(key_thumbprint=new_key.thumbprint, jwk=json.dumps(dict(new_key.jwk), sort_keys=True),
                                  updated_at=now))
                except IntegrityError:
                    holder = self.by_key(new_key.thumbprint)
                    raise Refusal(Reason.CONFLICT, "another account has this key",
                                  account_id=holder.id if holder else None) from None
                if changed.rowcount != 1:
                    raise Refusal(Reason.CONFLICT, f"account {account.id} changed meanwhile; look again")
                self._audit.record(conn, now, actor_of(account), "acme-key-changed",
                                   detail=f"account {account.id}: key {account.key_thumbprint} -> {new_key.thumbprint}")
                row = conn.execute(_ACCOUNT.where(t.acme_accounts.c.id == account.id)).one()
        except Refusal as refusal:
            self._audit.refusal(actor_of(account), "acme-key-change-refused", refusal, now)
            raise
        return as_account(row)
