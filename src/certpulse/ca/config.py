"""A CA's home folder: where its keys, certificates, database and settings live.

Every server-side command takes ``--dir``; without it ``$CERTPULSE_CA_DIR``, then
:data:`SYSTEM_CA_DIR`. Several CAs can run side by side, each in its own folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import tomli_w

from certpulse.ca.publishing import Publishing
from certpulse.durations import format_duration, parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import sqlite_url

SYSTEM_CA_DIR = Path("/var/lib/certpulse-ca")
CONFIG_NAME = "ca.toml"


def resolve_ca_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("CERTPULSE_CA_DIR")
    return Path(env) if env else SYSTEM_CA_DIR


# The [acme] settings that are durations
ACME_DURATIONS = ("validation_timeout", "nonce_lifetime", "order_lifetime", "eab_key_lifetime", "ari_retry_after")


@dataclasses.dataclass(frozen=True)
class ACMEConfig:
    """``ca.toml``'s ``[acme]`` table: the ACME server (RFC 8555) of ``ca serve``.

    Every field has a default, so a CA made before ACME existed serves it with these."""

    enabled: bool = True
    # Accounts must carry an external account binding (``certpulse principal acme-eab NAME``),
    # which binds them to a principal. With false, an account without one acts as
    # ``unbound_principal`` (a principal the operator made for this; "" refuses such accounts).
    external_account_required: bool = True
    unbound_principal: str = ""
    # The template an order without a profile gets; "" picks the first template (by name) the
    # account's principal may enroll in.
    default_profile: str = ""
    terms_of_service: str = ""  # URL in the directory's meta; clients must then agree
    website: str = ""
    # Where challenges are validated. Real deployments keep 80/443 and the system resolver;
    # tests on loopback point them at local servers. dns_resolver is "host:port" ("" = system).
    http01_port: int = 80
    tlsalpn01_port: int = 443
    dns_resolver: str = ""
    validation_timeout: str = "10s"
    nonce_lifetime: str = "15m"
    order_lifetime: str = "7d"  # a pending order and its authorizations expire after this
    eab_key_lifetime: str = "7d"  # an unused external account binding key expires after this
    ari_retry_after: str = "6h"  # Retry-After of renewalInfo answers

    def __post_init__(self) -> None:
        for field in ACME_DURATIONS:
            if self.duration(field) <= dt.timedelta(0):
                raise Refusal(Reason.INVALID_ARGUMENT, f"acme.{field} must be positive")
        for field in ("http01_port", "tlsalpn01_port"):
            port = getattr(self, field)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise Refusal(Reason.INVALID_ARGUMENT, f"acme.{field} must be a port number (1-65535)")
        if self.dns_resolver:
            host, _, port = self.dns_resolver.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise Refusal(Reason.INVALID_ARGUMENT,
                              f"acme.dns_resolver {self.dns_resolver!r} must be host:port, e.g. 127.0.0.1:53")

    @classmethod
    def from_toml(cls, table: object) -> ACMEConfig:
        if not isinstance(table, dict):
            raise ValueError("[acme] must be a table")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(table) - set(known)
        if unknown:
            raise ValueError(f"[acme] has unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, object] = {}
        for name, value in table.items():
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"acme.{name} must be true or false")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"acme.{name} must be a whole number")
            elif name in ACME_DURATIONS:
                value = _duration_text(value)
            elif not isinstance(value, str):
                raise ValueError(f"acme.{name} must be text")
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]

    def duration(self, field: str) -> dt.timedelta:
        """One of :data:`ACME_DURATIONS`, parsed once: the ACME routes read them on every request."""
        return self._durations[field]

    @functools.cached_property
    def _durations(self) -> dict[str, dt.timedelta]:
        # not a dataclass field: neither compared nor written back to ca.toml
        return {field: parse_duration(getattr(self, field)) for field in ACME_DURATIONS}


@dataclasses.dataclass(frozen=True)
class CAConfig:
    """What ``ca.toml`` holds. The database URL may point at PostgreSQL."""

    name: str
    database_url: str
    policy_id: str
    max_request_bytes: int = 64 * 1024
    token_lifetime_hours: int = 24
    # Where relying parties reach this CA's CRLs, OCSP responder and CA certificates (plain HTTP as
    # a rule: a CRL or OCSP fetch over TLS would need revocation checking itself). None: issued
    # certificates carry no CRL distribution point and no AIA, as before.
    public_url: str | None = None
    # A CRL is signed again at least every crl_period and valid for crl_validity (nextUpdate);
    # also at once after every revocation, hold or release.
    crl_period: str = "1d"
    crl_validity: str = "7d"
    # OCSP answers are valid (cacheable, nextUpdate) for ocsp_validity; the delegated signing
    # certificate lives ocsp_signer_validity and is renewed when a third of it is left.
    ocsp_validity: str = "1h"
    ocsp_signer_validity: str = "7d"
    acme: ACMEConfig = dataclasses.field(default_factory=ACMEConfig)

    def __post_init__(self) -> None:
        if self.public_url is not None:
            object.__setattr__(self, "public_url", check_public_url(self.public_url))
        for field in ("crl_period", "crl_validity", "ocsp_validity", "ocsp_signer_validity"):
            parse_duration(getattr(self, field))
        if self.crl_validity_delta <= self.crl_period_delta:
            raise Refusal(Reason.INVALID_ARGUMENT,
                          f"crl_validity ({self.crl_validity}) must be longer than crl_period ({self.crl_period})")
        if self.ocsp_signer_validity_delta <= self.ocsp_validity_delta:
            raise Refusal(Reason.INVALID_ARGUMENT, f"ocsp_signer_validity ({self.ocsp_signer_validity}) must be "
                                                   f"longer than ocsp_validity ({self.ocsp_validity})")

    def publishing(self) -> Publishing:
        return Publishing(public_url=self.public_url, crl_period=self.crl_period_delta,
                          crl_validity=self.crl_validity_delta, ocsp_validity=self.ocsp_validity_delta,
                          ocsp_signer_validity=self.ocsp_signer_validity_delta)

    @property
    def crl_period_delta(self) -> dt.timedelta:
        return parse_duration(self.crl_period)

    @property
    def crl_validity_delta(self) -> dt.timedelta:
        return parse_duration(self.crl_validity)

    @property
    def ocsp_validity_delta(self) -> dt.timedelta:
        return parse_duration(self.ocsp_validity)

    @property
    def ocsp_signer_validity_delta(self) -> dt.timedelta:
        return parse_duration(self.ocsp_signer_validity)


def check_public_url(url: str) -> str:
    """``url`` as the base of the CRL, OCSP and CA-certificate URLs: http or https, a host, no
    query or fragment; without a trailing slash."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise Refusal(Reason.INVALID_ARGUMENT, f"public_url {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or any(c.isspace() or not c.isprintable() for c in url) or "@" in parts.netloc:
        raise Refusal(Reason.INVALID_ARGUMENT,
                      f"public_url {url!r} must be an http:// or https:// URL with a host and no query, "
                      "fragment or user name, e.g. http://ca.example.com")
    return url.rstrip("/")


@dataclasses.dataclass(frozen=True)
class CADir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    def default_database_url(self) -> str:
        return sqlite_url(self.root.resolve() / "ca.db")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load(self) -> CAConfig:
        if not self.exists():
            raise Refusal(
                Reason.NOT_FOUND,
                f"no CA in {self.root} (run 'certpulse ca init --dir {self.root}' first)",
            )
        try:
            data = tomllib.loads(self.config_path.read_text())
            return CAConfig(
                name=str(data["name"]),
                database_url=str(data["database_url"]),
                policy_id=str(data["policy_id"]),
                max_request_bytes=int(data.get("max_request_bytes", 64 * 1024)),
                token_lifetime_hours=int(data.get("token_lifetime_hours", 24)),
                public_url=str(data["public_url"]) if data.get("public_url") is not None else None,
                crl_period=_duration_text(data.get("crl_period", "1d")),
                crl_validity=_duration_text(data.get("crl_validity", "7d")),
                ocsp_validity=_duration_text(data.get("ocsp_validity", "1h")),
                ocsp_signer_validity=_duration_text(data.get("ocsp_signer_validity", "7d")),
                acme=ACMEConfig.from_toml(data.get("acme", {})),
            )
        except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError) as exc:
            raise Refusal(Reason.STORE, f"cannot read {self.config_path}: {exc}") from None
        except Refusal as exc:
            raise Refusal(Reason.STORE, f"cannot read {self.config_path}: {exc.detail}") from None

    def save(self, config: CAConfig) -> None:
        values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}  # TOML has no null
        self.config_path.write_text(tomli_w.dumps(values))


def _duration_text(value: object) -> str:
    """A duration from ``ca.toml``: text such as ``"1d"``, or whole seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{value!r} is not a duration such as 1d or 8h")
    return value if isinstance(value, str) else format_duration(parse_duration(value))

