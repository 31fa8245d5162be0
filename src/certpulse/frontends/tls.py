"""TLS for the workers of ``ca serve``: a server certificate that can change under a running
worker, served on the next handshake without a restart.

uvicorn builds each worker's ``ssl.SSLContext`` from its ``ssl_context_factory``;
:class:`ReloadingTLS` is that factory (a plain object with two paths, so it pickles to worker
processes). The context it returns does no serving of its own: its SNI callback, which OpenSSL
calls on every ClientHello (with or without a server name), hands the connection to the context
that holds the newest chain. Whether the chain file changed is checked at most once every
``check_every`` seconds (one ``stat``); a changed file is loaded into a fresh context, and only
a chain and key that load together replace the one in use, so a half-written renewal never
breaks the handshakes of a running server.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("certpulse.serve")

_FileState = tuple[int, int, int]  # inode, size, mtime (ns): any change means a new file


class ReloadingTLS:
    """uvicorn's ``ssl_context_factory``: a server context whose chain follows the files."""

    def __init__(self, cert_file: Path, key_file: Path, check_every: float = 1.0) -> None:
        self.cert_file, self.key_file, self.check_every = cert_file, key_file, check_every
        self._current: ssl.SSLContext | None = None
        self._loaded: _FileState | None = None
        self._checked = 0.0

    def __getstate__(self) -> dict[str, Any]:
        """Only the settings travel to a worker process; each worker loads the files itself."""
        return {"cert_file": self.cert_file, "key_file": self.key_file, "check_every": self.check_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cert_file"], state["key_file"], state["check_every"])  # type: ignore[misc]

    def __call__(self, config: object = None, default: Callable[[], ssl.SSLContext] | None = None) -> ssl.SSLContext:
        """The context uvicorn listens with. The chain must load now: a server that cannot serve
        its certificate must not start."""
        self._current, self._loaded = self._load()
        self._checked = time.monotonic()
        front = self._current_settings()
        front.load_cert_chain(self.cert_file, self.key_file)  # answers if a client skips the callback
        front.sni_callback = self._on_client_hello
        return front

    def serving(self) -> ssl.SSLContext | None:
        """The context new handshakes get (after a check, if one is due)."""
        self._refresh()
        return self._current

    def _on_client_hello(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                         context: ssl.SSLContext) -> int | None:
        try:
            current = self.serving()
            if current is not None:
                connection.context = current
        except Exception:  # never fail a handshake over a reload: the old chain stays
            log.exception("switching to the current TLS certificate failed")
        return None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return
        self._checked = now
        try:
            if _file_state(self.cert_file) == self._loaded:
                return
            self._current, self._loaded = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("the TLS certificate in %s did not load (still serving the previous one): %s",
                        self.cert_file, exc)

    def _load(self) -> tuple[ssl.SSLContext, _FileState]:
        state = _file_state(self.cert_file)
        context = self._current_settings()
        context.load_cert_chain(self.cert_file, self.key_file)
        return context, state

    @staticmethod
    def _current_settings() -> ssl.SSLContext:
        """A server context: TLS 1.2 or later, OpenSSL's default ciphers, no client certificates
        asked for (clients authenticate with bearer credentials)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _file_state(path: Path) -> _FileState:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns
