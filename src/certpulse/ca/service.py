"""The enrollment service: the CA core's roles, wired once per process.

This is the part trusted to sign. It knows nothing of HTTP: a front end calls a role with a
:class:`~certpulse.ca.model.Caller` and ``now``, and maps the typed result it gets back
(:mod:`certpulse.ca.results`), or the :class:`~certpulse.errors.Refusal` it raises, to its own
protocol. The roles, as in Boulder's split of a CA by what each part is trusted with:

* :attr:`~CAService.auth` (:mod:`.auth`): who is asking; the token exchange;
* :attr:`~CAService.requests` (:mod:`.requests`), the registration authority: submit, approve,
  deny, read requests;
* :attr:`~CAService.issuance` (:mod:`.issuance`), the CA: prepare, then sign and record;
* :attr:`~CAService.revocation` (:mod:`.revocation`): revoke, hold and release, status;
* :attr:`~CAService.crls` (:mod:`.crl`): each authority's CRL, made and kept current;
* :attr:`~CAService.policy` (:mod:`.cep`): the enrollment policy an agent reads;
* :attr:`~CAService.ocsp` (:mod:`.ocsp`): the OCSP responder's status answers, signed by the
  delegated signers (:mod:`.ocsp_signer`) and cached;
* :attr:`~CAService.ca_certificates` (:mod:`.ca_certificates`): the CA certificates relying
  parties fetch (AIA caIssuers);
* :attr:`~CAService.acme` (:mod:`.acme`): the ACME server's accounts, orders, authorizations and
  renewal information, bound to principals and finalized through the registration authority;
* :attr:`~CAService.audit` (:mod:`.audit`): the trail every decision and refusal is written to;

over one database (:mod:`.storage`) and one cached snapshot of the slow-changing state
(:mod:`.state`). Every decision is audited; an issuance is one transaction that records the
serial before the certificate is signed.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from certpulse.ca.acme.service import ACMEAuthority
from certpulse.ca.audit import AuditTrail
from certpulse.ca.auth import Authentication
from certpulse.ca.ca_certificates import CACertificates
from certpulse.ca.cep import EnrollmentPolicy
from certpulse.ca.config import ACMEConfig
from certpulse.ca.crl import CRLs
from certpulse.ca.issuance import CertificateAuthority
from certpulse.ca.ocsp import OCSPResponder
from certpulse.ca.publishing import DEFAULT_PUBLISHING, Publishing
from certpulse.ca.requests import RegistrationAuthority
from certpulse.ca.revocation import Revocation
from certpulse.ca.state import KeyRing, SnapshotCache
from certpulse.ca.stats import CAStats, current_stats, probe_database
from certpulse.ca.storage.statements import Statements


class CAService:
    def __init__(self, engine: Engine, keyring: KeyRing, *, policy_id: str, token_lifetime: dt.timedelta,
                 publishing: Publishing = DEFAULT_PUBLISHING, acme: ACMEConfig | None = None) -> None:
        self.engine = engine
        self.publishing = publishing  # ca.toml's public URL and CRL / OCSP periods
        self.keyring = keyring
        self.token_lifetime = token_lifetime  # of the one-time enrollment tokens the administration hands out
        self.state = SnapshotCache()
        statements = Statements(engine.dialect)
        self.audit = AuditTrail(engine, statements)
        self.auth = Authentication(engine, statements, self.audit)
        self.issuance = CertificateAuthority(keyring, statements, self.audit, self.state, publishing.public_url)
        self.requests = RegistrationAuthority(engine, statements, self.state, keyring, self.auth, self.issuance,
                                              self.audit)
        self.crls = CRLs(engine, keyring, self.state, publishing)
        self.revocation = Revocation(engine, self.audit, on_change=self.crls.after_change)
        self.policy = EnrollmentPolicy(engine, self.state, policy_id)
        self.ocsp = OCSPResponder(self)
        self.ca_certificates = CACertificates(engine, self.state)  # what AIA caIssuers URLs fetch
        self.acme = ACMEAuthority(self, acme or ACMEConfig())  # ca.toml [acme]

    def database_answers(self) -> bool:
        """Whether the database answers a read now (a readiness probe's question): one row of
        a small table, so that a database file or server that is gone is noticed, not only the
        connection pool."""
        try:
            probe_database(self.engine)
        except SQLAlchemyError:
            return False
        return True

    def stats(self, now: dt.datetime) -> CAStats:
        """The counts an operator watches (what ``/metrics`` exposes), read now."""
        return current_stats(self.engine, now)
