"""http-01 (RFC 8555 section 8.3): fetch the key authorization the client serves over plain HTTP.

The request goes to each address of the name in turn (the A records, then the AAAA; for an IP
identifier the address itself) until one accepts the connection, at most one address of each
family, as ``GET http://<address>:<http01_port>/.well-known/acme-challenge/<token>`` with
``Host: <name>``. What that server answers is the result; another address is not asked.

Redirects are not followed: a 3xx is a failure (``unauthorized``, with the status and where it
pointed). RFC 8555 lets a server follow them, but the clients this CA serves answer the
challenge themselves (standalone servers, webroots behind a plain HTTP listener), and not
following them keeps validation from being steered to another host, port or scheme.

The body is read raw (``Accept-Encoding: identity``; a compressed answer is not inflated, so a
small answer cannot grow into a large one) and at most :data:`BODY_LIMIT` bytes of it: a bigger
body is ``incorrectResponse``. The body, with trailing whitespace removed, must equal the key
authorization exactly.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl

import httpx

from certpulse.validation.outcome import (
    CONNECTION,
    INCORRECT_RESPONSE,
    UNAUTHORIZED,
    Budget,
    Outcome,
    excerpt,
    failed,
    passed,
)

BODY_LIMIT = 8192  # a key authorization is about 90 bytes; anything past 8 KiB is not one
USER_AGENT = "certpulse-acme-validation"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def one_per_family(addresses: list[str]) -> list[str]:
    """The addresses to try, in order: the first IPv4 one, then the first IPv6 one."""
    chosen: list[str] = []
    for version in (4, 6):
        for address in addresses:
            if ipaddress.ip_address(address).version == version:
                chosen.append(address)
                break
    return chosen


def fetch(host_header: str, addresses: list[str], token: str, key_authorization: str, port: int,
          budget: Budget, record: dict[str, object]) -> Outcome:
    """Ask the addresses in turn for the key authorization; ``record`` is filled in as we go."""
    path = f"/.well-known/acme-challenge/{token}"
    record["url"] = f"http://{host_header}:{port}{path}" if port != 80 else f"http://{host_header}{path}"
    record["port"] = port
    last: Outcome | None = None
    for address in one_per_family(addresses):
        record["address_used"] = address
        try:
            return _fetch_one(host_header, address, path, key_authorization, port, budget, record)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = failed(CONNECTION, f"could not connect to {_url_host(address)}:{port} for {host_header}: "
                                      f"{_reason(exc)}", record)
    assert last is not None, "the caller passes at least one address"
    return last


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({text})"
    return text


def _fetch_one(host_header: str, address: str, path: str, key_authorization: str, port: int,
               budget: Budget, record: dict[str, object]) -> Outcome:
    url = f"http://{_url_host(address)}:{port}{path}"
    headers = {"Host": host_header, "User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
    # trust_env=False: no proxy from the environment; validation connects to the name itself.
    # verify: one TLS context for every client (never used: only plain http is fetched, redirects
    # are not followed), as loading a CA bundle per client costs more than a whole validation.
    with httpx.Client(trust_env=False, verify=_tls_context(), follow_redirects=False,
                      timeout=httpx.Timeout(budget.remaining())) as client:
        try:
            with client.stream("GET", url, headers=headers) as response:
                return _judge(response, host_header, key_authorization, budget, record)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise
        except httpx.TimeoutException as exc:
            return failed(CONNECTION, f"fetching {record['url']} from {url_host_port(address, port)} "
                                      f"{_reason(exc)}", record)
        except httpx.HTTPError as exc:
            return failed(CONNECTION, f"fetching {record['url']} from {url_host_port(address, port)} failed: "
                                      f"{_reason(exc)}", record)


def url_host_port(address: str, port: int) -> str:
    return f"{_url_host(address)}:{port}"


def _judge(response: httpx.Response, host_header: str, key_authorization: str, budget: Budget,
           record: dict[str, object]) -> Outcome:
    record["status"] = response.status_code
    if response.is_redirect:
        location = response.headers.get("location", "")
        return failed(UNAUTHORIZED, f"{record['url']} answered {response.status_code} redirecting to "
                                    f"{excerpt(location, 80)}; redirects are not followed", record)
    if response.status_code != 200:
        return failed(UNAUTHORIZED, f"{record['url']} answered {response.status_code}, not 200", record)
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > BODY_LIMIT:
            return failed(INCORRECT_RESPONSE, f"{record['url']} answered more than {BODY_LIMIT} bytes; "
                                              "a key authorization is far shorter", record)
        budget.remaining()
    answered = bytes(body).rstrip(b" \t\r\n")
    if answered != key_authorization.encode("ascii"):
        return failed(INCORRECT_RESPONSE, f"{record['url']} answered {excerpt(answered)} ({len(answered)} bytes), "
                                          "not the key authorization of this challenge", record)
    return passed(f"{record['url']} answered the key authorization", record)
