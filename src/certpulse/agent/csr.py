"""Building the agent's requests: keys, CSRs, and renewal evidence. Pure."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certpulse.pki.build import signature_hash
from certpulse.pki.keys import PrivateKey
from certpulse.pki.signing import sign_bytes


def build_csr(key: PrivateKey, subject: x509.Name | None = None,
              sans: list[x509.GeneralName] | None = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, signature_hash(key))


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def renewal_signature(old_key: PrivateKey, csr: x509.CertificateSigningRequest) -> bytes:
    """Proof of possession of the old certificate: its key signs the new CSR's DER."""
    return sign_bytes(old_key, csr.public_bytes(serialization.Encoding.DER))


def names_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []
