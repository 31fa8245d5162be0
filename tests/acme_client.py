"""A minimal ACME client for tests (RFC 8555 over httpx, JWS by joserfc).

Enough to drive every operation of certpulse's ACME server and to send what a real client never
would (a replayed nonce, a wrong ``url``, a body signed by another key), so that tests can check
each refusal. Keys: ES256 (P-256), RS256 (RSA 2048) and EdDSA (Ed25519). Nothing here checks the
server's answers beyond keeping the nonce each one carries; the tests assert.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

JOSE = "application/jose+json"
ERROR = "urn:ietf:params:acme:error:"
_REGISTRY = jws.JWSRegistry(
    header_registry={"nonce": HeaderParameter("nonce", "str"), "url": HeaderParameter("url", "str")},
    algorithms=["RS256", "ES256", "ES384", "EdDSA", "HS256"],
)
AccountKey = ECKey | RSAKey | OKPKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_account_key(alg: str = "ES256") -> tuple[AccountKey, str]:
    """A fresh account key and the JWS algorithm it signs with."""
    if alg == "ES256":
        return ECKey.generate_key("P-256"), alg
    if alg == "RS256":
        return RSAKey.generate_key(2048), alg
    if alg == "EdDSA":
        return OKPKey.generate_key("Ed25519"), alg
    raise ValueError(alg)


def public_jwk(key: AccountKey) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


def thumbprint(key: AccountKey) -> str:
    return str(key.thumbprint())


def sign(protected: Mapping[str, Any], payload: bytes, key: AccountKey | OctKey) -> dict[str, str]:
    """A flattened JWS of ``payload`` under ``protected``, signed by ``key``."""
    return dict(jws.serialize_json({"protected": dict(protected)}, payload, key, registry=_REGISTRY))


def encode_payload(payload: Any) -> bytes:
    """``None``: a POST-as-GET (empty payload); bytes as they are; anything else as JSON."""
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload).encode()


def problem_type(response: httpx.Response) -> str:
    """The ACME error name of a problem answer ("" when it is not one)."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return ""
    kind = str(response.json().get("type", ""))
    return kind.removeprefix(ERROR) if kind.startswith(ERROR) else kind


class ACMEClient:
    """One account key talking to one ACME server (``directory``: its directory URL)."""

    def __init__(self, directory: str, alg: str = "ES256", *, http: httpx.Client | None = None) -> None:
        self.http = http or httpx.Client(timeout=60, trust_env=False)
        self.directory_url = directory
        self.key, self.alg = new_account_key(alg)
        self.account_url: str | None = None
        self._nonce: str | None = None
        self._directory: dict[str, Any] | None = None

    # -- plumbing --------------------------------------------------------------------------

    @property
    def directory(self) -> dict[str, Any]:
        if self._directory is None:
            response = self.http.get(self.directory_url)
            assert response.status_code == 200, response.text
            self._directory = response.json()
            self._keep_nonce(response)
        return self._directory

    def url(self, name: str) -> str:
        return str(self.directory[name])

    def _keep_nonce(self, response: httpx.Response) -> None:
        nonce = response.headers.get("replay-nonce")
        if nonce:
            self._nonce = nonce

    def fresh_nonce(self) -> str:
        response = self.http.head(self.url("newNonce"))
        assert response.status_code == 200, response.text
        return str(response.headers["replay-nonce"])

    def nonce(self) -> str:
        nonce, self._nonce = self._nonce, None
        return nonce or self.fresh_nonce()

    def protected(self, url: str, *, key: AccountKey | None = None, use_jwk: bool = False,
                  nonce: str | None = None, **extra: Any) -> dict[str, Any]:
        key = key or self.key
        header: dict[str, Any] = {"alg": self.alg if key is self.key else alg_of(key), "nonce": nonce or self.nonce(),
                                  "url": url}
        if use_jwk or self.account_url is None:
            header["jwk"] = public_jwk(key)
        else:
            header["kid"] = self.account_url
        header.update(extra)
        return header

    def body(self, url: str, payload: Any, *, key: AccountKey | None = None, use_jwk: bool = False,
             nonce: str | None = None, **extra: Any) -> dict[str, str]:
        header = self.protected(url, key=key, use_jwk=use_jwk, nonce=nonce, **extra)
        return sign(header, encode_payload(payload), key or self.key)

    def send(self, url: str, body: Any, *, content_type: str = JOSE) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.http.post(url, content=data, headers={"content-type": content_type})
        self._keep_nonce(response)
        return response

    def post(self, url: str, payload: Any = None, *, key: AccountKey | None = None, use_jwk: bool = False,
             retry_bad_nonce: bool = True, **extra: Any) -> httpx.Response:
        """A signed POST (``payload`` None: POST-as-GET); once more with a fresh nonce after a
        ``badNonce``, as RFC 8555 section 6.5 tells clients to."""
        response = self.send(url, self.body(url, payload, key=key, use_jwk=use_jwk, **extra))
        if retry_bad_nonce and problem_type(response) == "badNonce":
            response = self.send(url, self.body(url, payload, key=key, use_jwk=use_jwk, **extra))
        return response

    # -- operations ------------------------------------------------------------------------

    def eab(self, kid: str, hmac_key: str) -> dict[str, str]:
        """The externalAccountBinding of this key: the account JWK MACed with the EAB key."""
        raw = base64.urlsafe_b64decode(hmac_key + "=" * (-len(hmac_key) % 4))
        header = {"alg": "HS256", "kid": kid, "url": self.url("newAccount")}
        return sign(header, json.dumps(public_jwk(self.key)).encode(), OctKey.import_key(raw))

    def new_account(self, *, eab: tuple[str, str] | None = None, contact: list[str] | None = None,
                    terms: bool = True, only_existing: bool = False) -> httpx.Response:
        payload: dict[str, Any] = {"termsOfServiceAgreed": terms}
        if contact is not None:
            payload["contact"] = contact
        if only_existing:
            payload["onlyReturnExisting"] = True
        if eab is not None:
            payload["externalAccountBinding"] = self.eab(*eab)
        response = self.post(self.url("newAccount"), payload, use_jwk=True)
        if response.status_code in (200, 201):
            self.account_url = response.headers["location"]
        return response

    def new_order(self, names: list[str], **extra: Any) -> httpx.Response:
        identifiers = [{"type": "dns", "value": name} for name in names]
        return self.post(self.url("newOrder"), {"identifiers": identifiers, **extra})

    def get(self, url: str) -> httpx.Response:
        return self.post(url, None)

    def poll(self, url: str, done: tuple[str, ...], within: float = 60) -> dict[str, Any]:
        """POST-as-GET ``url`` until its status is one of ``done`` (bounded: ``within`` seconds)."""
        deadline = time.monotonic() + within
        while True:
            response = self.get(url)
            assert response.status_code == 200, response.text
            document: dict[str, Any] = response.json()
            if document["status"] in done:
                return document
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} still {document['status']} after {within} s: {document}")
            time.sleep(0.2)

    def key_authorization(self, token: str) -> str:
        return f"{token}.{thumbprint(self.key)}"

    def finalize(self, order: Mapping[str, Any], csr_der: bytes) -> httpx.Response:
        return self.post(order["finalize"], {"csr": b64(csr_der)})

    def key_change(self, new_key: AccountKey) -> httpx.Response:
        url = self.url("keyChange")
        assert self.account_url is not None
        inner = sign({"alg": alg_of(new_key), "jwk": public_jwk(new_key), "url": url},
                     json.dumps({"account": self.account_url, "oldKey": public_jwk(self.key)}).encode(), new_key)
        response = self.post(url, inner)
        if response.status_code == 200:
            self.key, self.alg = new_key, alg_of(new_key)
        return response

    def revoke(self, certificate_der: bytes, reason: int | None = None, *,
               certificate_key: AccountKey | None = None) -> httpx.Response:
        payload: dict[str, Any] = {"certificate": b64(certificate_der)}
        if reason is not None:
            payload["reason"] = reason
        if certificate_key is not None:
            return self.post(self.url("revokeCert"), payload, key=certificate_key, use_jwk=True)
        return self.post(self.url("revokeCert"), payload)


