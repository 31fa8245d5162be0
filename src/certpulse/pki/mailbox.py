"""E-mail addresses as certificates carry them (rfc822Name SANs, the emailAddress attribute). Pure.

An address must be an RFC 5321 mailbox ``local@domain`` as the ``email-validator`` library checks
it, with no network look-up: a dot-atom local part of at most 64 characters (no quoted local
parts, no control characters, no NUL), a domain that is a host name with at least two labels
(no address literals such as ``[192.0.2.1]``), at most 254 characters in all. rfc822Name is an
IA5String, so the address is ASCII: an internationalised domain is written in its A-label form
(``xn--...``, RFC 5280 section 7.5) and a non-ASCII local part is refused (those belong in an
SmtpUTF8Mailbox, which certpulse does not issue). The domain is lower-cased; the local part is
kept as given.
"""

from __future__ import annotations

import email_validator

from certpulse.pki.names import is_hostname
from certpulse.pki.subject import not_text


def mailbox_problem(address: str) -> str | None:
    """Why ``address`` is not a mailbox a certificate may carry; None when it is one."""
    bad = not_text(address)
    if bad is not None:
        return f"contains the control character {bad}"
    if not address.isascii():
        return "is not ASCII (write the domain as A-labels; non-ASCII local parts are not issued)"
    try:
        checked = email_validator.validate_email(
            address, check_deliverability=False, allow_smtputf8=False, allow_quoted_local=False,
            allow_domain_literal=False, allow_display_name=False, allow_empty_local=False,
            globally_deliverable=False, strict=True,  # strict: the 64-character local part limit too
        )
    except email_validator.EmailNotValidError as exc:
        return f"is not a valid mailbox ({exc})"
    if not is_hostname(checked.ascii_domain, allow_wildcard=False):
        return "has a domain that is not a host name"
    return None


def normalized(address: str) -> str:
    """A mailbox that passed :func:`mailbox_problem`, with its domain lower-cased."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def split(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain
