"""The names a certificate will carry, checked against a template's current rules. Pure.

:func:`checked_request_names` takes a subject and SANs (from a CSR, or copied from a certificate
being renewed) and returns the subject and names to issue, or raises a ``name-not-allowed``
:class:`~certpulse.errors.Refusal` naming the first attribute or name the template does not allow:

* subject attributes: only those in ``[subject] allowed_attributes`` (default ``CN``), with a value
  from ``[subject.values]`` when the template lists some; each at most once unless
  ``repeatable_attributes`` says otherwise; one attribute per RDN unless ``multi_valued_rdns``.
  Every value passes :func:`certpulse.pki.subject.value_problem` (no control characters, ``C`` two
  upper-case letters, lengths). The issued subject is rebuilt from the values in the CSR's order,
  each attribute in its standard string type (``C`` as PrintableString);
* the common name, when there is one, is one of the SANs (a host-name CN alone becomes the DNS SAN);
* DNS names, IP addresses and e-mail addresses by the ``[names]`` rules; URIs and other kinds never.
"""

from __future__ import annotations

from collections import Counter

from cryptography import x509
from cryptography.x509.oid import NameOID

from certpulse.ca.model import Caller
from certpulse.ca.templates import Template
from certpulse.errors import Reason, Refusal
from certpulse.pki import mailbox
from certpulse.pki.names import RequestedNames, dns_name_matches, ip_in_ranges, is_hostname
from certpulse.pki.subject import EMAIL_ADDRESS, attribute_of, rebuild, value_problem


def _refuse(detail: str) -> Refusal:
    return Refusal(Reason.NAME_NOT_ALLOWED, detail)


def checked_request_names(
    caller: Caller, template: Template, subject: x509.Name, names: RequestedNames
) -> tuple[x509.Name, RequestedNames]:
    """The subject and SANs to issue under ``template`` for ``caller``, or a refusal."""
    issued_subject = checked_subject(caller, template, subject)
    rules = template.names
    common_names = [str(a.value).lower() for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not names.all() and common_names and is_hostname(common_names[0], allow_wildcard=rules.wildcard):
        names = RequestedNames(dns=(common_names[0],))
    if not names.all():
        raise _refuse("the request names nothing (no SAN and no host name as CN)")
    if len(names.all()) > rules.max:
        raise _refuse(f"at most {rules.max} names are allowed")
    emails = tuple(checked_email(caller, template, e, "the e-mail SAN") for e in names.email)
    names = RequestedNames(dns=names.dns, ip=names.ip, email=emails, uri=names.uri)
    if common_names and common_names[0] not in [n.lower() for n in names.all()]:
        raise _refuse(f"the common name {common_names[0]!r} is not among the SANs")
    for dns in names.dns:
        if not is_hostname(dns, allow_wildcard=True):
            raise _refuse(f"{dns!r} is not a valid DNS name")
        if dns.startswith("*.") and not rules.wildcard:
            raise _refuse(f"wildcard names such as {dns!r} are not allowed")
        if not dns_name_matches(dns, rules.dns):
            raise _refuse(f"DNS name {dns!r} is not allowed by template {template.name!r}")
    for ip in names.ip:
        if not rules.ip:
            raise _refuse(f"IP address {ip} is not allowed by template {template.name!r}")
        if rules.ip_ranges and not ip_in_ranges(ip, rules.ip_ranges):
            raise _refuse(f"IP address {ip} is outside the allowed ranges")
    if names.uri:
        raise _refuse("URI names are not allowed")
    return issued_subject, names


def checked_subject(caller: Caller, template: Template, subject: x509.Name) -> x509.Name:
    """The subject to issue: every attribute allowed, with an allowed value, re-encoded."""
    rules = template.subject_rules
    counts: Counter[str] = Counter()
    rdns: list[list[tuple[x509.ObjectIdentifier, str]]] = []
    for rdn in subject.rdns:
        if len(rdn) > 1 and not rules.multi_valued_rdns:
            shown = "+".join(attribute_of(a.oid).label for a in rdn)
            raise _refuse(f"multi-valued RDNs ({shown}) are not allowed by template {template.name!r}")
        values: list[tuple[x509.ObjectIdentifier, str]] = []
        for attr in rdn:
            kind = attribute_of(attr.oid)
            if kind.label not in rules.allowed:
                raise _refuse(f"the subject attribute {kind.label} is not allowed by template {template.name!r} "
                              f"(allowed: {', '.join(rules.allowed)})")
            problem = value_problem(kind, attr.value)
            if problem is not None:
                raise _refuse(f"the subject attribute {kind.label} {problem}")
            value = str(attr.value)
            allowed_values = rules.values_of(kind.label)
            if allowed_values is not None and value not in allowed_values:
                raise _refuse(f"{kind.label}={value!r} is not allowed by template {template.name!r} "
                              f"(allowed: {', '.join(allowed_values)})")
            if kind == EMAIL_ADDRESS:
                value = checked_email(caller, template, value, "the subject's emailAddress")
            counts[kind.label] += 1
            if counts[kind.label] > 1 and kind.label not in rules.repeatable:
                what = "common name" if kind.oid == NameOID.COMMON_NAME else f"{kind.label} attribute"
                raise _refuse(f"the subject has more than one {what}")
            values.append((attr.oid, value))
        rdns.append(values)
    return rebuild(rdns)


def checked_email(caller: Caller, template: Template, address: str, what: str) -> str:
    """An e-mail address the template allows for ``caller``, domain lower-cased; or a refusal."""
    rules = template.names
    if not rules.email:
        raise _refuse(f"e-mail addresses are not allowed by template {template.name!r}")
    problem = mailbox.mailbox_problem(address)
    if problem is not None:
        raise _refuse(f"{what} {address!r} {problem}")
    address = mailbox.normalized(address)
    local, domain = mailbox.split(address)
    if not dns_name_matches(domain, rules.email):
        raise _refuse(f"{what} {address!r}: the domain {domain!r} is not allowed by template {template.name!r}")
    if rules.email_local_part == "principal" and local.lower() != caller.name.lower():
        raise _refuse(f"{what} {address!r}: template {template.name!r} allows only the principal's own "
                      f"address ({caller.name}@...)")
    return address
