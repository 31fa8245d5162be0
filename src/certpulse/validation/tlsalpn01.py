"""tls-alpn-01 (RFC 8737; RFC 8738 section 6 for IP identifiers): the validation certificate.

The client answers a TLS handshake that offers only the ALPN protocol ``acme-tls/1`` with a
certificate made for the challenge. Validation connects to ``<address>:<tlsalpn01_port>``
(addresses as for http-01: the first A, then the first AAAA, until one connects), sends as SNI
the name (for an IP identifier its reverse-DNS name, ``4.3.2.1.in-addr.arpa``), verifies no
chain (the certificate is self-signed by design) and requires:

* the server negotiated ``acme-tls/1`` (else ``tls``);
* the certificate has exactly one subjectAltName entry, equal to the identifier (a dNSName
  for a name, an iPAddress for an address), and a critical id-pe-acmeIdentifier extension
  whose value is the SHA-256 digest of the key authorization (else ``unauthorized``).

Parsing is cryptography's; the only bytes built here are the expected extension value, in
:func:`expected_acme_identifier_value`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from certpulse.validation.http01 import one_per_family, url_host_port
from certpulse.validation.outcome import CONNECTION, TLS, UNAUTHORIZED, Budget, Outcome, failed, passed

ACME_TLS_1 = "acme-tls/1"
# id-pe-acmeIdentifier (RFC 8737 section 6.1)
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def expected_acme_identifier_value(key_authorization: str) -> bytes:
    """The DER the acmeIdentifier extension's extnValue must hold: RFC 8737 defines
    ``Authorization ::= OCTET STRING (SIZE (32))`` holding SHA-256(key authorization), so its
    DER is tag 0x04 (OCTET STRING), length 0x20 (32, short form), then the 32 digest bytes.
    cryptography exposes an extension it does not know (this one) as these raw bytes, and
    has no type for it to encode with, hence the two fixed bytes here."""
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode("ascii")).digest()


def _context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the validation certificate is self-signed by design
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ACME_TLS_1])
    return context


def handshake(identifier_type: str, value: str, sni: str, addresses: list[str], key_authorization: str,
              port: int, budget: Budget, record: dict[str, object]) -> Outcome:
    """Connect to the addresses in turn and judge the first handshake's certificate."""
    record["port"] = port
    record["sni"] = sni
    last: Outcome | None = None
    for address in one_per_family(addresses):
        record["address_used"] = address
        where = url_host_port(address, port)
        try:
            sock = socket.create_connection((address, port), timeout=budget.remaining())
        except OSError as exc:
            last = failed(CONNECTION, f"could not connect to {where} for {value}: {_reason(exc)}", record)
            continue
        with sock:
            try:
                sock.settimeout(budget.remaining())
                with _context().wrap_socket(sock, server_hostname=sni) as tls:
                    protocol = tls.selected_alpn_protocol()
                    der = tls.getpeercert(binary_form=True)
            except ssl.SSLError as exc:
                return failed(TLS, f"the TLS handshake with {where} for {value} failed: {_reason(exc)}", record)
            except OSError as exc:
                return failed(CONNECTION, f"the TLS handshake with {where} for {value} failed: {_reason(exc)}",
                              record)
        if protocol != ACME_TLS_1:
            return failed(TLS, f"{where} did not negotiate the ALPN protocol {ACME_TLS_1} for {value}", record)
        if der is None:
            return failed(TLS, f"{where} sent no certificate for {value}", record)
        return judge_certificate(identifier_type, value, der, key_authorization, where, record)
    assert last is not None, "the caller passes at least one address"
    return last


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def judge_certificate(identifier_type: str, value: str, der: bytes, key_authorization: str, where: str,
                      record: dict[str, object]) -> Outcome:
    """Whether ``der`` is the validation certificate of this challenge (RFC 8737 section 3)."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return failed(TLS, f"the certificate from {where} for {value} is unreadable: {exc}", record)
    try:
        extensions = certificate.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        return failed(UNAUTHORIZED, f"the certificate from {where} for {value} has unreadable extensions: {exc}",
                      record)
    try:
        sans = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return failed(UNAUTHORIZED, f"the certificate from {where} for {value} has no subjectAltName", record)
    if len(sans) != 1:
        return failed(UNAUTHORIZED, f"the certificate from {where} for {value} has {len(sans)} subjectAltName "
                                    "entries; it must have exactly one, the identifier", record)
    if not _is_identifier(sans[0], identifier_type, value):
        return failed(UNAUTHORIZED, f"the certificate from {where} names {_shown(sans[0])}, not {value}", record)
    try:
        extension = extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return failed(UNAUTHORIZED, f"the certificate from {where} for {value} has no acmeIdentifier extension",
                      record)
    if not extension.critical:
        return failed(UNAUTHORIZED, f"the certificate from {where} for {value} has an acmeIdentifier extension "
                                    "that is not critical", record)
    content = extension.value
    if not isinstance(content, x509.UnrecognizedExtension):
        return failed(UNAUTHORIZED, f"the acmeIdentifier extension from {where} is not readable", record)
    if content.value != expected_acme_identifier_value(key_authorization):
        return failed(UNAUTHORIZED, f"the acmeIdentifier extension from {where} for {value} does not hold the "
                                    "SHA-256 digest of this challenge's key authorization", record)
    return passed(f"{where} answered {ACME_TLS_1} with the validation certificate for {value}", record)


def _is_identifier(name: x509.GeneralName, identifier_type: str, value: str) -> bool:
    if identifier_type == "ip":
        return isinstance(name, x509.IPAddress) and name.value == ipaddress.ip_address(value)
    return isinstance(name, x509.DNSName) and name.value.lower() == value.lower()


def _shown(name: x509.GeneralName) -> str:
    return f"{type(name).__name__} {str(name.value)[:80]!r}"
