"""Real nginx and haproxy for rebind tests: children of the test on loopback high ports, each with
its own configuration, pid file and sockets in a test folder, stopped by their own PID.

Debian's packages provide them (``scripts/system-packages``, which ``make test`` runs)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from certpulse.rebind.deployers import Material
from certpulse.rebind.probe import probe
from pki_factory import self_signed
from support import free_port

HINT = "run scripts/system-packages (make test does) to install nginx and haproxy"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def served(port: int) -> str | None:
    """The SHA-1 thumbprint of what 127.0.0.1:port serves, or None when nothing answers TLS."""
    return probe("127.0.0.1", port, timeout=2.0).thumbprint


class TlsServer:
    """A stdlib TLS server in a thread. Connection ``n`` (counted from 0) is served
    ``materials[pick(n)]``: one certificate by default, or a graceful reload handing over from one
    to another (old and new workers both accepting for a moment). Records the SNI names asked for."""

    def __init__(self, folder: Path, *materials: Material, pick: Callable[[int], int] = lambda _n: 0) -> None:
        self.names: list[str | None] = []
        self.contexts = []
        for index, material in enumerate(materials):
            chain, key = folder / f"tls-{index}.pem", folder / f"tls-{index}.key"
            chain.write_bytes(material.fullchain_pem)
            key.write_bytes(material.key_pem)
            key.chmod(0o600)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(chain, key)
            context.sni_callback = lambda _sock, name, _ctx: self.names.append(name)
            self.contexts.append(context)
        self.pick = pick
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            context = self.contexts[self.pick(self.connections)]
            self.connections += 1
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def write_placeholder(cert_path: Path, key_path: Path) -> str:
    """A self-signed certificate of no CA, for a server to start with; its thumbprint."""
    placeholder = self_signed("placeholder", days=1)
    cert_path.write_text(placeholder.pem)
    key_path.write_bytes(placeholder.key_pem)
    key_path.chmod(0o600)
    return placeholder.thumbprint


class Nginx:
    """A real nginx (master and one worker) serving ``site.crt``/``site.key`` on a loopback port."""

    def __init__(self, folder: Path) -> None:
        assert NGINX is not None, f"nginx is not installed: {HINT}"
        self.folder = folder
        self.port = free_port()
        self.conf = folder / "nginx.conf"
        self.cert_file = folder / "site.crt"  # leaf and chain
        self.key_file = folder / "site.key"
        self.extra = folder / "extra.conf"
        self.extra.write_text("# included by nginx.conf\n")
        temp = "\n".join(f"    {name}_temp_path {folder}/{name};" for name in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(f"""
pid {folder}/nginx.pid;
error_log {folder}/error.log;
daemon off;
master_process on;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    include {self.extra};
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {folder}/site.crt;
        ssl_certificate_key {folder}/site.key;
        return 200 "ok\\n";
    }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert NGINX is not None
        self.proc = subprocess.Popen([NGINX, "-c", str(self.conf), "-e", str(self.folder / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: served(self.port) is not None or self.proc is None or self.proc.poll() is not None,
                   10, "nginx to listen")
        assert self.proc.poll() is None, (self.proc.stderr.read() if self.proc.stderr else b"").decode()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers, then exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Haproxy:
    """A real haproxy in the foreground, TLS on a loopback port, runtime API on a unix socket."""

    def __init__(self, folder: Path) -> None:
        assert HAPROXY is not None, f"haproxy is not installed: {HINT}"
        self.folder = folder
        self.port = free_port()
        self.pem = folder / "site.pem"
        self.socket = folder / "admin.sock"
        self.cfg = folder / "haproxy.cfg"
        self.cfg.write_text(f"""
global
    stats socket {self.socket} level admin
defaults
    mode tcp
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend tls
    bind 127.0.0.1:{self.port} ssl crt {self.pem}
    default_backend nowhere
backend nowhere
    server none 127.0.0.1:9
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert HAPROXY is not None
        self.proc = subprocess.Popen([HAPROXY, "-f", str(self.cfg), "-db"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_until(lambda: (served(self.port) is not None and self.socket.exists())
                   or self.proc is None or self.proc.poll() is not None, 10, "haproxy to listen")
        assert self.proc.poll() is None, (self.proc.stderr.read() if self.proc.stderr else b"").decode()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
