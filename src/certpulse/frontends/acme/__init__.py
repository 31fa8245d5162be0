"""The ACME server's HTTP front end (RFC 8555; RFC 9773 renewal information) under ``/acme/``.

Between HTTP and the ACME core (``service.acme``, :mod:`certpulse.ca.acme`): the routes
(:mod:`.routes`, plain ASGI: one handler-thread trip per request), the JWS checks every POST
goes through (:mod:`.signed`), the operations (:mod:`.operations`), the JSON resources
(:mod:`.resources`), problem documents (:mod:`.errors`), payload fields (:mod:`.payloads`), URLs
(:mod:`.urls`), challenge validation off the event loop (:mod:`.validations`) and the routes'
entries in ``/openapi.json`` (:mod:`.openapi`: documented as JOSE requests; the payloads are
RFC 8555's). Nonces are the core's (:mod:`certpulse.ca.acme.nonces`): stateless, spent once
across all worker processes.
"""

from certpulse.frontends.acme.openapi import add_acme_paths
from certpulse.frontends.acme.routes import ACMERoutes

__all__ = ["ACMERoutes", "add_acme_paths"]
