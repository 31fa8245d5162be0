"""Reading the fields of ACME payloads: each of the type RFC 8555 gives it, else ``malformed``.

Data from the network is hostile: a field of the wrong type, a number where a string belongs, a
list of ten thousand identifiers, each is refused with a sentence naming the field, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from certpulse.ca.acme.model import Identifier
from certpulse.display import printable
from certpulse.errors import Reason, Refusal

MAX_IDENTIFIERS = 100
MAX_CONTACTS = 10


def malformed(detail: str) -> Refusal:
    return Refusal(Reason.MALFORMED_REQUEST, detail)


def text(payload: dict[str, Any], field: str, *, required: bool = False, limit: int = 4096) -> str | None:
    value = payload.get(field)
    if value is None:
        if required:
            raise malformed(f"the payload has no '{field}'")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise malformed(f"'{field}' must be a string")
    return value


def flag(payload: dict[str, Any], field: str) -> bool:
    value = payload.get(field, False)
    if not isinstance(value, bool):
        raise malformed(f"'{field}' must be true or false")
    return value


def contacts(payload: dict[str, Any]) -> tuple[str, ...] | None:
    """The ``contact`` list as sent (its URLs are the core's to judge: INVALID_CONTACT,
    UNSUPPORTED_CONTACT); None when absent."""
    value = payload.get("contact")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_CONTACTS or not all(
            isinstance(item, str) and len(item) <= 1024 for item in value):
        raise Refusal(Reason.INVALID_CONTACT, f"'contact' must be a list of at most {MAX_CONTACTS} URLs")
    return tuple(value)


def base64url(payload: dict[str, Any], field: str, *, limit: int = 64 * 1024) -> bytes:
    value = text(payload, field, required=True, limit=limit)
    assert value is not None
    if "=" in value or not value.isascii():
        raise malformed(f"'{field}' must be unpadded base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise malformed(f"'{field}' is not base64url") from None


def moment(payload: dict[str, Any], field: str) -> dt.datetime | None:
    value = text(payload, field, limit=64)
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise malformed(f"'{field}' must be an RFC 3339 date and time") from None
    if parsed.tzinfo is None:
        raise malformed(f"'{field}' must carry its time zone (e.g. Z)")
    return parsed.astimezone(dt.UTC)


def identifiers(payload: dict[str, Any]) -> tuple[Identifier, ...]:
    value = payload.get("identifiers")
    if not isinstance(value, list) or not value:
        raise malformed("'identifiers' must be a non-empty list")
    if len(value) > MAX_IDENTIFIERS:
        raise malformed(f"an order may name at most {MAX_IDENTIFIERS} identifiers")
    found: list[Identifier] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(
                item.get("value"), str) or not item["value"] or len(item["value"]) > 255:
            raise malformed("each identifier must be an object with a string 'type' and 'value'")
        kind, name = item["type"], item["value"]
        if kind == "dns":
            name = name.lower().removesuffix(".")
            found.append(Identifier("dns", name))
        elif kind == "ip":
            found.append(Identifier("ip", name))
        else:
            raise Refusal(Reason.UNSUPPORTED_IDENTIFIER,
                          f"identifiers of type {printable(kind[:40])!r} are not supported (dns and ip are)")
    return tuple(found)


def revocation_reason(payload: dict[str, Any]) -> int | None:
    value = payload.get("reason")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refusal(Reason.BAD_REVOCATION_REASON, "'reason' must be a CRL reason code (a whole number)")
    return value


__all__ = ["base64url", "contacts", "flag", "identifiers", "malformed", "moment", "revocation_reason", "text"]
