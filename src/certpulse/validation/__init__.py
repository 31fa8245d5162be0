"""ACME challenge validation (RFC 8555 section 8, RFC 8737, RFC 8738): the part trusted to connect out.

Like Boulder's validation authority, this is the only part of certpulse that makes outbound
connections to the names being validated. It holds no state and no database: given a challenge
(type, identifier, token, key authorization) and settings (ports, resolver, timeout), it
answers valid or a typed failure. The front end runs it off the event loop and hands the
outcome to the CA core.

The interface: :func:`validate` (blocking, thread-safe, bounded by ``settings.timeout``, never
raising) returns an :class:`Outcome`; :class:`ValidationSettings` (``from_config`` reads
``[acme]``); :func:`dns01_txt_value` (what a dns-01 TXT record must hold). The rules of each
challenge type are in :mod:`.http01`, :mod:`.dns01` and :mod:`.tlsalpn01`; look-ups in
:mod:`.resolve` (the configured resolver answers A, AAAA and TXT alike).

Failures carry RFC 8555's error names: ``malformed`` (the arguments cannot be validated: a
wildcard for http-01 or tls-alpn-01, dns-01 for an IP address, a token that is not base64url),
``dns`` (no such name, no address, SERVFAIL, resolver timeout), ``connection`` (refused, timed
out, hung up, budget spent), ``unauthorized`` (http-01: a status other than 200, a redirect;
tls-alpn-01: a certificate that is not this challenge's), ``incorrectResponse`` (http-01: a
body other than the key authorization, or over 8 KiB; dns-01: no TXT record with the value)
and ``tls`` (handshake failed, ``acme-tls/1`` not negotiated). Nothing is logged here.
"""

from __future__ import annotations

import ipaddress
import re

from certpulse.display import printable
from certpulse.pki.names import is_hostname
from certpulse.validation import dns01, http01, tlsalpn01
from certpulse.validation.dns01 import dns01_txt_value
from certpulse.validation.outcome import CONNECTION, DNS, MALFORMED, Budget, BudgetSpent, Outcome, failed
from certpulse.validation.resolve import LookupFailed, addresses_of, reverse_name
from certpulse.validation.settings import ValidationConfig, ValidationSettings

__all__ = ["Outcome", "ValidationConfig", "ValidationSettings", "dns01_txt_value", "validate"]

# A token is base64url (RFC 8555 section 8.1: at least 128 bits of entropy); anything else would
# not be a safe URL path segment, so it is refused before any connection.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")
_KEY_AUTHORIZATION_LIMIT = 512
_ADDRESSES_SHOWN = 16  # a hostile zone may answer with hundreds; the record keeps the first


def validate(challenge_type: str, identifier_type: str, identifier_value: str, token: str,
             key_authorization: str, settings: ValidationSettings | ValidationConfig) -> Outcome:
    """Validate one challenge (``http-01``, ``dns-01`` or ``tls-alpn-01``) of one identifier
    (``dns`` or ``ip``). Blocking (the front end runs it in a thread), bounded by
    ``settings.timeout`` and never raising: whatever goes wrong is an invalid :class:`Outcome`.
    ``settings`` may also be the ``[acme]`` configuration itself (read with
    :meth:`ValidationSettings.from_config`)."""
    if not isinstance(settings, ValidationSettings):
        try:
            settings = ValidationSettings.from_config(settings)
        except Exception as exc:  # a configuration the CA would have refused at start
            return failed(MALFORMED, f"the validation settings are not usable: {exc}", {})
    # The arguments are checked below; until then they are shown only printable and cut short.
    record: dict[str, object] = {"challenge": printable(challenge_type)[:40],
                                 "identifier": printable(f"{identifier_type}:{identifier_value}")[:300],
                                 "resolver": settings.resolver_label()}
    try:
        if identifier_type == "dns":
            identifier_value = identifier_value.lower()
        refusal = _refusal(challenge_type, identifier_type, identifier_value, token, key_authorization, settings)
        if refusal is not None:
            return failed(MALFORMED, refusal, record)
        budget = Budget(settings.timeout)
        if challenge_type == "dns-01":
            return dns01.look_up(identifier_value, key_authorization, settings, budget, record)
        if identifier_type == "ip":
            address = str(ipaddress.ip_address(identifier_value))
            addresses = [address]
            host = f"[{address}]" if ":" in address else address
            sni = reverse_name(address)
        else:
            addresses = addresses_of(identifier_value, settings, budget)
            host = sni = identifier_value
        record["hostname"] = identifier_value
        record["addresses_resolved"] = addresses[:_ADDRESSES_SHOWN]
        if challenge_type == "http-01":
            return http01.fetch(host, addresses, token, key_authorization, settings.http01_port, budget, record)
        return tlsalpn01.handshake(identifier_type, identifier_value, sni, addresses, key_authorization,
                                   settings.tlsalpn01_port, budget, record)
    except LookupFailed as exc:
        return failed(DNS, str(exc), record)
    except BudgetSpent as exc:
        return failed(CONNECTION, f"validating {identifier_value}: {exc}", record)
    except Exception as exc:  # the contract: an outcome, never an exception
        return failed(CONNECTION, f"validating {identifier_value} failed unexpectedly: {type(exc).__name__}: {exc}",
                      record)


def _refusal(challenge_type: str, identifier_type: str, identifier_value: str, token: str,
             key_authorization: str, settings: ValidationSettings) -> str | None:
    """Why these arguments cannot be validated at all (``malformed``), or None."""
    if challenge_type not in ("http-01", "dns-01", "tls-alpn-01"):
        return f"unknown challenge type {challenge_type!r}"
    if identifier_type == "dns":
        wildcard = identifier_value.startswith("*.")
        if not is_hostname(identifier_value, allow_wildcard=True):
            return f"{identifier_value!r} is not a DNS name"
        if wildcard and challenge_type != "dns-01":
            return f"a wildcard name ({identifier_value}) can be validated by dns-01 only"
    elif identifier_type == "ip":
        try:
            address = ipaddress.ip_address(identifier_value)
        except ValueError:
            return f"{identifier_value!r} is not an IP address"
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return f"{identifier_value!r} carries a zone, which no certificate can name"
        if challenge_type == "dns-01":
            return "dns-01 validates DNS names only, not IP addresses"
    else:
        return f"unknown identifier type {identifier_type!r}"
    if not _TOKEN.fullmatch(token):
        return "the challenge token is not 16-256 base64url characters"
    if (len(key_authorization) > _KEY_AUTHORIZATION_LIMIT or not key_authorization.isascii()
            or not key_authorization.startswith(token + ".")):
        return "the key authorization is not the token, a dot and a thumbprint"
    if not settings.timeout > 0:
        return "the validation timeout must be positive"
    return None
