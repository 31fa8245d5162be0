"""ACME orders (RFC 8555 section 7.4): checked at once against the profile's template, each
identifier given an authorization with the challenges that can prove it.

An order's profile is a template the account's principal may enroll in, and its identifiers
meet the template's name rules at newOrder (the same checks as a CSR's names at submission,
:mod:`certpulse.ca.name_checks`), so a client learns before any validation that a name will be
refused, with one subproblem per refused identifier. The request policy decides again at
finalize, on the CSR, as for a native request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from typing import TYPE_CHECKING, Any

from cryptography import x509
from sqlalchemy import Connection, and_, bindparam, select, update

from certpulse.ca.acme import problems, records
from certpulse.ca.acme.accounts import actor_of
from certpulse.ca.acme.model import Account, ChallengeType, Identifier, Order, OrderPage, Problem
from certpulse.ca.model import Caller
from certpulse.ca.name_checks import checked_request_names
from certpulse.ca.state import Snapshot
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import Template
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.pki import ari
from certpulse.pki.names import RequestedNames, is_hostname
from certpulse.sql.db import read, write

if TYPE_CHECKING:
    from certpulse.ca.acme.service import ACMEAuthority

MAX_IDENTIFIERS = 100  # before any template's own limit: bounds the work one request makes
MAX_PAGE = 1000
# Which challenges can prove which identifier (RFC 8555 section 8, RFC 8737, RFC 8738)
DNS_CHALLENGES: tuple[ChallengeType, ...] = ("http-01", "dns-01", "tls-alpn-01")
WILDCARD_CHALLENGES: tuple[ChallengeType, ...] = ("dns-01",)
IP_CHALLENGES: tuple[ChallengeType, ...] = ("http-01", "tls-alpn-01")
# A finalize that claimed an order (processing) but never reached the registration authority
# (its process died): the order is ready again after this
STALE_CLAIM = dt.timedelta(minutes=5)
# How far in the past an order's notBefore may be
NOT_BEFORE_SLACK = dt.timedelta(days=1)


def served(snapshot: Snapshot, template: str, now: dt.datetime) -> bool:
    """Whether an enabled issuer, valid now, serves the template (else finalize could only fail)."""
    return any(a.serves(template) and a.valid_at(now) for a in snapshot.authorities)


def may_enroll(template: Template, caller: Caller) -> bool:
    rights = template.rights_of(caller.name, caller.groups)
    return "read" in rights and bool({"enroll", "autoenroll"} & rights)


def enrollable(snapshot: Snapshot, caller: Caller) -> list[Template]:
    return sorted((tpl for tpl in snapshot.templates.values() if may_enroll(tpl, caller)), key=lambda x: x.name)


def normalized(identifier: Identifier) -> Identifier:
    """An identifier in the one spelling stored and compared: DNS lower-case without a trailing
    dot, IP addresses in their canonical text. Unparseable ones are left for the name checks."""
    if identifier.type == "dns":
        return Identifier("dns", identifier.value.lower().removesuffix("."))
    try:
        return Identifier("ip", str(ipaddress.ip_address(identifier.value)))
    except ValueError:
        return identifier


def registered_name(caller: Caller) -> str | None:
    """A machine principal's own name as a DNS name (what the CA already knows it by)."""
    name = caller.name.lower()
    if caller.principal_kind == "machine" and is_hostname(name, allow_wildcard=False):
        return name
    return None


