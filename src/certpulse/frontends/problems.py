"""RFC 7807 problem documents, and the one mapping from refusal reasons to HTTP status codes."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from certpulse.errors import Reason

PROBLEM_TYPE = "urn:certpulse:problem:"
PROBLEM_MEDIA_TYPE = "application/problem+json"

STATUS: dict[Reason, int] = {
    Reason.UNAUTHENTICATED: 401,
    Reason.TOKEN_INVALID: 401,
    Reason.TOKEN_EXPIRED: 401,
    Reason.TOKEN_USED: 409,
    Reason.FORBIDDEN: 403,
    Reason.TEMPLATE_NOT_PERMITTED: 403,
    Reason.SELF_APPROVAL: 403,
    Reason.NOT_FOUND: 404,
    Reason.CONFLICT: 409,
    Reason.REQUESTER_DISABLED: 409,
    Reason.NOT_PENDING: 409,
    Reason.ALREADY_REVOKED: 409,
    Reason.NOT_ON_HOLD: 409,
    Reason.REQUEST_TIMEOUT: 408,
    Reason.BODY_TOO_LARGE: 413,
    Reason.HEADERS_TOO_LARGE: 431,
    Reason.RATE_LIMITED: 429,
    Reason.UNAVAILABLE: 503,
    Reason.STORE: 503,
}
DEFAULT_STATUS = 400  # everything about the content of a request
# Retry-After of a 503 because the database does not answer (the API, /metrics and /readyz alike):
# a database restart or failover takes seconds; clients come back after this, with their own jitter.
DATABASE_RETRY_AFTER = 10


def status_for(reason: Reason) -> int:
    return STATUS.get(reason, DEFAULT_STATUS)


def database_unavailable(detail: str) -> JSONResponse:
    """503 with ``Retry-After`` (header and ``retry_after``), as a shed answer has: the request had
    no effect, and the same request a little later may well succeed."""
    response = problem(Reason.UNAVAILABLE, detail, status=503, retry_after=DATABASE_RETRY_AFTER)
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return response


def problem(reason: Reason, detail: str, status: int | None = None, **extra: Any) -> JSONResponse:
    code = status or status_for(reason)
    body = {
        "type": PROBLEM_TYPE + reason.value,
        "title": reason.value.replace("-", " ").capitalize(),
        "status": code,
        "detail": detail,
        "reason": reason.value,
        **extra,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="certpulse"'} if code == 401 else None
    return JSONResponse(body, status_code=code, media_type=PROBLEM_MEDIA_TYPE, headers=headers)
