"""The planner's indexed view of its inputs: the policy servers grouped and ordered as SPEC step 4
says (:class:`PolicyView`), and the personal store indexed by template (:class:`CertIndex`). Pure.

Both live for one planning pass over inputs that do not change meanwhile, so every lookup is
remembered: a pulse over thousands of certificates asks the same questions (a template by OID,
its issuers, its successor, the newest usable certificate of a template) for each of them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TypeAlias

from certpulse.agent.model import (
    AUTH_STRENGTH,
    IssuerPolicy,
    PolicyServer,
    StoredCertificate,
    TemplatePolicy,
    starts_later,
)
from certpulse.machine.current import newest

Group: TypeAlias = tuple[PolicyServer, ...]  # the servers of one policy id, best first


def serving_issuers(group: Iterable[PolicyServer], template: str, *,
                    new_request: bool) -> tuple[tuple[PolicyServer, IssuerPolicy], ...]:
    """The group's valid issuers that serve the template, best first: reachable ones, then by
    cost and name. A new request cannot go to a renewal-only issuer."""
    pairs = [(server, issuer) for server in group for issuer in server.issuers
             if issuer.valid and template in issuer.templates and not (new_request and issuer.renewal_only)]
    return tuple(sorted(pairs, key=lambda pair: (not pair[1].reachable, pair[1].cost, pair[1].name)))


class PolicyView:
    """The policy servers, grouped by policy id and ordered by cost then authentication strength.

    Lookups are indexed and remembered: a view lives for one planning pass over a policy that
    does not change meanwhile, and a pulse over thousands of certificates asks the same
    questions (a template by OID, its issuers, its successor) for each of them."""

    def __init__(self, servers: Iterable[PolicyServer]) -> None:
        members: dict[str, list[PolicyServer]] = {}
        for server in servers:
            members.setdefault(server.policy_id, []).append(server)
        groups = (tuple(sorted(m, key=lambda s: (s.cost, AUTH_STRENGTH.get(s.auth, 9), s.url)))
                  for m in members.values())
        self.groups: list[Group] = sorted(
            groups, key=lambda g: (g[0].cost, AUTH_STRENGTH.get(g[0].auth, 9), g[0].policy_id))
        default = [g for g in self.groups if any(s.is_default for s in g)]
        self.default: Group = default[0] if default else (self.groups[0] if self.groups else ())
        # Per group, per server in order: its templates by name and by OID (the first one listed,
        # as PolicyServer.template answers).
        self._tables: dict[int, list[tuple[dict[str, TemplatePolicy], dict[str, TemplatePolicy]]]] = {}
        # Template name -> (group, template) for every template that supersedes it, in the order
        # groups, servers and templates are listed.
        self._successors: dict[str, list[tuple[Group, TemplatePolicy]]] = {}
        for group in self.groups:
            tables = self._tables.setdefault(id(group), [])
            for server in group:
                by_name: dict[str, TemplatePolicy] = {}
                by_oid: dict[str, TemplatePolicy] = {}
                for template in server.templates:
                    by_name.setdefault(template.name, template)
                    by_oid.setdefault(template.oid, template)
                    for old in dict.fromkeys(template.supersedes):
                        self._successors.setdefault(old, []).append((group, template))
                tables.append((by_name, by_oid))
        self._orders: dict[str | None, list[Group]] = {}
        self._found: dict[tuple[str | None, str | None, str | None], tuple[TemplatePolicy, Group] | None] = {}
        self._issuers: dict[tuple[int, str, bool], tuple[tuple[PolicyServer, IssuerPolicy], ...]] = {}
        self._issuer_orders: dict[tuple[str, int, bool], tuple[tuple[str, ...], str | None]] = {}
        self._superseded: dict[tuple[str, str], TemplatePolicy | None] = {}

    def _ordered(self, policy_id: str | None) -> list[Group]:
        """The groups to look in: the certificate's own, then the default, then the others."""
        ordered = self._orders.get(policy_id)
        if ordered is None:
            ordered = [g for g in self.groups if g[0].policy_id == policy_id]
            ordered += [self.default] if self.default and self.default not in ordered else []
            ordered += [g for g in self.groups if g not in ordered]
            self._orders[policy_id] = ordered
        return ordered

    def find(self, *, name: str | None = None, oid: str | None = None,
             policy_id: str | None = None) -> tuple[TemplatePolicy, Group] | None:
        """A template by name or OID: in the certificate's own policy group first, then the default,
        then any (the seed: the default policy renews certificates whose policy id is unknown).
        The first group in which the template is applicable wins; when it is applicable in none,
        the first group that lists it (so the skip can be explained)."""
        key = (name, oid, policy_id)
        if key in self._found:
            return self._found[key]
        first: tuple[TemplatePolicy, Group] | None = None
        for group in self._ordered(policy_id):
            for by_name, by_oid in self._tables[id(group)]:
                template = by_oid.get(oid) if oid else by_name.get(name or "")
                if template is not None:
                    if self.applicable(template, group):
                        self._found[key] = (template, group)
                        return template, group
                    first = first or (template, group)
                    break
        self._found[key] = first
        return first

    def _issuer_pairs(self, group: Group, template: str,
                      new_request: bool) -> tuple[tuple[PolicyServer, IssuerPolicy], ...]:
        key = (id(group), template, new_request)
        found = self._issuers.get(key)
        if found is None:
            found = self._issuers[key] = serving_issuers(group, template, new_request=new_request)
        return found

    def serves(self, group: Group, template: str) -> bool:
        """Some valid issuer of the group serves the template (a renewal-only one will do)."""
        return bool(self._issuer_pairs(group, template, False))

    def starting_later(self, group: Group, template: str, now: dt.datetime) -> str | None:
        """Why no valid issuer of the group serves the template when the reason is this
        machine's clock: the earliest issuer that serves it and starts after ``now`` (it, or its
        root), in words; None when there is none."""
        late = sorted((issuer.starts_at, issuer.name) for server in group for issuer in server.issuers
                      if issuer.starts_at is not None and template in issuer.templates)
        if not late:
            return None
        start, name = late[0]
        return starts_later(f"the issuing CA {name!r}", start, now)

    def issuer_order(self, template: str, group: Group, *, new_request: bool) -> tuple[list[str], str | None]:
        """Issuers to try, best first: the template's group (or, for new requests, the default
        policy) by cost, then any other policy's issuers that serve the template."""
        first = self.default if new_request else group
        key = (template, id(first), new_request)
        found = self._issuer_orders.get(key)
        if found is None:
            pairs = list(self._issuer_pairs(first, template, new_request))
            for other in self.groups:
                if other is not first:
                    pairs += self._issuer_pairs(other, template, new_request)
            names: list[str] = []
            for _, issuer in pairs:
                if issuer.name not in names:
                    names.append(issuer.name)
            found = (tuple(names), pairs[0][0].url if pairs else None)
            self._issuer_orders[key] = found
        return list(found[0]), found[1]

    def applicable(self, template: TemplatePolicy, group: Group) -> bool:
        """Autoenroll permission and some valid issuer in the group serves it."""
        return template.autoenroll and self.serves(group, template.name)

    def kra_valid(self, group: Group) -> bool:
        return any(server.kra_valid for server in group)

    def superseded(self, template: TemplatePolicy, context: str) -> TemplatePolicy | None:
        """The template that replaces this one, when this client can enroll for it silently:
        applicable, subject not required in the request, fewer than two RA signatures, no user
        interaction on a machine, and a KRA when it archives keys. A successor this client cannot
        get leaves the old template renewing, rather than lapsing with nothing in its place."""
        key = (template.name, context)
        if key not in self._superseded:
            self._superseded[key] = next(
                (other for group, other in self._successors.get(template.name, ())
                 if self.applicable(other, group) and other.subject_source != "request" and other.ra_signatures < 2
                 and not (context == "machine" and other.user_interaction)
                 and (not other.archive_private_key or self.kra_valid(group))), None)
        return self._superseded[key]

    def all_templates(self) -> list[tuple[TemplatePolicy, Group]]:
        """Every template by name, each from the first group (default first) where it applies."""
        names = sorted({t.name for group in self.groups for server in group for t in server.templates})
        found = [self.find(name=name) for name in names]
        return [entry for entry in found if entry is not None]