def identifier_problem(caller: Caller, template: Template, identifier: Identifier) -> Problem | None:
    """Why ``template`` refuses ``identifier`` for ``caller`` (None when it allows it)."""
    shown = printable(identifier.value[:255])
    if identifier.type not in ("dns", "ip"):
        return Problem(Reason.UNSUPPORTED_IDENTIFIER, f"identifier type {printable(str(identifier.type)[:20])} "
                       "is not supported (dns and ip are)", identifier)
    if identifier.type == "ip":
        try:
            address = ipaddress.ip_address(identifier.value)
        except ValueError:
            return Problem(Reason.REJECTED_IDENTIFIER, f"{shown} is not an IP address", identifier)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            return Problem(Reason.REJECTED_IDENTIFIER, f"{shown} has a zone; a certificate names addresses "
                                                       "without one", identifier)
    elif not is_hostname(identifier.value, allow_wildcard=True):
        return Problem(Reason.REJECTED_IDENTIFIER, f"{shown} is not a valid DNS name", identifier)
    if template.subject_source == "principal":
        own = registered_name(caller)
        if identifier.type != "dns" or own is None or identifier.value != own:
            return Problem(Reason.REJECTED_IDENTIFIER,
                           f"profile {template.name!r} names certificates after the principal: it can only "
                           f"certify {own!r}" if own else
                           f"profile {template.name!r} names certificates after the principal, which has no "
                           "DNS name", identifier)
        return None
    names = RequestedNames(dns=(identifier.value,)) if identifier.type == "dns" else RequestedNames(
        ip=(identifier.value,))
    try:
        checked_request_names(caller, template, x509.Name([]), names)
    except Refusal as refusal:
        return Problem(Reason.REJECTED_IDENTIFIER, refusal.detail, identifier)
    return None


def submission_key(order_id: int) -> str:
    """The idempotency key an order's finalize submits with: a retry never makes a second certificate."""
    return f"acme-order-{order_id}"


def challenge_types(identifier: Identifier) -> tuple[ChallengeType, ...]:
    if identifier.type == "ip":
        return IP_CHALLENGES
    return WILDCARD_CHALLENGES if identifier.value.startswith("*.") else DNS_CHALLENGES



# The statements of every order's requests, built once (bound parameters): building a statement
# and its cache key at each call cost more CPU than running it.
ORDER_OF_ACCOUNT = select(t.acme_orders).where(and_(t.acme_orders.c.id == bindparam("p_id"),
                                                    t.acme_orders.c.account_id == bindparam("p_account")))
ORDER_OF_ACCOUNT_LOCKED = ORDER_OF_ACCOUNT.with_for_update()
ORDER = select(t.acme_orders).where(t.acme_orders.c.id == bindparam("p_id"))
_AUTHORIZATION_IDS = (select(t.acme_authorizations.c.id).where(t.acme_authorizations.c.order_id == bindparam("p_id"))
                      .order_by(t.acme_authorizations.c.id))
_INSERT_ORDER = t.acme_orders.insert().returning(t.acme_orders.c.id)
_INSERT_AUTHORIZATION = t.acme_authorizations.insert().returning(t.acme_authorizations.c.id)
_INSERT_CHALLENGES = t.acme_challenges.insert()
_REQUEST_STATUS = select(t.requests.c.status).where(t.requests.c.id == bindparam("p_id"))

