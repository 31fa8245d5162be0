"""The extensions that tell a relying party where to check a certificate: the CRL distribution
point and the authority information access (OCSP responder, issuer certificate). Pure: the
caller (the CA core) makes the URLs from its public URL; this module only encodes them.

RFC 5280 4.2.1.13 and 4.2.2.1; both non-critical, as the CA/Browser Forum profiles have them.
A client that does not understand them ignores them; one that does fetches over plain HTTP.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID


def crl_distribution_point(crl_url: str) -> x509.CRLDistributionPoints:
    """One distribution point, a full name with one URI, no reasons and no CRL issuer: the CRL
    at ``crl_url`` is the full CRL of the certificate's issuer."""
    return x509.CRLDistributionPoints([
        x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None,
                               reasons=None, crl_issuer=None)])


def authority_information_access(*, ocsp_url: str | None, ca_issuers_url: str | None) -> \
        x509.AuthorityInformationAccess | None:
    """The OCSP responder and/or where the issuer's certificate (DER) is; None when neither."""
    descriptions = []
    if ocsp_url is not None:
        descriptions.append(x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                                   x509.UniformResourceIdentifier(ocsp_url)))
    if ca_issuers_url is not None:
        descriptions.append(x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                                   x509.UniformResourceIdentifier(ca_issuers_url)))
    return x509.AuthorityInformationAccess(descriptions) if descriptions else None


def pointer_extensions(*, crl_url: str | None, ocsp_url: str | None,
                       ca_issuers_url: str | None) -> tuple[x509.ExtensionType, ...]:
    """The CRL distribution point (when ``crl_url``) and the AIA (when either of the others), in
    that order, for a certificate builder's extensions."""
    extensions: list[x509.ExtensionType] = []
    if crl_url is not None:
        extensions.append(crl_distribution_point(crl_url))
    aia = authority_information_access(ocsp_url=ocsp_url, ca_issuers_url=ca_issuers_url)
    if aia is not None:
        extensions.append(aia)
    return tuple(extensions)
