"""The ACME roles of the CA core, as one object the front end calls (``service.acme``).

Every method takes ``now`` and values the front end has already verified (the JWS signature,
the nonce, the ``url`` header); each answers a typed result of :mod:`.model` or raises a
:class:`~certpulse.errors.Refusal` whose reason the front end maps to an ACME error type.
Every decision that creates or changes something is audited like the native API's.

The work is done by one object per part, each in its own module: :mod:`.accounts`,
:mod:`.orders`, :mod:`.authorizations`, :mod:`.finalize`, :mod:`.revocation` (with the pure
window of :mod:`.renewal_info`); this class is the one interface the front end codes against.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from certpulse.ca.acme.accounts import Accounts
from certpulse.ca.acme.authorizations import Authorizations
from certpulse.ca.acme.finalize import Finalization
from certpulse.ca.acme.model import (
    Account,
    AccountKey,
    Authorization,
    CertificateChains,
    Challenge,
    DirectoryMeta,
    Identifier,
    Order,
    OrderPage,
    RenewalInfo,
    ValidationJob,
    ValidationResult,
)
from certpulse.ca.acme.orders import Orders, served
from certpulse.ca.acme.revocation import ACMERevocation
from certpulse.ca.config import ACMEConfig
from certpulse.ca.model import Caller
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import read

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from certpulse.ca.service import CAService


class ACMEAuthority:
    def __init__(self, service: CAService, config: ACMEConfig) -> None:
        self._service = service
        self.config = config
        self.accounts = Accounts(service.engine, service.audit, config)
        self.ordering = Orders(self)
        self.authorizations = Authorizations(self)
        self.finalization = Finalization(self)
        self.revocation = ACMERevocation(self)

    @property
    def service(self) -> CAService:
        return self._service

    def caller(self, conn: Connection, account: Account) -> Caller:
        """The principal an account acts as, as the database has it now (groups, roles)."""
        caller = self._service.auth.principal_by_id(conn, account.principal_id)
        if caller is None:
            raise Refusal(Reason.UNAUTHENTICATED, f"the principal of account {account.id} is disabled or removed")
        return caller

    # -- directory ------------------------------------------------------------------------

    def directory_meta(self, now: dt.datetime) -> DirectoryMeta:
        """The directory's ``meta``: every template some principal may enroll in (and an issuer
        serves), as a profile."""
        with read(self._service.engine) as conn:
            snapshot = self._service.state.get(conn)
        offered = sorted((tpl for tpl in snapshot.templates.values()
                          if any({"enroll", "autoenroll"} & p.rights for p in tpl.permissions)
                          and served(snapshot, tpl.name, now)),
                         key=lambda tpl: tpl.name)
        default = self.config.default_profile or (offered[0].name if offered else None)
        return DirectoryMeta(
            profiles={tpl.name: tpl.display_name for tpl in offered}, default_profile=default,
            external_account_required=self.config.external_account_required,
            terms_of_service=self.config.terms_of_service or None, website=self.config.website or None)

    # -- accounts -------------------------------------------------------------------------

    def new_account(self, key: AccountKey, *, contact: tuple[str, ...], terms_agreed: bool,
                    only_return_existing: bool, external_binding: Mapping[str, Any] | None,
                    url: str, now: dt.datetime) -> tuple[Account, bool]:
        """The account of ``key``, created when new (True) or found (False). ``external_binding``
        is the ``externalAccountBinding`` JWS object as sent; ``url`` the newAccount URL it must
        name. Refuses EXTERNAL_ACCOUNT_REQUIRED, ACCOUNT_DOES_NOT_EXIST (onlyReturnExisting),
        USER_ACTION_REQUIRED (terms), UNAUTHENTICATED (a bad or spent binding)."""
        return self.accounts.new_account(key, contact=contact, terms_agreed=terms_agreed,
                                         only_return_existing=only_return_existing,
                                         external_binding=external_binding, url=url, now=now)

    def account(self, account_id: int, now: dt.datetime) -> Account:
        """The account a ``kid`` names, for every request signed by it: ACCOUNT_DOES_NOT_EXIST
        when unknown, UNAUTHENTICATED ("unauthorized") when deactivated or its principal is
        disabled or gone."""
        return self.accounts.account(account_id, now)

    def account_by_key(self, thumbprint: str) -> Account | None:
        return self.accounts.by_key(thumbprint)

    def update_account(self, account: Account, *, contact: tuple[str, ...] | None, deactivate: bool,
                       now: dt.datetime) -> Account:
        return self.accounts.update(account, contact=contact, deactivate=deactivate, now=now)

    def change_key(self, account: Account, new_key: AccountKey, now: dt.datetime) -> Account:
        """Roll the account over to ``new_key`` (the front end verified both signatures of the
        keyChange JWS). CONFLICT (with ``extra["account_id"]``) when another account has it."""
        return self.accounts.change_key(account, new_key, now)

    # -- orders ---------------------------------------------------------------------------

    def new_order(self, account: Account, identifiers: tuple[Identifier, ...], *, profile: str | None,
                  not_before: dt.datetime | None, not_after: dt.datetime | None, replaces: str | None,
                  now: dt.datetime) -> Order:
        """A new order, checked at once against the profile's template: enroll right, name rules
        (REJECTED_IDENTIFIER with one subproblem per refused identifier), validity."""
        return self.ordering.new_order(account, identifiers, profile=profile, not_before=not_before,
                                     not_after=not_after, replaces=replaces, now=now)

    def order(self, account: Account, order_id: int, now: dt.datetime) -> Order:
        """An order of this account (NOT_FOUND otherwise), brought up to date: expired, approved,
        denied."""
        return self.ordering.order(account, order_id, now)

    def orders(self, account: Account, *, after: int | None, limit: int, now: dt.datetime) -> OrderPage:
        return self.ordering.orders(account, after=after, limit=limit, now=now)

    def finalize(self, account: Account, order_id: int, csr_der: bytes, now: dt.datetime) -> Order:
        """Submit the order's CSR to the registration authority: ORDER_NOT_READY unless ready;
        MALFORMED_CSR ("badCSR") when its names are not exactly the order's."""
        return self.finalization.finalize(account, order_id, csr_der, now)

    def certificate(self, account: Account, certificate_id: int, alternate: int, now: dt.datetime) -> CertificateChains:
        return self.finalization.certificate(account, certificate_id, alternate, now)

    # -- authorizations and challenges ----------------------------------------------------

    def authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        return self.authorizations.authorization(account, authorization_id, now)

    def deactivate_authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        return self.authorizations.deactivate(account, authorization_id, now)

    def challenge(self, account: Account, challenge_id: int, now: dt.datetime) -> Challenge:
        return self.authorizations.challenge(account, challenge_id, now)

    def respond_to_challenge(self, account: Account, challenge_id: int,
                             now: dt.datetime) -> tuple[Challenge, ValidationJob | None]:
        """The client says it is ready: the challenge becomes ``processing`` and the job to run
        is returned (None when it is already processing, valid or invalid: nothing to start)."""
        return self.authorizations.respond(account, challenge_id, now)

    def record_validation(self, job: ValidationJob, result: ValidationResult, now: dt.datetime) -> None:
        """The validation's outcome: challenge and authorization valid or invalid, the order
        ready when all its authorizations are valid, invalid when one is not."""
        self.authorizations.record(job, result, now)

    # -- revocation and renewal information -----------------------------------------------

    def revoke(self, certificate_der: bytes, reason: int | None, *, account: Account | None,
               signer_jwk: Mapping[str, Any] | None, now: dt.datetime) -> None:
        """revokeCert: by an account whose principal holds the certificate, or signed by the
        certificate's own key (``signer_jwk``). ALREADY_REVOKED, BAD_REVOCATION_REASON,
        FORBIDDEN ("unauthorized")."""
        self.revocation.revoke(certificate_der, reason, account=account, signer_jwk=signer_jwk, now=now)

    def renewal_info(self, certificate_identifier: str, now: dt.datetime) -> RenewalInfo:
        """RFC 9773: the suggested window of the certificate the identifier names
        (base64url(AKI keyIdentifier) "." base64url(serial)); NOT_FOUND, MALFORMED_REQUEST."""
        return self.revocation.renewal_info(certificate_identifier, now)
