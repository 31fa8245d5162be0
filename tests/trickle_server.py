"""A loopback server that answers as slowly as it can: run as its own process by the deadline tests.

``python trickle_server.py MODE PORT_FILE``: listens on a free loopback port (written to
PORT_FILE), and for every connection
* ``headers``: sends a status line, then one byte of a header every 0.2 s, forever;
* ``body``: sends whole headers with a large Content-Length, then one byte of body every 0.2 s;
* ``silent``: accepts and sends nothing (a TLS handshake that never completes).
It reads nothing it does not need and never closes first.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path


def trickle(conn: socket.socket, mode: str) -> None:
    try:
        conn.settimeout(300)
        if mode == "silent":
            time.sleep(300)
            return
        conn.recv(65536)  # the request (enough of it)
        if mode == "headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while True:
                conn.sendall(b"x")
                time.sleep(0.2)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
        while True:
            conn.sendall(b" ")
            time.sleep(0.2)
    except OSError:
        return
    finally:
        conn.close()


def main() -> None:
    mode, port_file = sys.argv[1], Path(sys.argv[2])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port_file.write_text(str(listener.getsockname()[1]))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=trickle, args=(conn, mode), daemon=True).start()


if __name__ == "__main__":
    main()
