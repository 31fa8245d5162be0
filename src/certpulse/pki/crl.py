"""Building certificate revocation lists (RFC 5280 section 5). Pure: no clock, no I/O.

The caller passes the entries, the CRL number and the update times; this module builds the
entries and signs the list with cryptography's builders.

Speed matters: a CA with a million revoked, unexpired certificates signs a CRL of a million
entries. So:

* the list builder gets every entry at once (``CertificateRevocationListBuilder(...,
  revoked_certificates=entries)``): adding them one by one copies the list each time (O(n²));
* an entry is made by ``RevokedCertificateBuilder(serial, date, extensions).build()`` with the
  reason's extension list made (and encoded) once per reason and shared: the chained setters validate and copy
  a builder per call, twice as slow; the values are checked here instead (:func:`entry_values`);
* :class:`EntryCache` keeps the entries of the last CRL it built, so that the next one (after a
  revocation, or the periodic re-signing) builds only the entries that are new.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import CRLEntryExtensionOID

from certpulse.pki.build import signature_hash
from certpulse.pki.keys import PrivateKey

# RFC 5280 5.3.1: the reason code is left out rather than written as unspecified
UNSPECIFIED = x509.ReasonFlags.unspecified.value
_REASONS = {flag.value: flag for flag in x509.ReasonFlags}
_EARLIEST = dt.datetime(1950, 1, 1)  # naive UTC, as cryptography keeps the date
MAX_SERIAL_BITS = 159  # RFC 5280 4.1.2.2: at most 20 octets, positive
# Entries an EntryCache keeps (about 0.5 KB each): beyond this a CRL's further entries are built
# every time, so that a CA with millions of revocations does not hold gigabytes in each process.
DEFAULT_CACHE_ENTRIES = 200_000

EntryKey = tuple[int, dt.datetime, str | None]  # serial, revocation date (naive UTC), reason


def reason_extensions(reason: str | None) -> list[x509.Extension[x509.ExtensionType]]:
    """The entry extensions of a revocation reason: none for unspecified (or no reason), else the
    CRLReason extension (non-critical, RFC 5280 5.3.1)."""
    if reason is None or reason == UNSPECIFIED:
        return []
    flag = _REASONS.get(reason)
    if flag is None or flag is x509.ReasonFlags.remove_from_crl:
        raise ValueError(f"{reason!r} is not a revocation reason of a full CRL")
    # Given to the entry builder as its DER value (encoded once here, by cryptography): a CRLReason
    # object would be encoded again, through Python, for every entry (a fifth of an entry's cost).
    # The entry's DER is the same; read back, the extension is a CRLReason.
    value = x509.UnrecognizedExtension(CRLEntryExtensionOID.CRL_REASON, x509.CRLReason(flag).public_bytes())
    return [x509.Extension(value.oid, False, value)]


def entry_values(serial: int, revoked_at: dt.datetime) -> tuple[int, dt.datetime]:
    """The serial and revocation date as the entry keeps them (naive UTC), checked as
    cryptography's setters would check them."""
    if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS:
        raise ValueError(f"serial {serial:x} is not a positive integer of at most 159 bits")
    if revoked_at.tzinfo is not None:
        revoked_at = revoked_at.astimezone(dt.UTC).replace(tzinfo=None)
    if revoked_at < _EARLIEST:
        raise ValueError(f"revocation date {revoked_at.isoformat()} is before 1950")
    return serial, revoked_at


