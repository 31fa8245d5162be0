"""The ACME roles of the CA core, as one object the front end calls (``service.acme``).

Every method takes ``now`` and values the front end has already verified (the JWS signature,
the nonce, the ``url`` header); each answers a typed result of :mod:`.model` or raises a
:class:`~certpulse.errors.Refusal` whose reason the front end maps to an ACME error type.
Every decision that creates or changes something is audited like the native API's.

INTERFACE (foundation commit): the bodies are filled in by the ACME core's implementation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
from certpulse.ca.config import ACMEConfig

if TYPE_CHECKING:
    from certpulse.ca.service import CAService


class ACMEAuthority:
    def __init__(self, service: CAService, config: ACMEConfig) -> None:
        self._service = service
        self.config = config

    # -- directory ------------------------------------------------------------------------

    def directory_meta(self, now: dt.datetime) -> DirectoryMeta:
        """The directory's ``meta``: every template some principal may enroll in, as a profile."""
        raise NotImplementedError

    # -- accounts -------------------------------------------------------------------------

    def new_account(self, key: AccountKey, *, contact: tuple[str, ...], terms_agreed: bool,
                    only_return_existing: bool, external_binding: Mapping[str, Any] | None,
                    url: str, now: dt.datetime) -> tuple[Account, bool]:
        """The account of ``key``, created when new (True) or found (False). ``external_binding``
        is the ``externalAccountBinding`` JWS object as sent; ``url`` the newAccount URL it must
        name. Refuses EXTERNAL_ACCOUNT_REQUIRED, ACCOUNT_DOES_NOT_EXIST (onlyReturnExisting),
        USER_ACTION_REQUIRED (terms), UNAUTHENTICATED (a bad or spent binding)."""
        raise NotImplementedError

    def account(self, account_id: int, now: dt.datetime) -> Account:
        """The account a ``kid`` names, for every request signed by it: ACCOUNT_DOES_NOT_EXIST
        when unknown, UNAUTHENTICATED ("unauthorized") when deactivated or its principal is
        disabled or gone."""
        raise NotImplementedError

    def account_by_key(self, thumbprint: str) -> Account | None:
        raise NotImplementedError

    def update_account(self, account: Account, *, contact: tuple[str, ...] | None, deactivate: bool,
                       now: dt.datetime) -> Account:
        raise NotImplementedError

    def change_key(self, account: Account, new_key: AccountKey, now: dt.datetime) -> Account:
        """Roll the account over to ``new_key`` (the front end verified both signatures of the
        keyChange JWS). CONFLICT (with ``extra["account_id"]``) when another account has it."""
        raise NotImplementedError

    # -- orders ---------------------------------------------------------------------------

    def new_order(self, account: Account, identifiers: tuple[Identifier, ...], *, profile: str | None,
                  not_before: dt.datetime | None, not_after: dt.datetime | None, replaces: str | None,
                  now: dt.datetime) -> Order:
        """A new order, checked at once against the profile's template: enroll right, name rules
        (REJECTED_IDENTIFIER with one subproblem per refused identifier), validity."""
        raise NotImplementedError

    def order(self, account: Account, order_id: int, now: dt.datetime) -> Order:
        """An order of this account (NOT_FOUND otherwise), brought up to date: expired, approved,
        denied."""
        raise NotImplementedError

    def orders(self, account: Account, *, after: int | None, limit: int, now: dt.datetime) -> OrderPage:
        raise NotImplementedError

    def finalize(self, account: Account, order_id: int, csr_der: bytes, now: dt.datetime) -> Order:
        """Submit the order's CSR to the registration authority: ORDER_NOT_READY unless ready;
        MALFORMED_CSR ("badCSR") when its names are not exactly the order's."""
        raise NotImplementedError

    def certificate(self, account: Account, certificate_id: int, alternate: int, now: dt.datetime) -> CertificateChains:
        raise NotImplementedError

    # -- authorizations and challenges ----------------------------------------------------

    def authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        raise NotImplementedError

    def deactivate_authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        raise NotImplementedError

    def challenge(self, account: Account, challenge_id: int, now: dt.datetime) -> Challenge:
        raise NotImplementedError

    def respond_to_challenge(self, account: Account, challenge_id: int,
                             now: dt.datetime) -> tuple[Challenge, ValidationJob | None]:
        """The client says it is ready: the challenge becomes ``processing`` and the job to run
        is returned (None when it is already processing, valid or invalid: nothing to start)."""
        raise NotImplementedError

    def record_validation(self, job: ValidationJob, result: ValidationResult, now: dt.datetime) -> None:
        """The validation's outcome: challenge and authorization valid or invalid, the order
        ready when all its authorizations are valid, invalid when one is not."""
        raise NotImplementedError

    # -- revocation and renewal information -----------------------------------------------

    def revoke(self, certificate_der: bytes, reason: int | None, *, account: Account | None,
               signer_jwk: Mapping[str, Any] | None, now: dt.datetime) -> None:
        """revokeCert: by an account whose principal holds the certificate, or signed by the
        certificate's own key (``signer_jwk``). ALREADY_REVOKED, BAD_REVOCATION_REASON,
        FORBIDDEN ("unauthorized")."""
        raise NotImplementedError

    def renewal_info(self, certificate_identifier: str, now: dt.datetime) -> RenewalInfo:
        """RFC 9773: the suggested window of the certificate the identifier names
        (base64url(AKI keyIdentifier) "." base64url(serial)); NOT_FOUND, MALFORMED_REQUEST."""
        raise NotImplementedError
