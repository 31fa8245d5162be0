"""The bindings registry: which consumer uses which certificate, how it is deployed there, and
where to probe that it is really served."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from typing import Any

from sqlalchemy import delete, select, update

from certpulse.errors import Reason, Refusal
from certpulse.machine.certstore import LocalStore
from certpulse.machine.schema import BindingState
from certpulse.machine.schema import bindings as t
from certpulse.sql.db import read, write

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclasses.dataclass(frozen=True)
class Binding:
    name: str
    kind: str
    template: str | None
    thumbprint: str | None
    target: str | None
    options: dict[str, Any]
    probe: str | None
    auto: bool
    state: BindingState
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None
    last_output: str | None
    verdict: str | None
    served: str | None
    checked_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> Binding:
        return cls(name=row.name, kind=row.kind, template=row.template, thumbprint=row.thumbprint, target=row.target,
                   options=json.loads(row.options), probe=row.probe, auto=row.auto, state=row.state,
                   attempts=row.attempts, next_attempt_at=row.next_attempt_at, last_error=row.last_error,
                   last_output=row.last_output, verdict=row.verdict, served=row.served, checked_at=row.checked_at,
                   created_at=row.created_at, updated_at=row.updated_at)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("next_attempt_at", "checked_at", "created_at", "updated_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def add_binding(store: LocalStore, *, name: str, kind: str, template: str | None, thumbprint: str | None,
                options: dict[str, Any], probe: str | None, auto: bool, now: dt.datetime) -> Binding:
    """Register a binding (not deployed yet: the caller deploys it)."""
    if not _NAME.fullmatch(name):
        raise Refusal(Reason.INVALID_ARGUMENT, "a binding name is 1-64 letters, digits, '.', '_' or '-'")
    with write(store.engine) as conn:
        if conn.execute(select(t.c.name).where(t.c.name == name)).first() is not None:
            raise Refusal(Reason.CONFLICT, f"a binding named {name!r} exists (binding remove {name} first)")
        conn.execute(t.insert().values(
            name=name, kind=kind, template=template, thumbprint=None, target=thumbprint, options=json.dumps(options),
            probe=probe, auto=auto, state="waiting", attempts=0, created_at=now, updated_at=now))
    return get_binding(store, name)


def get_binding(store: LocalStore, name: str) -> Binding:
    with read(store.engine) as conn:
        row = conn.execute(select(t).where(t.c.name == name)).first()
    if row is None:
        raise Refusal(Reason.NOT_FOUND, f"no binding named {name!r}")
    return Binding.from_row(row)


def list_bindings(store: LocalStore) -> list[Binding]:
    with read(store.engine) as conn:
        return [Binding.from_row(r) for r in conn.execute(select(t).order_by(t.c.name))]


def remove_binding(store: LocalStore, name: str) -> Binding:
    binding = get_binding(store, name)
    with write(store.engine) as conn:
        conn.execute(delete(t).where(t.c.name == name))
    return binding


def update_binding(store: LocalStore, name: str, now: dt.datetime, **values: Any) -> Binding:
    with write(store.engine) as conn:
        conn.execute(update(t).where(t.c.name == name).values(updated_at=now, **values))
    return get_binding(store, name)
