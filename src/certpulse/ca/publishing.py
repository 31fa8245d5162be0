"""Where relying parties find what this CA publishes, and how often it publishes it.

One URL scheme, fixed here, used by the certificates the CA issues (CRL distribution point,
AIA) and by the routes that answer them (``frontends/publication.py``):

* ``{public_url}/crl/{authority}/{shard}.crl``: the CRL of an issuing authority (a root's CRL
  covers the issuing CAs it signed). Every certificate issued today points at shard ``0``,
  the full CRL. The shard in the path lets a CA partition later (RFC 5280 issuing distribution
  points) without changing a URL that certificates already carry: see the README's CRL section.
* ``{public_url}/ocsp``: the OCSP responder (POST, and GET with the request appended, RFC 5019).
* ``{public_url}/ca/{authority}.der``: the authority's certificate, DER (AIA caIssuers).

Authority names match ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (``ca/admin.py``): safe in a path as is.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

CRL_PATH = "/crl/"
OCSP_PATH = "/ocsp"
CA_CERT_PATH = "/ca/"
FULL_CRL_SHARD = 0


@dataclasses.dataclass(frozen=True)
class Publishing:
    """The publishing settings of ``ca.toml`` (see :class:`~certpulse.ca.config.CAConfig`)."""

    public_url: str | None = None
    crl_period: dt.timedelta = dt.timedelta(days=1)
    crl_validity: dt.timedelta = dt.timedelta(days=7)
    ocsp_validity: dt.timedelta = dt.timedelta(hours=1)
    ocsp_signer_validity: dt.timedelta = dt.timedelta(days=7)


def crl_path(authority: str, shard: int = FULL_CRL_SHARD) -> str:
    return f"{CRL_PATH}{authority}/{shard}.crl"


def ca_cert_path(authority: str) -> str:
    return f"{CA_CERT_PATH}{authority}.der"


def crl_url(public_url: str, authority: str, shard: int = FULL_CRL_SHARD) -> str:
    return public_url + crl_path(authority, shard)


def ocsp_url(public_url: str) -> str:
    return public_url + OCSP_PATH


def ca_cert_url(public_url: str, authority: str) -> str:
    return public_url + ca_cert_path(authority)


DEFAULT_PUBLISHING = Publishing()
