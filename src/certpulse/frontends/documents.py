"""The native API's JSON documents of the CA core's results: field names and formats, in one place.

The HTTP API (:func:`certpulse.frontends.http.answer`, which adds the status codes) and the
CLI's ``--json`` output both print these, so a field is named once. Each document holds every
field, ``None`` included; the HTTP routes whose documented answers leave out empty fields drop
them there. Times are ISO 8601 with their UTC offset; certificates are PEM. Imports no HTTP
framework, so the CLI can use it without loading one.
"""

from __future__ import annotations

from typing import Any

from certpulse.ca import results

Document = dict[str, Any]


def without_none(document: Document) -> Document:
    return {key: value for key, value in document.items() if value is not None}


def issued(result: results.Issued) -> Document:
    return {"id": result.request_id, "status": "issued", "serial": result.serial, "thumbprint": result.thumbprint,
            "certificate": result.certificate, "chain": list(result.chain)}


def pending(result: results.Pending) -> Document:
    return {"id": result.request_id, "status": "pending"}


def request(result: results.RequestSummary) -> Document:
    """A request, with its certificate's fields once issued (where the operation read them)."""
    document: Document = {
        "id": result.request_id, "status": result.status, "template": result.template, "kind": result.kind,
        "requester": result.requester, "subject": result.subject, "names": list(result.names),
        "created_at": result.created_at.isoformat(),
        "decided_at": result.decided_at.isoformat() if result.decided_at else None,
        "decided_by": result.decided_by, "reason": result.reason,
    }
    if result.issued is not None:
        document.update(serial=result.issued.serial, thumbprint=result.issued.thumbprint,
                        certificate=result.issued.certificate, chain=list(result.issued.chain))
    return document


def denied(result: results.Denied) -> Document:
    return {"id": result.request_id, "status": "denied", "reason": result.reason}


def revoked(result: results.Revoked) -> Document:
    return {"serial": result.serial, "status": "revoked", "reason": result.reason,
            "revoked_at": result.revoked_at.isoformat()}


def unrevoked(result: results.Unrevoked) -> Document:
    return {"serial": result.serial, "status": "good", "released_at": result.released_at.isoformat(),
            "held_since": result.held_since.isoformat()}


def certificate_status(result: results.CertificateStatus) -> Document:
    return {
        "serial": result.serial, "issuer": result.issuer, "status": result.status,
        "template": result.template, "subject": result.subject,
        "not_before": result.not_before.isoformat(), "not_after": result.not_after.isoformat(),
        "revoked_at": result.revoked_at.isoformat() if result.revoked_at else None,
        "revocation_reason": result.revocation_reason, "thumbprint": result.thumbprint,
    }


def serial_status(result: results.SerialStatus) -> Document:
    return {
        "serial": result.serial, "issuer": result.issuer, "status": result.status,
        "revoked_at": result.revoked_at.isoformat() if result.revoked_at else None,
        "revocation_reason": result.revocation_reason,
        "not_after": result.not_after.isoformat() if result.not_after else None,
    }


def status_list(result: results.StatusList) -> Document:
    """The batch status answer; ``next`` is the cursor of the next page of the caller's own
    certificates (present only when there is one)."""
    document: Document = {"certificates": [serial_status(s) for s in result.certificates]}
    if result.next_cursor is not None:
        document["next"] = result.next_cursor
    return document


def credential(result: results.Credential) -> Document:
    return {"principal": result.principal, "kind": result.kind, "credential": result.credential}


def audit_entry(entry: results.AuditEntry) -> Document:
    return {
        "id": entry.entry_id, "at": entry.at.isoformat(), "actor": entry.actor, "action": entry.action,
        "template": entry.template, "request_id": entry.request_id, "serial": entry.serial,
        "names": list(entry.names), "reason": entry.reason, "detail": entry.detail,
    }


def template_policy(offer: results.TemplateOffer) -> Document:
    """What an agent needs to know about a template (the seed's CEP template attributes)."""
    template = offer.template
    return {
        "name": template.name,
        "display_name": template.display_name,
        "oid": template.oid,
        "schema_version": template.schema_version,
        "major_version": template.major_version,
        "minor_version": template.minor_version,
        "validity_seconds": int(template.validity.total_seconds()),
        "renewal_period_seconds": int(template.renewal_period.total_seconds()),
        "purpose": template.purpose,
        "key": {"types": list(template.key_types), "default": template.default_key_type,
                "archive": template.archive_private_key},
        "key_usage": list(template.key_usage),
        "ekus": list(template.ekus),
        "subject_source": template.subject_source,
        "renewal_subject_from_existing": template.renewal_subject_from_existing,
        "manager_approval": template.manager_approval,
        "ra_signatures": template.ra_signatures,
        "ra_policy": template.ra_policy,
        "supersedes": list(template.supersedes),
        "old_certificate": template.old_certificate,
        "user_interaction": template.user_interaction,
        "check_directory": template.check_directory,
        "rights": sorted(offer.rights),
    }


def policy(result: results.PolicyDocument) -> Document:
    return {
        "policy_id": result.policy_id,
        "generated_at": result.generated_at.isoformat(),
        "refresh_after_seconds": result.refresh_after_seconds,
        "templates": [template_policy(offer) for offer in result.templates],
        "issuers": [
            {"name": i.name, "certificate": i.certificate, "cost": i.cost, "renewal_only": i.renewal_only,
             "templates": list(i.templates), "thumbprint": i.thumbprint}
            for i in result.issuers
        ],
        "roots": list(result.roots),
        "cross_certificates": list(result.cross_certificates),
        "intermediates": list(result.intermediates),
        "kra": list(result.kra),
        "directory": [
            {"template": c.template, "serial": c.serial, "thumbprint": c.thumbprint,
             "not_after": c.not_after.isoformat()}
            for c in result.directory
        ],
    }
