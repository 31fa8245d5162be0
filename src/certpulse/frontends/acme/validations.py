"""Running challenge validations: off the event loop, bounded, and never left unfinished.

A challenge POST makes the core mark the challenge ``processing`` and hand back a
:class:`~certpulse.ca.acme.model.ValidationJob`. The job runs here, in a small thread pool of
its own (:data:`VALIDATION_THREADS` per worker process), so that validations, which wait on
other hosts for up to ``[acme] validation_timeout``, never run in a handler thread. What
:mod:`certpulse.validation` finds goes back to the core (``record_validation``).

The challenge's answer waits for the job at most :data:`ANSWER_WAIT` seconds (RFC 8555 section
7.5.1 lets it carry the challenge as it is then): a validation of a host that answers at once
is usually recorded by then, so the client's first poll of the authorization finds it decided
instead of polling again and again. A slower host only delays that answer by the bound; the
client then polls as usual.

Whatever goes wrong in the validator (a bug, an exception it did not expect) is that challenge's
failure, recorded as an ACME ``connection`` problem with a plain sentence; recording itself is
retried a few times when the database does not answer. Nothing here answers a client.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from certpulse import clock, validation
from certpulse.ca.acme.model import Problem, ValidationJob, ValidationResult
from certpulse.ca.acme.service import ACMEAuthority
from certpulse.ca.config import ACMEConfig
from certpulse.errors import Reason
from certpulse.validation import ValidationSettings

log = logging.getLogger("certpulse.acme")

VALIDATION_THREADS = 8
ANSWER_WAIT = 1.0  # seconds a challenge's answer waits for its validation to be recorded
RECORD_ATTEMPTS = 5
RECORD_BACKOFF = 2.0  # seconds, doubled after each failed attempt

Validator = Callable[[ValidationJob, ACMEConfig], ValidationResult]


def validate_with_library(job: ValidationJob, config: ACMEConfig) -> ValidationResult:
    """Validate ``job`` with :mod:`certpulse.validation` under ``[acme]``'s ports, resolver and
    timeout; its outcome as the core's :class:`ValidationResult`."""
    outcome = validation.validate(job.type, job.identifier.type, job.identifier.value, job.token,
                                  job.key_authorization, ValidationSettings.from_config(config))
    if outcome.valid:
        return ValidationResult(valid=True, record=outcome.record)
    problem = Problem(Reason.VALIDATION_FAILED, outcome.detail or "the challenge was not met",
                      identifier=job.identifier, acme_type=outcome.error or "connection")
    return ValidationResult(valid=False, problem=problem, record=outcome.record)


def failed(detail: str, acme_type: str = "connection") -> ValidationResult:
    return ValidationResult(valid=False, problem=Problem(Reason.VALIDATION_FAILED, detail, acme_type=acme_type))


class ValidationRunner:
    """A worker's validations in progress, in at most :data:`VALIDATION_THREADS` threads."""

    def __init__(self, acme: ACMEAuthority, validator: Validator = validate_with_library,
                 threads: int = VALIDATION_THREADS) -> None:
        self.acme = acme
        self.validator = validator
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._threads = threads
        self._lock = threading.Lock()

    def start(self, job: ValidationJob) -> concurrent.futures.Future[bool]:
        """Run ``job`` in the background (callable from any thread); done when its outcome is
        recorded (True) or could not be (False)."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._threads,
                                                                   thread_name_prefix="acme-validation")
            pool = self._pool
        return pool.submit(self.run, job)

    @staticmethod
    def recorded(running: concurrent.futures.Future[bool], wait: float = ANSWER_WAIT) -> bool:
        """Whether ``running``'s outcome was recorded within ``wait`` seconds."""
        try:
            return running.result(timeout=wait)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return False

    def run(self, job: ValidationJob) -> bool:
        try:
            result = self.validator(job, self.acme.config)
        except Exception as exc:
            log.exception("validating challenge %d failed unexpectedly", job.challenge_id)
            result = failed(f"the {job.type} challenge could not be validated ({type(exc).__name__})")
        delay = RECORD_BACKOFF
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                self.acme.record_validation(job, result, clock.now())
                return True
            except Exception:
                if attempt == RECORD_ATTEMPTS:
                    log.exception("could not record the validation of challenge %d", job.challenge_id)
                    return False
                log.warning("could not record the validation of challenge %d; retrying in %.0f s",
                            job.challenge_id, delay)
                time.sleep(delay)
                delay *= 2
        return False

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["ANSWER_WAIT", "VALIDATION_THREADS", "ValidationRunner", "Validator", "failed", "validate_with_library"]
