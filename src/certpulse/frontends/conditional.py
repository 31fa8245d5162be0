"""Conditional GETs of the publishing routes (CRLs, OCSP answers, CA certificates): reading the
request's ``If-None-Match`` once, the same way for all three (RFC 9110 13.1.2: a list of entity
tags; a weak tag compares by its opaque part, as a GET's weak comparison does)."""

from __future__ import annotations

from starlette.types import Scope


def if_none_match(scope: Scope) -> frozenset[bytes] | None:
    """The entity tags the request's ``If-None-Match`` names (``*`` included as is); None
    without one."""
    for name, value in scope["headers"]:
        if name == b"if-none-match":
            return frozenset(tag.strip().removeprefix(b"W/") for tag in value.split(b","))
    return None
