"""Certificates for tests that need them in-process: one factory instead of a builder per module.

Provenance: everything here is made at test time with ``cryptography`` through certpulse's own
builders (:func:`certpulse.pki.build.build_ca_certificate`, :func:`end_entity_builder`), so a
CA certificate and an end-entity certificate look exactly like those ``ca serve`` issues (basic
constraints, key usage, key identifiers, the template-information extension when asked). EC
P-256 keys unless said otherwise. Nothing is read from disk or the network.

* :meth:`Authority.root` and :meth:`Authority.subordinate`: a CA hierarchy.
* :meth:`Authority.issue`: an end-entity certificate (a fresh key, or the public key given).
* :meth:`Authority.kra`: a key recovery agent's RSA certificate.
* :func:`self_signed`: a bare certificate of no CA (what an operator imports or monitors).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certpulse.pki import template_info
from certpulse.pki.build import (
    build_ca_certificate,
    build_kra_certificate,
    end_entity_builder,
    random_serial,
    signature_hash,
    simple_name,
)
from certpulse.pki.certs import thumbprint
from certpulse.pki.keys import PrivateKey, PublicKey

DAY = dt.timedelta(days=1)
SIGNING = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                        encipher_only=False, decipher_only=False)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate with its private key (None when issued for a public key given)."""

    key: PrivateKey | None
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.certificate)

    @property
    def pem(self) -> str:
        return pem(self.certificate)

    @property
    def key_pem(self) -> bytes:
        assert self.key is not None
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


@dataclasses.dataclass(frozen=True)
class Authority:
    """A CA: its key, its certificate and the chain above it (root last)."""

    key: PrivateKey
    certificate: x509.Certificate
    parents: tuple[x509.Certificate, ...] = ()

    @classmethod
    def root(cls, name: str = "Test Root", *, not_before: dt.datetime | None = None,
             not_after: dt.datetime | None = None, path_length: int | None = 1) -> Authority:
        start = not_before or utc_now() - DAY
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_ca_certificate(subject=simple_name(name), public_key=key.public_key(), issuer_cert=None,
                                    signing_key=key, not_before=start, not_after=not_after or start + 3650 * DAY,
                                    path_length=path_length)
        return cls(key, cert)

    def subordinate(self, name: str = "Test Issuing CA", *, not_before: dt.datetime | None = None,
                    not_after: dt.datetime | None = None) -> Authority:
        start = not_before or self.certificate.not_valid_before_utc
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_ca_certificate(subject=simple_name(name), public_key=key.public_key(),
                                    issuer_cert=self.certificate, signing_key=self.key, not_before=start,
                                    not_after=not_after or self.certificate.not_valid_after_utc, path_length=0)
        return Authority(key, cert, (self.certificate, *self.parents))

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its parents: what a server sends after a leaf."""
        return (self.certificate, *self.parents)

    def issue(self, cn: str | None = "leaf.test", *, sans: Sequence[str] = (), public_key: PublicKey | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None, days: int = 365,
              ekus: Sequence[str] = (), key_usage: x509.KeyUsage = SIGNING,
              template: template_info.TemplateInfo | None = None, subject: x509.Name | None = None,
              signing_key: PrivateKey | None = None, serial: int | None = None) -> Issued:
        """An end-entity certificate. ``signing_key`` signs instead of the CA's own key (a forgery
        that names this CA as its issuer); ``serial`` copies another certificate's."""
        key: PrivateKey | None = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()  # type: ignore[assignment]
        assert public_key is not None
        start = not_before or utc_now() - dt.timedelta(minutes=1)
        extra = (template_info.encode(template),) if template is not None else ()
        signer = signing_key or self.key
        builder = end_entity_builder(
            subject=subject if subject is not None else (simple_name(cn) if cn else x509.Name([])),
            public_key=public_key, issuer_cert=self.certificate, issuer_key=signer, not_before=start,
            not_after=not_after or start + days * DAY, sans=[x509.DNSName(n) for n in sans], key_usage=key_usage,
            ekus=tuple(ekus), extra=extra)
        cert = builder.serial_number(serial or random_serial()).sign(signer, signature_hash(signer))
        return Issued(key, cert, self.chain)

    def kra(self, name: str = "Test Key Recovery Agent") -> Issued:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        start = utc_now() - DAY
        cert = build_kra_certificate(subject=simple_name(name), public_key=key.public_key(),
                                     issuer_cert=self.certificate, issuer_key=self.key, not_before=start,
                                     not_after=start + 365 * DAY)
        return Issued(key, cert, self.chain)


def self_signed(cn: str = "self-signed.test", *, days: int = 365, start: dt.datetime | None = None,
                subject: x509.Name | None = None, sans: Sequence[str] = (),
                key: PrivateKey | None = None) -> Issued:
    """A bare certificate of no CA (no extensions but the SANs asked for): the agent can only
    watch, import or serve it, never renew it."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = subject if subject is not None else x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    begin = start or utc_now() - dt.timedelta(minutes=1)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(begin)
               .not_valid_after(begin + days * DAY))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    return Issued(key, builder.sign(key, hashes.SHA256()))


# -- hand-built DER, for test vectors cryptography will not build (malformed on purpose) ------------

def der(tag: int, content: bytes) -> bytes:
    """One DER TLV: ``tag``, the definite length, ``content``."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def der_oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der(0x06, bytes(body))