class Orders:
    def __init__(self, authority: ACMEAuthority) -> None:
        self._acme = authority
        self.engine = authority.service.engine

    # -- newOrder -----------------------------------------------------------------------

    def new_order(self, account: Account, identifiers: tuple[Identifier, ...], *, profile: str | None,
                  not_before: dt.datetime | None, not_after: dt.datetime | None, replaces: str | None,
                  now: dt.datetime) -> Order:
        actor = actor_of(account)
        try:
            if not identifiers:
                raise Refusal(Reason.MALFORMED_REQUEST, "an order names at least one identifier")
            if len(identifiers) > MAX_IDENTIFIERS:
                raise Refusal(Reason.REJECTED_IDENTIFIER, f"at most {MAX_IDENTIFIERS} identifiers per order")
            if any(not isinstance(i.type, str) or not isinstance(i.value, str) for i in identifiers):
                raise Refusal(Reason.MALFORMED_REQUEST, "every identifier has a type and a value, both strings")
            wanted = tuple(dict.fromkeys(normalized(i) for i in identifiers))
            with read(self.engine) as conn:
                caller = self._acme.caller(conn, account)
                snapshot = self._acme.service.state.get(conn)
                replaced = self._replaced(conn, caller, replaces) if replaces is not None else None
            template = self._template(snapshot, caller, profile, replaced, wanted, now)
            if not served(snapshot, template.name, now):
                raise Refusal(Reason.INVALID_PROFILE, f"no issuer serves profile {template.name!r} now")
            refused = tuple(p for p in (identifier_problem(caller, template, i) for i in wanted) if p is not None)
            if refused:
                first = refused[0]
                detail = (first.detail if len(refused) == 1
                          else f"{len(refused)} identifiers are refused; the first: {first.detail}")
                raise Refusal(refused[0].reason if len(refused) == 1 else Reason.REJECTED_IDENTIFIER, detail,
                              subproblems=refused)
            if len(wanted) > template.names.max:
                raise Refusal(Reason.REJECTED_IDENTIFIER,
                              f"profile {template.name!r} allows at most {template.names.max} names")
            self._check_validity(template, not_before, not_after, now)
            own = registered_name(caller) if template.trust_registered_names else None
            with write(self.engine) as conn:
                if replaced is not None:
                    self._not_replaced(conn, int(replaced.id))
                order = self._insert(conn, account, wanted, template, not_before, not_after,
                                     int(replaced.id) if replaced is not None else None, replaces, own, now)
                self._acme.service.audit.record(
                    conn, now, actor, "acme-order-created", template=template.name,
                    names=[i.value for i in wanted],
                    detail=f"order {order.id}; account {account.id}"
                           + (f"; replaces certificate {replaced.serial}" if replaced is not None else ""))
            return order
        except Refusal as refusal:
            self._acme.service.audit.refusal(actor, "acme-order-refused", refusal, now, template=profile)
            raise

    def _template(self, snapshot: Snapshot, caller: Caller, profile: str | None, replaced: Any,
                  wanted: tuple[Identifier, ...], now: dt.datetime) -> Template:
        """The order's template: the profile asked for; else the replaced certificate's; else
        ``[acme] default_profile``; else the first (by name) the principal may enroll in, that an
        issuer serves, that allows every identifier (the first of all when none does, for its
        refusals)."""
        if profile is not None:
            template = snapshot.templates.get(profile)
            if template is None or "read" not in template.rights_of(caller.name, caller.groups):
                raise Refusal(Reason.INVALID_PROFILE, f"no profile named {printable(profile[:64])}")
            if not may_enroll(template, caller):
                raise Refusal(Reason.TEMPLATE_NOT_PERMITTED, f"{caller.actor} may not enroll for profile "
                                                             f"{template.name!r}")
            return template
        if replaced is not None:  # a renewal stays on its certificate's template, when still allowed
            template = snapshot.templates.get(replaced.template_name)
            if template is not None and may_enroll(template, caller):
                return template
        default = self._acme.config.default_profile
        if default:
            template = snapshot.templates.get(default)
            if template is None or not may_enroll(template, caller):
                raise Refusal(Reason.INVALID_PROFILE, f"the default profile {default!r} is not one {caller.actor} "
                                                      "may enroll in; name a profile")
            return template
        choices = [tpl for tpl in enrollable(snapshot, caller) if served(snapshot, tpl.name, now)]
        if not choices:
            raise Refusal(Reason.TEMPLATE_NOT_PERMITTED, f"{caller.actor} may not enroll for any profile")
        fitting = (tpl for tpl in choices if len(wanted) <= tpl.names.max
                   and all(identifier_problem(caller, tpl, i) is None for i in wanted))
        return next(fitting, choices[0])

    def _check_validity(self, template: Template, not_before: dt.datetime | None, not_after: dt.datetime | None,
                        now: dt.datetime) -> None:
        """Dates an order may ask for: within the template's validity from when it would be issued.
        The certificate gets the template's validity as any request does (these are checked and
        echoed, so that a client asking for what the CA would not give learns it at once)."""
        start = not_before or now
        if not_before is not None and not now - NOT_BEFORE_SLACK <= not_before <= now + self._acme.config.duration(
                "order_lifetime"):
            raise Refusal(Reason.MALFORMED_REQUEST, "notBefore must be between a day ago and the order's expiry")
        if not_after is not None:
            if not_after <= max(now, start):
                raise Refusal(Reason.MALFORMED_REQUEST, "notAfter must be later than now and than notBefore")
            if not_after - start > template.validity:
                raise Refusal(Reason.MALFORMED_REQUEST, f"notAfter is beyond profile {template.name!r}'s validity "
                                                        f"({template.validity.days} days)")

    @staticmethod
    def _replaced(conn: Connection, caller: Caller, replaces: str) -> Any:
        """The certificate ``replaces`` names: one of this principal's (RFC 9773 section 5)."""
        key_id, serial = ari.decode(replaces)
        c = t.certificates.c
        for row in conn.execute(select(t.certificates).where(and_(
                c.serial == format(serial, "x"), c.status == "issued", c.principal_id == caller.principal_id))):
            try:
                aki = x509.load_der_x509_certificate(row.der).extensions.get_extension_for_class(
                    x509.AuthorityKeyIdentifier).value
            except (ValueError, x509.ExtensionNotFound):
                continue
            if aki.key_identifier == key_id:
                return row
        raise Refusal(Reason.MALFORMED_REQUEST, "'replaces' names no certificate of this account's principal")

    @staticmethod
    def _not_replaced(conn: Connection, certificate_id: int) -> None:
        """ALREADY_REPLACED once an order replacing the certificate was finalized."""
        o = t.acme_orders.c
        done = conn.execute(select(o.id).where(and_(
            o.replaces == certificate_id, o.status.in_(("processing", "valid"))))).first()
        if done is not None:
            raise Refusal(Reason.ALREADY_REPLACED, f"order {done.id} already replaces this certificate")

    def _insert(self, conn: Connection, account: Account, wanted: tuple[Identifier, ...], template: Template,
                not_before: dt.datetime | None, not_after: dt.datetime | None, replaced_id: int | None,
                replaces: str | None, own: str | None, now: dt.datetime) -> Order:
        expires = now + self._acme.config.duration("order_lifetime")
        trusted = [i.type == "dns" and own is not None and i.value == own for i in wanted]
        status = "ready" if all(trusted) else "pending"
        order_id = int(conn.execute(_INSERT_ORDER, dict(
            account_id=account.id, status=status, profile=template.name,
            identifiers=records.identifiers_json(wanted), not_before=not_before, not_after=not_after,
            expires_at=expires, replaces=replaced_id, created_at=now, updated_at=now,
        )).scalar_one())
        authorization_ids: list[int] = []
        challenges: list[dict[str, Any]] = []
        for identifier, valid in zip(wanted, trusted, strict=True):
            wildcard = identifier.value.startswith("*.")
            authorization_id = int(conn.execute(_INSERT_AUTHORIZATION, dict(
                order_id=order_id, account_id=account.id, identifier_type=identifier.type,
                identifier_value=identifier.value.removeprefix("*."), wildcard=wildcard,
                status="valid" if valid else "pending", expires_at=expires, created_at=now,
            )).scalar_one())
            authorization_ids.append(authorization_id)
            if not valid:
                challenges += [{"authorization_id": authorization_id, "type": kind,
                                "token": secrets.token_urlsafe(32), "status": "pending"}
                               for kind in challenge_types(identifier)]
        if challenges:
            conn.execute(_INSERT_CHALLENGES, challenges)
        return Order(id=order_id, account_id=account.id, status=status, expires_at=expires, identifiers=wanted,
                     profile=template.name, not_before=not_before, not_after=not_after,
                     authorization_ids=tuple(authorization_ids), certificate_id=None, error=None, retry_after=None,
                     replaces=replaces)

    # -- reading ------------------------------------------------------------------------

    def order(self, account: Account, order_id: int, now: dt.datetime) -> Order:
        records.require_id(order_id, "order")
        with read(self.engine) as conn:
            row = self._row(conn, account, order_id)
            if not self._moves(conn, row, now):
                return self.value(conn, row)
        with write(self.engine) as conn:
            row = self._row(conn, account, order_id, lock=True)
            row = self.bring_up_to_date(conn, row, now)
            return self.value(conn, row)

    @staticmethod
    def _row(conn: Connection, account: Account, order_id: int, *, lock: bool = False) -> Any:
        row = conn.execute(ORDER_OF_ACCOUNT_LOCKED if lock else ORDER_OF_ACCOUNT,
                           {"p_id": order_id, "p_account": account.id}).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no order {order_id}")
        return row

    @staticmethod
    def value(conn: Connection, row: Any) -> Order:
        """An order row as the value answered, with its authorizations' ids."""
        ids = tuple(conn.execute(_AUTHORIZATION_IDS, {"p_id": row.id}).scalars())
        return records.as_order(row, ids, records.replaces_text(conn, row.replaces))

    @staticmethod
    def _request_status(conn: Connection, request_id: int | None) -> str | None:
        if request_id is None:
            return None
        return conn.execute(_REQUEST_STATUS, {"p_id": request_id}).scalar()

    def _moves(self, conn: Connection, row: Any, now: dt.datetime) -> bool:
        """Whether reading the order at ``now`` changes it (expiry, a decided request, a stale claim)."""
        if row.status in ("pending", "ready"):
            return bool(now >= row.expires_at)
        if row.status == "processing":
            if row.request_id is None:
                return bool(now - row.updated_at >= STALE_CLAIM)
            return self._request_status(conn, row.request_id) != "pending"
        return False

    def bring_up_to_date(self, conn: Connection, row: Any, now: dt.datetime) -> Any:
        """The order row after what happened since it was written, in ``conn``'s write
        transaction: expired; its request issued, denied or failed; a claim left by a finalize
        that never reached the registration authority released."""
        values: dict[str, Any] = {}
        if row.status == "processing" and row.request_id is None and now - row.updated_at >= STALE_CLAIM:
            submitted = self._submitted(conn, row)
            if submitted is None:
                values = {"status": "ready"}
            else:  # the finalizer died after its submission was recorded: the order follows it
                conn.execute(update(t.acme_orders).where(t.acme_orders.c.id == row.id).values(request_id=submitted))
                row = conn.execute(select(t.acme_orders).where(t.acme_orders.c.id == row.id)).one()
        if row.status in ("pending", "ready") and now >= row.expires_at:
            values = {"status": "invalid", "error": problems.dumps(
                Problem(Reason.MALFORMED_REQUEST, f"the order expired at {row.expires_at.isoformat()}"))}
        elif row.status == "processing" and row.request_id is not None:
            request = conn.execute(select(t.requests).where(t.requests.c.id == row.request_id)).first()
            if request is None or request.status in ("denied", "failed"):
                why = (request.reason if request is not None else None) or "the request was refused"
                reason = Reason.FORBIDDEN if request is not None and request.status == "denied" \
                    else Reason.MALFORMED_REQUEST
                values = {"status": "invalid", "error": problems.dumps(Problem(
                    reason, f"request {row.request_id} was {request.status if request else 'lost'}: {why}"))}
            elif request.status == "issued":
                values = {"status": "valid", "certificate_id": request.certificate_id}
        if not values:
            return row
        conn.execute(update(t.acme_orders).where(t.acme_orders.c.id == row.id).values(updated_at=now, **values))
        return conn.execute(ORDER, {"p_id": row.id}).one()

    @staticmethod
    def _submitted(conn: Connection, row: Any) -> int | None:
        """The request a claimed order's finalize submitted (by the idempotency key it used), if any."""
        principal = select(t.acme_accounts.c.principal_id).where(t.acme_accounts.c.id == row.account_id)
        return conn.execute(select(t.requests.c.id).where(and_(
            t.requests.c.idempotency_key == submission_key(row.id),
            t.requests.c.principal_id == principal.scalar_subquery()))).scalar()

    def orders(self, account: Account, *, after: int | None, limit: int, now: dt.datetime) -> OrderPage:
        limit = max(1, min(limit, MAX_PAGE))
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**63):
            raise Refusal(Reason.MALFORMED_REQUEST, "the orders page cursor is not one this server gave")
        o = t.acme_orders.c
        query = select(o.id).where(o.account_id == account.id)
        if after is not None:
            query = query.where(o.id > after)
        with read(self.engine) as conn:
            ids = tuple(conn.execute(query.order_by(o.id).limit(limit + 1)).scalars())
        more = len(ids) > limit
        ids = ids[:limit]
        return OrderPage(order_ids=ids, next_after=ids[-1] if more else None)