def alg_of(key: AccountKey) -> str:
    if isinstance(key, ECKey):
        return "ES256"
    if isinstance(key, RSAKey):
        return "RS256"
    return "EdDSA"


def jwk_key_of_private(private_pem: bytes) -> AccountKey:
    """A certificate's private key (PEM) as a JWS signing key (revocation by the certificate key)."""
    key = ECKey.import_key(private_pem)
    assert isinstance(key, ECKey)
    return key


def csr_for(names: list[str]) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a DER CSR for ``names`` (subjectAltName, CN the first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.DER)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_id(certificate: x509.Certificate) -> str:
    """RFC 9773's certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial DER)."""
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    serial = certificate.serial_number
    raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER content: a leading 0 if needed
    return f"{b64(aki)}.{b64(raw)}"


class ChallengeServer:
    """A tiny HTTP server on loopback answering http-01 challenges it was given."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: dict[str, str] = {}
        self.requests: list[str] = []
        # tokens whose answer waits until the test sets the event (a validation kept in progress)
        self.held: dict[str, threading.Event] = {}
        answers, seen, held = self.answers, self.requests, self.held

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                token = self.path.removeprefix("/.well-known/acme-challenge/")
                if token in held:
                    held[token].wait(60)
                body = answers.get(token)
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ChallengeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def challenge_server(port: int) -> Iterator[ChallengeServer]:
    with ChallengeServer(port) as server:
        yield server


def sha256_b64(data: bytes) -> str:
    return b64(hashlib.sha256(data).digest())


def configure_acme(ca_dir: Any, **settings: Any) -> None:
    """Write ``settings`` into the CA's ``[acme]`` table (ca.toml), keeping the rest."""
    import dataclasses
    from pathlib import Path

    from certpulse.ca.config import CADir

    folder = CADir(Path(ca_dir))
    config = folder.load()
    folder.save(dataclasses.replace(config, acme=dataclasses.replace(config.acme, **settings)))


def eab_for(ca: Any, principal: str) -> tuple[str, str]:
    """A fresh external account binding (kid, hmac_key) for ``principal``, from the real CLI."""
    result = json.loads(ca.cli("principal", "acme-eab", principal, "--json").stdout)
    return str(result["kid"]), str(result["hmac_key"])
