"""The ACME server's URLs: which operation a request path names, and every URL an answer gives.

URLs are built from the request as received (its scheme and ``Host``), so the server answers
with the names its clients used, behind whatever name or port they reach it by; the ``url``
header of each JWS must name the request exactly that way (RFC 8555 section 6.4).
"""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import urlsplit

from starlette.types import Scope

PREFIX = "/acme/"
_ID = r"([0-9]{1,9})"  # a row id: within a 32-bit integer column on every database
_ACCOUNT_PATH = re.compile(rf"/acme/account/{_ID}")

# operation -> (path pattern, methods)
ROUTES: dict[str, tuple[re.Pattern[str], frozenset[str]]] = {
    name: (re.compile(pattern), frozenset(methods))
    for name, pattern, methods in (
        ("directory", r"/acme/directory", ("GET", "HEAD")),
        ("newNonce", r"/acme/new-nonce", ("GET", "HEAD")),
        ("newAccount", r"/acme/new-account", ("POST",)),
        ("account", rf"/acme/account/{_ID}", ("POST",)),
        ("orders", rf"/acme/account/{_ID}/orders", ("POST",)),
        ("keyChange", r"/acme/key-change", ("POST",)),
        ("newOrder", r"/acme/new-order", ("POST",)),
        ("order", rf"/acme/order/{_ID}", ("POST",)),
        ("finalize", rf"/acme/order/{_ID}/finalize", ("POST",)),
        ("authz", rf"/acme/authz/{_ID}", ("POST",)),
        ("challenge", rf"/acme/chall/{_ID}", ("POST",)),
        ("certificate", rf"/acme/cert/{_ID}(?:/{_ID})?", ("POST",)),
        ("revokeCert", r"/acme/revoke-cert", ("POST",)),
        ("renewalInfo", r"/acme/renewal-info/([A-Za-z0-9_=.-]{1,512})", ("GET", "HEAD")),
    )
}


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    operation: str
    methods: frozenset[str]
    ids: tuple[int, ...]
    text: str | None  # renewalInfo's certificate identifier


# The paths without an id, looked up directly (the others are few enough to try one by one)
_FIXED: dict[str, Match] = {
    pattern.pattern: Match(name, methods, (), None) for name, (pattern, methods) in ROUTES.items()
    if "(" not in pattern.pattern
}


def match(path: str) -> Match | None:
    """The operation ``path`` names (None: no ACME resource is there)."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed
    for name, (pattern, methods) in ROUTES.items():
        found = pattern.fullmatch(path)
        if found is not None:
            if name == "renewalInfo":
                return Match(name, methods, (), found.group(1))
            return Match(name, methods, tuple(int(g) for g in found.groups() if g is not None), None)
    return None


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server") or ("localhost", None)
    host, port = server[0], server[1]
    return f"{host}:{port}" if port else str(host)


@dataclasses.dataclass(frozen=True, slots=True)
class Urls:
    """The URLs of one request's answer, under ``base`` (scheme://host[:port] as received)."""

    base: str

    @classmethod
    def of(cls, scope: Scope) -> Urls:
        return cls(f"{scope.get('scheme', 'http')}://{_host(scope)}")

    def request(self, scope: Scope) -> str:
        """The URL this request was sent to, as a JWS ``url`` header must name it."""
        query = scope.get("query_string", b"")
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        target = path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        return self.base + target

    @property
    def directory(self) -> str:
        return self.base + "/acme/directory"

    @property
    def new_nonce(self) -> str:
        return self.base + "/acme/new-nonce"

    @property
    def new_account(self) -> str:
        return self.base + "/acme/new-account"

    @property
    def new_order(self) -> str:
        return self.base + "/acme/new-order"

    @property
    def revoke_cert(self) -> str:
        return self.base + "/acme/revoke-cert"

    @property
    def key_change(self) -> str:
        return self.base + "/acme/key-change"

    @property
    def renewal_info(self) -> str:
        return self.base + "/acme/renewal-info"

    def account(self, account_id: int) -> str:
        return f"{self.base}/acme/account/{account_id}"

    def orders(self, account_id: int, cursor: int | None = None) -> str:
        url = f"{self.base}/acme/account/{account_id}/orders"
        return url if cursor is None else f"{url}?cursor={cursor}"

    def order(self, order_id: int) -> str:
        return f"{self.base}/acme/order/{order_id}"

    def finalize(self, order_id: int) -> str:
        return f"{self.base}/acme/order/{order_id}/finalize"

    def authz(self, authorization_id: int) -> str:
        return f"{self.base}/acme/authz/{authorization_id}"

    def challenge(self, challenge_id: int) -> str:
        return f"{self.base}/acme/chall/{challenge_id}"

    def certificate(self, certificate_id: int, alternate: int = 0) -> str:
        url = f"{self.base}/acme/cert/{certificate_id}"
        return f"{url}/{alternate}" if alternate else url

    def account_id(self, kid: str) -> int | None:
        """The account a JWS ``kid`` names: one of this server's account URLs. Only its path
        counts: a client that registered through another name or port of this server (a proxy,
        localhost and 127.0.0.1) keeps its account; the signature is what proves it."""
        try:
            parts = urlsplit(kid)
        except ValueError:
            return None
        found = _ACCOUNT_PATH.fullmatch(parts.path)
        if found is None or parts.scheme not in ("http", "https") or parts.query or parts.fragment:
            return None
        return int(found.group(1))


__all__ = ["PREFIX", "ROUTES", "Match", "Urls", "match"]
