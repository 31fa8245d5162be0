"""The ACME server's core (RFC 8555, RFC 9773 renewal information): accounts bound to principals,
orders, authorizations and challenges, finalization through the registration authority.

No HTTP here and no network I/O: the front end (:mod:`certpulse.frontends.acme`) verifies each
JWS (:mod:`certpulse.pki.jose`), spends its nonce, calls these roles with verified values and
``now``, and maps the typed results (:mod:`.model`) or the :class:`~certpulse.errors.Refusal` it
gets to ACME's JSON objects and problem documents. Challenge validation, which connects to the
names being validated, is done by :mod:`certpulse.validation`, run by the front end; its outcome
comes back here (:meth:`.service.ACMEAuthority.record_validation`).
"""
