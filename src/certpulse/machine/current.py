"""The one rule for "the current certificate of a template", shared by the store's live links,
rebind (what a binding that follows a template should serve) and the planner (which usable
certificate carries a template).

Among the candidates, the one that expires last is current; ties go to the one that started
last, then to the thumbprint, so every reader picks the same one whatever order it listed them
in. What counts as a candidate differs by reader (the store: unarchived, with its key and not
replaced; the planner: usable now), so each filters first and then orders by :func:`recency`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Protocol, TypeVar


class Dated(Protocol):
    @property
    def not_before(self) -> dt.datetime: ...

    @property
    def not_after(self) -> dt.datetime: ...

    @property
    def thumbprint(self) -> str: ...


class Stored(Dated, Protocol):
    @property
    def template_name(self) -> str | None: ...

    @property
    def has_key(self) -> bool: ...

    @property
    def archived(self) -> bool: ...

    @property
    def replaced_by(self) -> str | None: ...


D = TypeVar("D", bound=Dated)
S = TypeVar("S", bound=Stored)


def recency(cert: Dated) -> tuple[dt.datetime, dt.datetime, str]:
    """The ordering key: later ``not_after`` first, then later ``not_before``, then thumbprint."""
    return cert.not_after, cert.not_before, cert.thumbprint


def newest(certs: Iterable[D]) -> D | None:
    """The most recent of ``certs`` by :func:`recency`, or None when there are none."""
    return max(certs, key=recency, default=None)


def live_candidate(record: Stored) -> bool:
    """A stored version that may be a template's current one: it has its key, is not archived,
    and nothing replaced it (a replaced certificate that a binding still serves stays unarchived
    until the binding moves, but it is no longer current)."""
    return record.has_key and not record.archived and record.replaced_by is None


def current(records: Iterable[S], template: str) -> S | None:
    """The current certificate of ``template`` among stored ``records``."""
    return newest(r for r in records if r.template_name == template and live_candidate(r))


def current_by_template(records: Iterable[S]) -> dict[str, S]:
    """The current certificate of every template that has one."""
    found: dict[str, S] = {}
    for record in records:
        if record.template_name and live_candidate(record):
            best = found.get(record.template_name)
            if best is None or recency(record) > recency(best):
                found[record.template_name] = record
    return found
