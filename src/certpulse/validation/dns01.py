"""dns-01 (RFC 8555 section 8.4): a TXT record at ``_acme-challenge.<name>``.

For a wildcard identifier (``*.example.com``) the record is at the base name's
``_acme-challenge.example.com``. Any one TXT record equal to :func:`dns01_txt_value` validates;
the strings of a record are joined (a TXT record may split its text into 255-byte strings).
None equal: ``incorrectResponse`` saying how many were seen (never their content, which the
operator can look up and which a hostile zone could make large); no such name: ``dns``.
"""

from __future__ import annotations

import base64
import hashlib

import dns.rdtypes.ANY.TXT

from certpulse.validation.outcome import DNS, INCORRECT_RESPONSE, Budget, Outcome, failed, passed
from certpulse.validation.resolve import LookupFailed, NoRecords, query
from certpulse.validation.settings import ValidationSettings


def dns01_txt_value(key_authorization: str) -> str:
    """The TXT value a dns-01 challenge expects: base64url(SHA-256(key authorization)),
    without padding (RFC 8555 section 8.4)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def record_name(identifier_value: str) -> str:
    """Where the TXT record lives: ``_acme-challenge.`` and the name, a wildcard's base name."""
    return "_acme-challenge." + identifier_value.removeprefix("*.")


def look_up(identifier_value: str, key_authorization: str, settings: ValidationSettings, budget: Budget,
            record: dict[str, object]) -> Outcome:
    name = record_name(identifier_value)
    record["txt_name"] = name
    expected = dns01_txt_value(key_authorization).encode("ascii")
    try:
        rdatas = query(name, "TXT", settings, budget)
    except NoRecords:
        return failed(INCORRECT_RESPONSE, f"found no TXT record at {name}", record)
    except LookupFailed as exc:
        return failed(DNS, str(exc), record)
    seen = [b"".join(rdata.strings) for rdata in rdatas if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)]
    record["txt_records_seen"] = len(seen)
    if expected in seen:
        return passed(f"{name} holds the expected TXT record", record)
    return failed(INCORRECT_RESPONSE, f"found {len(seen)} TXT record{'s' if len(seen) != 1 else ''} at {name}, "
                                      "none with the value this challenge expects", record)
