"""The ACME routes in ``/openapi.json``, documented as what they are: JOSE requests.

They are answered by plain ASGI (:mod:`.routes`), so FastAPI does not see them; this adds them
to the generated document by hand. Every POST takes a flattened JWS
(``application/jose+json``, RFC 8555 section 6.2) whose payload, described in each summary, is
signed by an account key (``kid``) or, for newAccount and revokeCert, by a key it carries
(``jwk``); an empty payload is a POST-as-GET. Every answer carries ``Replay-Nonce``; every
refusal is an ``application/problem+json`` document with an ``urn:ietf:params:acme:error:*``
type. The payload schemas are RFC 8555's, not repeated here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

JWS_SCHEMA = {
    "type": "object", "required": ["protected", "payload", "signature"], "additionalProperties": False,
    "description": "A flattened JWS (RFC 7515 section 7.2.2): base64url protected header with alg, nonce, url "
                   "and exactly one of jwk and kid; base64url payload (empty: POST-as-GET); base64url signature",
    "properties": {"protected": {"type": "string"}, "payload": {"type": "string"}, "signature": {"type": "string"}},
}
_PROBLEM = {"description": "An ACME problem document (urn:ietf:params:acme:error:*)",
            "content": {"application/problem+json": {"schema": {"type": "object"}}}}
_NONCE = {"Replay-Nonce": {"description": "A fresh nonce for the next request", "schema": {"type": "string"}}}
_JSON = {"application/json": {"schema": {"type": "object"}}}


def _post(summary: str, ok: str, *, created: bool = False, media: dict[str, Any] | None = None,
          params: tuple[str, ...] = ()) -> dict[str, Any]:
    responses: dict[str, Any] = {"201" if created else "200": {"description": ok, "headers": _NONCE,
                                                               "content": media or _JSON}}
    if created:
        responses["200"] = {"description": "Already exists (the existing resource)", "headers": _NONCE,
                            "content": _JSON}
    for code in ("400", "403", "404", "409", "413", "415", "429", "503"):
        responses[code] = _PROBLEM
    return {"post": {
        "tags": ["acme"], "summary": summary,
        "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "integer"}} for p in params],
        "requestBody": {"required": True, "content": {"application/jose+json": {"schema": JWS_SCHEMA}}},
        "responses": responses}}


def _get(summary: str, ok: str, *, code: str = "200", params: tuple[str, ...] = (),
         head: bool = False) -> dict[str, Any]:
    operation = {"tags": ["acme"], "summary": summary,
                 "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params],
                 "responses": {code: {"description": ok, "headers": _NONCE, "content": _JSON}, "429": _PROBLEM,
                               "503": _PROBLEM}}
    item: dict[str, Any] = {"get": operation}
    if head:
        item["head"] = {**operation, "responses": {"200": {"description": ok, "headers": _NONCE}}}
    return item


ACME_PATHS: dict[str, Any] = {
    "/acme/directory": _get("ACME directory (RFC 8555 7.1.1): the URLs of every operation and meta (profiles, "
                            "externalAccountRequired)", "The directory"),
    "/acme/new-nonce": _get("A fresh nonce in Replay-Nonce (HEAD 200, GET 204)", "No content", code="204", head=True),
    "/acme/new-account": _post("Create or find an account (jwk): {contact, termsOfServiceAgreed, "
                               "onlyReturnExisting, externalAccountBinding}", "The new account (Location: its URL)",
                               created=True),
    "/acme/account/{id}": _post("Read (POST-as-GET), update {contact} or deactivate {status: deactivated} an "
                                "account", "The account", params=("id",)),
    "/acme/account/{id}/orders": _post("The account's orders (POST-as-GET); Link rel=next pages on",
                                       "{orders: [URL]}", params=("id",)),
    "/acme/key-change": _post("Roll the account over to a new key: payload a JWS signed by the new key (jwk) of "
                              "{account, oldKey}", "The account"),
    "/acme/new-order": _post("A new order: {identifiers, notBefore, notAfter, profile, replaces}",
                             "The order (Location: its URL)", created=True),
    "/acme/order/{id}": _post("An order (POST-as-GET); Retry-After while processing", "The order", params=("id",)),
    "/acme/order/{id}/finalize": _post("Finalize a ready order: {csr: base64url DER}", "The order",
                                       params=("id",)),
    "/acme/authz/{id}": _post("An authorization (POST-as-GET) or deactivate it {status: deactivated}",
                              "The authorization", params=("id",)),
    "/acme/chall/{id}": _post("A challenge (POST-as-GET), or {} to have it validated", "The challenge",
                              params=("id",)),
    "/acme/cert/{id}": _post("The certificate and its chain (POST-as-GET); Link rel=alternate for other chains",
                             "PEM certificate chain", params=("id",),
                             media={"application/pem-certificate-chain": {"schema": {"type": "string"}}}),
    "/acme/revoke-cert": _post("Revoke a certificate {certificate: base64url DER, reason}, signed by its account "
                               "(kid) or its own key (jwk)", "Revoked (empty body)"),
    "/acme/renewal-info/{certID}": _get("RFC 9773 renewal information: the suggested window; Retry-After",
                                        "{suggestedWindow: {start, end}}", params=("certID",)),
}


def add_acme_paths(app: FastAPI) -> None:
    """Add :data:`ACME_PATHS` to ``app``'s generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("paths", {}).update(ACME_PATHS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["ACME_PATHS", "add_acme_paths"]
