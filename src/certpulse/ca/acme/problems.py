"""ACME problems as the store keeps them (an invalid order's or challenge's ``error`` column):
JSON text written by this module and read back only by it. Pure."""

from __future__ import annotations

import json
from typing import Any

from certpulse.ca.acme.model import Identifier, Problem
from certpulse.errors import Reason, Refusal

MAX_DETAIL = 1000  # a stored detail is cut here: a validator's answer can be long


def from_refusal(refusal: Refusal, identifier: Identifier | None = None) -> Problem:
    """The problem a refusal leaves on what it made invalid (a finalize's order)."""
    subproblems = refusal.extra.get("subproblems", ())
    return Problem(refusal.reason, refusal.detail, identifier,
                   tuple(p for p in subproblems if isinstance(p, Problem)),
                   refusal.extra.get("acme_type") if isinstance(refusal.extra.get("acme_type"), str) else None)


def _document(problem: Problem) -> dict[str, Any]:
    doc: dict[str, Any] = {"reason": problem.reason.value, "detail": problem.detail[:MAX_DETAIL]}
    if problem.identifier is not None:
        doc["identifier"] = {"type": problem.identifier.type, "value": problem.identifier.value}
    if problem.subproblems:
        doc["subproblems"] = [_document(p) for p in problem.subproblems]
    if problem.acme_type:
        doc["acme_type"] = problem.acme_type
    return doc


def dumps(problem: Problem | None) -> str | None:
    return None if problem is None else json.dumps(_document(problem))


def _problem(doc: Any) -> Problem:
    ident = doc.get("identifier")
    identifier = Identifier(ident["type"], ident["value"]) if isinstance(ident, dict) else None
    try:
        reason = Reason(doc.get("reason"))
    except ValueError:
        reason = Reason.MALFORMED_REQUEST
    return Problem(reason, str(doc.get("detail", "")), identifier,
                   tuple(_problem(p) for p in doc.get("subproblems", ())), doc.get("acme_type"))


def loads(text: str | None) -> Problem | None:
    if not text:
        return None
    return _problem(json.loads(text))
