"""The ACME resources as JSON (RFC 8555 section 7.1): accounts, orders, authorizations,
challenges, the directory and renewal information, each from the core's typed result."""

from __future__ import annotations

import datetime as dt
from typing import Any

from certpulse.ca.acme.model import Account, Authorization, Challenge, DirectoryMeta, Order, RenewalInfo
from certpulse.frontends.acme.errors import identifier_document, problem_document
from certpulse.frontends.acme.urls import Urls


def timestamp(moment: dt.datetime) -> str:
    """RFC 3339, UTC, as ACME clients expect (``2026-01-02T03:04:05Z``)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def directory(urls: Urls, meta: DirectoryMeta) -> dict[str, Any]:
    meta_document: dict[str, Any] = {
        "externalAccountRequired": meta.external_account_required,
        "profiles": dict(meta.profiles),
    }
    if meta.terms_of_service:
        meta_document["termsOfService"] = meta.terms_of_service
    if meta.website:
        meta_document["website"] = meta.website
    return {
        "newNonce": urls.new_nonce,
        "newAccount": urls.new_account,
        "newOrder": urls.new_order,
        "revokeCert": urls.revoke_cert,
        "keyChange": urls.key_change,
        "renewalInfo": urls.renewal_info,
        "meta": meta_document,
    }


def account(urls: Urls, item: Account) -> dict[str, Any]:
    return {"status": item.status, "contact": list(item.contact), "orders": urls.orders(item.id),
            "key": dict(item.jwk), "createdAt": timestamp(item.created_at)}


def order(urls: Urls, item: Order) -> dict[str, Any]:
    document: dict[str, Any] = {
        "status": item.status,
        "expires": timestamp(item.expires_at),
        "identifiers": [identifier_document(i) for i in item.identifiers],
        "authorizations": [urls.authz(a) for a in item.authorization_ids],
        "finalize": urls.finalize(item.id),
        "profile": item.profile,
    }
    if item.not_before is not None:
        document["notBefore"] = timestamp(item.not_before)
    if item.not_after is not None:
        document["notAfter"] = timestamp(item.not_after)
    if item.certificate_id is not None and item.status == "valid":
        document["certificate"] = urls.certificate(item.certificate_id)
    if item.error is not None:
        document["error"] = problem_document(item.error)
    if item.replaces:
        document["replaces"] = item.replaces
    return document


def challenge(urls: Urls, item: Challenge) -> dict[str, Any]:
    document: dict[str, Any] = {"type": item.type, "url": urls.challenge(item.id), "status": item.status,
                                "token": item.token}
    if item.validated_at is not None:
        document["validated"] = timestamp(item.validated_at)
    if item.error is not None:
        document["error"] = problem_document(item.error)
    return document


def authorization(urls: Urls, item: Authorization) -> dict[str, Any]:
    document: dict[str, Any] = {
        "identifier": identifier_document(item.identifier),
        "status": item.status,
        "expires": timestamp(item.expires_at),
        "challenges": [challenge(urls, c) for c in item.challenges],
    }
    if item.wildcard:
        document["wildcard"] = True
    return document


def renewal_info(item: RenewalInfo) -> dict[str, Any]:
    # RFC 9773's explanationURL is a URL; the core's explanation is a text for the operator, not sent
    return {"suggestedWindow": {"start": timestamp(item.start), "end": timestamp(item.end)}}


__all__ = ["account", "authorization", "challenge", "directory", "order", "renewal_info", "timestamp"]
