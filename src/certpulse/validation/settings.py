"""Where and how long challenge validation may reach: ports, resolver, time budget.

The values come from ``ca.toml``'s ``[acme]`` table. This part may not import the CA
(layering: ``validation`` sees only ``pki`` and the base), so :meth:`ValidationSettings.from_config`
accepts any object with the four attributes it reads (:class:`ValidationConfig`), of which
``certpulse.ca.config.ACMEConfig`` is one.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from certpulse.durations import parse_duration
from certpulse.errors import Reason, Refusal


class ValidationConfig(Protocol):
    """What :meth:`ValidationSettings.from_config` reads (``ACMEConfig`` has these)."""

    @property
    def http01_port(self) -> int: ...

    @property
    def tlsalpn01_port(self) -> int: ...

    @property
    def dns_resolver(self) -> str: ...  # "host:port", or "" for the system resolver

    @property
    def validation_timeout(self) -> str: ...  # a duration such as "10s"


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """Ports to connect to, the resolver to ask (None: the system's, read from
    ``/etc/resolv.conf``), and the whole budget in seconds of one validation (every look-up,
    connection and read of it together)."""

    http01_port: int = 80
    tlsalpn01_port: int = 443
    dns_resolver: tuple[str, int] | None = None
    timeout: float = 10.0

    @classmethod
    def from_config(cls, config: ValidationConfig) -> ValidationSettings:
        """The settings of an ``[acme]`` table. ``dns_resolver`` is ``host:port``; an IPv6
        host may be written in brackets (``[::1]:53``)."""
        resolver: tuple[str, int] | None = None
        if config.dns_resolver:
            host, _, port = config.dns_resolver.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise Refusal(Reason.INVALID_ARGUMENT,
                              f"acme.dns_resolver {config.dns_resolver!r} must be host:port, e.g. 127.0.0.1:53")
            resolver = (host, int(port))
        return cls(http01_port=config.http01_port, tlsalpn01_port=config.tlsalpn01_port,
                   dns_resolver=resolver,
                   timeout=parse_duration(config.validation_timeout).total_seconds())

    def resolver_label(self) -> str:
        """The resolver as shown in an outcome's record: ``host:port`` or ``system``."""
        if self.dns_resolver is None:
            return "system"
        host, port = self.dns_resolver
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
