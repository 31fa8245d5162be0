"""Faults of this machine (its disk, its files, its database) in plain words.

Anything the pulse does locally can fail: a full disk, a file made unreadable, a damaged
``meta.db``. Such an error must end neither the pulse nor the daemon and must not pass silently:
it becomes a failed action or a failed pulse whose cause an operator can read and act on, and a
short stable ``cause`` that the failing state, event 1100 and the ``certpulse_renewal_failing``
metric carry. This module turns the exception into those two; it decides nothing else.
"""

from __future__ import annotations

import errno
import sqlite3

from sqlalchemy.exc import SQLAlchemyError

from certpulse.errors import CertpulseError, Reason, Refusal
from certpulse.machine.live_repair import os_reason

# What a local step may raise: the operating system, a file that does not parse, the database.
LOCAL_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SQLAlchemyError, sqlite3.Error)
# The causes of local faults (the failing state's values; the metric's ``cause`` label): entries
# with these causes are cleared by the first whole pulse that no longer sees them.
LOCAL_CAUSES = frozenset({
    "disk-full", "permission-denied", "file-error", "unreadable-file", "store-database",
    "certificate-unreadable", "certificate-unrepairable", "key-unreadable",
})
# Where a pulse-level local fault is counted in the failing state (certificates and templates
# use their thumbprint and ``template:NAME``).
PULSE_KEY = "pulse"


def store_unreachable(exc: Refusal) -> bool:
    """A refusal that says the store's database cannot be opened (:func:`certpulse.sql.db.migrate`):
    a local fault like the others, though it comes as a refusal."""
    return exc.reason is Reason.STORE


class PulseNotRecorded(CertpulseError):
    """The pulse ended and its outcome could not be written to the store: said on standard error
    (or in the daemon's log) since nothing else can say it."""


def _sql_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip() or type(exc).__name__


def describe(exc: BaseException, store_root: object) -> tuple[str, str]:
    """(cause, sentence) for a local error met while the pulse worked on the store at ``store_root``."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}" if exc.filename else f"a file under {store_root}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk-full", (f"the disk is full: {where} cannot be written ({os_reason(exc)}); "
                                 f"free space on the file system of {store_root}")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "permission-denied", (f"{where} cannot be written or read: {os_reason(exc)}; check its owner "
                                         "and mode, and that its file system is writable")
        return "file-error", f"{where}: {os_reason(exc)}; run `certpulse agent status`"
    if isinstance(exc, Refusal) and exc.detail.startswith("the store's database"):
        # The store's own refusal (machine.recovery: lost or damaged): already a sentence naming
        # meta.db and the command that repairs it.
        return "store-database", exc.detail
    if isinstance(exc, SQLAlchemyError | sqlite3.Error | Refusal):
        why = exc.detail if isinstance(exc, Refusal) else _sql_reason(exc)
        if "full" in why:
            return "disk-full", (f"the disk is full: the store's database {store_root}/meta.db cannot be written "
                                 f"({why}); free space on the file system of {store_root}")
        return "store-database", (f"the store's database {store_root}/meta.db cannot be read or written: {why}; "
                                  "check that its disk is not full or failing and the file's permissions, "
                                  "or restore it")
    return "unreadable-file", (f"a file of the store under {store_root} cannot be read: {exc}; "
                               "run `certpulse agent status`")
