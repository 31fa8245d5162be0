"""Name look-ups for validation, through dnspython: the configured resolver, or the system's.

One resolver answers everything a validation asks: the TXT records of dns-01 and the A/AAAA
records of http-01 and tls-alpn-01, so a test (or an operator with a split-horizon DNS) points
``[acme] dns_resolver`` at one server and all three challenge types see the same names. The
system resolver is the one ``/etc/resolv.conf`` names, asked by dnspython as well (not
``getaddrinfo``: its time cannot be bounded), so ``/etc/hosts`` is not consulted.
"""

from __future__ import annotations

import ipaddress
import socket

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from certpulse.validation.outcome import Budget, BudgetSpent
from certpulse.validation.settings import ValidationSettings


class LookupFailed(Exception):
    """A look-up found no such name, timed out or failed (ACME's ``dns`` error); the message
    is the detail's sentence."""


class NoSuchName(LookupFailed):
    """The name does not exist (NXDOMAIN): no other record type is worth asking for."""


class NoRecords(Exception):
    """The name exists but holds no record of the type asked for."""


def _resolver(settings: ValidationSettings, budget: Budget) -> dns.resolver.Resolver:
    if settings.dns_resolver is None:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"the system resolver is not configured ({exc})") from None
    else:
        host, port = settings.dns_resolver
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [_address_of_resolver(host)]
        resolver.port = port
    resolver.cache = None  # every validation asks afresh
    left = budget.remaining()
    resolver.timeout = left
    resolver.lifetime = left
    return resolver


def _address_of_resolver(host: str) -> str:
    """The configured resolver is normally an address; a name is looked up once by the system."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0])
    except (OSError, IndexError) as exc:
        raise LookupFailed(f"the configured resolver {host!r} has no address ({exc})") from None


def query(name: str, rdtype: str, settings: ValidationSettings, budget: Budget) -> list[dns.rdata.Rdata]:
    """The records of ``rdtype`` at ``name`` (absolute, no search list; CNAMEs are followed).
    :class:`NoRecords` when the name holds none of that type, :class:`LookupFailed` when the
    name does not exist or the resolver does not answer in time."""
    try:
        resolver = _resolver(settings, budget)
    except BudgetSpent:
        raise LookupFailed(f"DNS problem: no time left to look up {rdtype} for {name}") from None
    try:
        answer = resolver.resolve(dns.name.from_text(name), dns.rdatatype.from_text(rdtype),
                                  search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        raise NoSuchName(f"DNS problem: {name} does not exist (NXDOMAIN looking up {rdtype})") from None
    except dns.resolver.NoNameservers:
        raise LookupFailed(f"DNS problem: the resolver failed (SERVFAIL or refused) looking up {rdtype} "
                           f"for {name}") from None
    except dns.exception.Timeout:
        raise LookupFailed(f"DNS problem: query timed out looking up {rdtype} for {name}") from None
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"DNS problem looking up {rdtype} for {name}: {exc}") from None
    if answer.rrset is None:
        raise NoRecords(f"{name} has no {rdtype} record")
    return list(answer.rrset)


def addresses_of(name: str, settings: ValidationSettings, budget: Budget) -> list[str]:
    """The addresses of ``name``: its A records, then its AAAA records. :class:`LookupFailed`
    when it has neither (or the look-ups fail)."""
    found: list[str] = []
    failure: LookupFailed | None = None
    for rdtype in ("A", "AAAA"):
        try:
            found.extend(str(ipaddress.ip_address(rdata.to_text())) for rdata in query(name, rdtype, settings, budget))
        except NoRecords:
            continue
        except NoSuchName:
            raise
        except LookupFailed as exc:
            failure = failure or exc
    if found:
        return found
    if failure is not None:
        raise failure
    raise LookupFailed(f"DNS problem: {name} has no A or AAAA record")


def reverse_name(address: str) -> str:
    """The reverse-DNS name of an IP address (``4.3.2.1.in-addr.arpa``), without the final dot:
    the SNI of tls-alpn-01 for an IP identifier (RFC 8738 section 6)."""
    return str(dns.reversename.from_address(address).to_text(omit_final_dot=True))