class CertIndex:
    """Certificates in a fixed order, indexed by template name. Each template's list keeps that
    order, so scanning one template's certificates finds what scanning all of them would, in
    time proportional to that template's share of the store rather than to the whole store."""

    def __init__(self, certs: Iterable[StoredCertificate], now: dt.datetime) -> None:
        self.all = list(certs)
        self.now = now
        self._of: dict[str | None, list[StoredCertificate]] = {}
        self._at: dict[str | None, list[int]] = {}
        for index, cert in enumerate(self.all):
            self._of.setdefault(cert.template_name, []).append(cert)
            self._at.setdefault(cert.template_name, []).append(index)
        self._newest: dict[str, StoredCertificate | None] = {}
        self._ra: bool | None = None
        self._by_thumb: dict[str, StoredCertificate] | None = None

    def of(self, template: str | None) -> list[StoredCertificate]:
        """The certificates whose template is named ``template``, in order (do not change it)."""
        return self._of.get(template, [])

    def unarchived_of(self, templates: Iterable[str]) -> list[StoredCertificate]:
        """``[c for c in all if not c.archived and c.template_name in templates]``."""
        indices = sorted({i for name in templates for i in self._at.get(name, ())})
        return [self.all[i] for i in indices if not self.all[i].archived]

    def newest_usable(self, template: str) -> StoredCertificate | None:
        if template not in self._newest:
            self._newest[template] = _newest_usable(self.of(template), template, self.now)
        return self._newest[template]

    def has_ra_certificate(self) -> bool:
        if self._ra is None:
            self._ra = _has_ra_certificate(self.all, self.now)
        return self._ra

    def by_thumbprint(self) -> dict[str, StoredCertificate]:
        if self._by_thumb is None:
            self._by_thumb = {c.thumbprint: c for c in self.all}
        return self._by_thumb


def _newest_usable(certs: Iterable[StoredCertificate], template: str, now: dt.datetime) -> StoredCertificate | None:
    """The template's most recent usable certificate, by the store's one rule of recency
    (:mod:`certpulse.machine.current`): what the live link names is what the planner renews."""
    return newest(c for c in certs if c.template_name == template and c.usable(now))


def _has_ra_certificate(certs: Iterable[StoredCertificate], now: dt.datetime) -> bool:
    return any(c.is_ra and c.usable(now) for c in certs)