class EntryCache:
    """Builds CRL entries, keeping those of the last list built (at most ``limit``).

    Entries are immutable, and one is the same for the same (serial, date, reason): a CRL made
    again after one more revocation reuses all the others. Only the last list's entries are kept,
    so an entry that left the CRL (its certificate expired, or was released from hold) is dropped.
    Not thread-safe: one :meth:`entries` call at a time (the caller holds a lock).
    """

    def __init__(self, limit: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.limit = limit
        self._entries: dict[EntryKey, x509.RevokedCertificate] = {}
        self._extensions = {reason: reason_extensions(reason) for reason in (*_REASONS, None)
                            if reason != x509.ReasonFlags.remove_from_crl.value}
        self.built = 0  # entries built (not found in the cache) by the last call

    def entries(self, rows: Iterable[tuple[int, dt.datetime, str | None]]) -> list[x509.RevokedCertificate]:
        """One entry per ``(serial, revocation date, reason)`` row, in the rows' order."""
        previous, kept = self._entries, {}
        out: list[x509.RevokedCertificate] = []
        append = out.append
        extensions = self._extensions
        builder = x509.RevokedCertificateBuilder
        earliest = _EARLIEST
        built, room = 0, self.limit
        # the loop of a million entries: the checks of entry_values inline, no lookup in an empty cache
        for serial, revoked_at, reason in rows:
            key = (serial, revoked_at, reason)
            entry = previous.get(key) if previous else None
            if entry is None:
                date = revoked_at if revoked_at.tzinfo is None else revoked_at.astimezone(dt.UTC).replace(tzinfo=None)
                if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS or date < earliest:
                    entry_values(serial, revoked_at)  # raises, saying which
                try:
                    reason_list = extensions[reason]
                except KeyError:
                    reason_list = reason_extensions(reason)  # raises for a reason no CRL carries
                # the constructor takes the values checked above (see the module's doc)
                entry = builder(serial, date, reason_list).build()
                built += 1
            if room > 0:
                kept[key] = entry
                room -= 1
            append(entry)
        self._entries = kept
        self.built = built
        return out


@dataclasses.dataclass(frozen=True)
class SignedCRL:
    der: bytes
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int


def sign_crl(*, issuer_cert: x509.Certificate, issuer_key: PrivateKey, number: int, this_update: dt.datetime,
             next_update: dt.datetime, entries: list[x509.RevokedCertificate]) -> SignedCRL:
    """A full CRL (v2) of ``issuer_cert``: CRL number and authority key identifier (RFC 5280 5.2),
    thisUpdate / nextUpdate as given (whole seconds, as DER time carries them), signed by
    ``issuer_key`` with the hash the CA uses for its certificates."""
    if number < 0 or number.bit_length() > MAX_SERIAL_BITS:
        raise ValueError("a CRL number is a non-negative integer of at most 20 octets")
    this_update, next_update = this_update.replace(microsecond=0), next_update.replace(microsecond=0)
    if next_update <= this_update:
        raise ValueError("nextUpdate must come after thisUpdate")
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer_cert.subject, revoked_certificates=entries,
    ).last_update(this_update).next_update(next_update).add_extension(
        x509.CRLNumber(number), critical=False,
    ).add_extension(authority_key_identifier(issuer_cert), critical=False)
    crl = builder.sign(issuer_key, signature_hash(issuer_key))
    return SignedCRL(der=crl.public_bytes(serialization.Encoding.DER), number=number, this_update=this_update,
                     next_update=next_update, entries=len(entries))


def authority_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI that names the issuer's key as its certificates' SKI does (from the key when the
    certificate has no SKI)."""
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def pem_crl(der: bytes) -> str:
    """The CRL as PEM (``-----BEGIN X509 CRL-----``), as ``openssl crl`` and nginx read it."""
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclasses.dataclass(frozen=True)
class ListedEntry:
    serial: int
    revoked_at: dt.datetime  # aware UTC
    reason: str  # the CRLReason, or unspecified when the entry carries none


def listed_entries(der: bytes) -> list[ListedEntry]:
    """What a CRL lists, read back from its DER (``ca crl`` prints it)."""
    listed = []
    for revoked in x509.load_der_x509_crl(der):
        try:
            reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = UNSPECIFIED
        listed.append(ListedEntry(revoked.serial_number, revoked.revocation_date_utc, reason))
    return listed
