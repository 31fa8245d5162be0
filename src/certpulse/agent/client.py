"""The agent's HTTP client for the enrollment service. Every answer is hostile until checked.

Bodies are read up to a cap, must be JSON objects of the expected shape, and nothing from
them is ever used as a path or passed to a shell. Failures are split in two: the server is
unavailable (connection errors, 5xx, 429/503 with ``Retry-After``: try another issuer or
later) or it refused (a 4xx problem with a reason: do not retry the same request).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import httpx

MAX_BODY = 4 * 1024 * 1024
MAX_RETRY_AFTER = 24 * 3600


class ServerUnavailable(Exception):
    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class ServerRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class RequestAnswer:
    status: str  # issued | pending | denied | failed
    request_id: int
    certificate: str | None = None
    chain: tuple[str, ...] = ()
    reason: str | None = None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    if value.strip().isdigit():
        return float(min(int(value.strip()), MAX_RETRY_AFTER))
    return None


def _short(value: Any, limit: int = 300) -> str:
    return " ".join(str(value).split())[:limit]


class CAClient:
    """One policy server. ``transport`` is httpx's seam: None for the network, or a transport of
    the caller's (an ``httpx.MockTransport`` in tests that play a hostile CA in-process)."""

    def __init__(self, url: str, credential: str | None, *, verify: Any = True, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, verify=verify, timeout=timeout,
                                 follow_redirects=False, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            with self.http.stream(method, path, **kwargs) as response:
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise ServerUnavailable(f"answer to {method} {path} is larger than {MAX_BODY} bytes")
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{self.url}: {type(exc).__name__}: {_short(exc)}") from None
        if response.status_code in (429, 503) or response.status_code >= 500:
            raise ServerUnavailable(f"{self.url} answered {response.status_code}", _retry_after(response))
        try:
            data = json.loads(body)
        except ValueError:
            raise ServerUnavailable(f"{self.url} answered {response.status_code} with a non-JSON body") from None
        if response.status_code >= 400:
            reason = data.get("reason") if isinstance(data, dict) else None
            detail = data.get("detail") if isinstance(data, dict) else None
            raise ServerRefused(response.status_code, _short(reason or "refused", 64), _short(detail or ""))
        return data

    @staticmethod
    def exchange_token(url: str, token: str, *, verify: Any = True,
                       transport: httpx.BaseTransport | None = None) -> dict[str, str]:
        client = CAClient(url, None, verify=verify, transport=transport)
        try:
            data = client._call("POST", "/v1/tokens/exchange", json={"token": token})
        finally:
            client.close()
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("principal", "credential")):
            raise ServerUnavailable("the token exchange answer has the wrong shape")
        return {"principal": data["principal"], "credential": data["credential"]}

    def policy(self) -> dict[str, Any]:
        data = self._call("GET", "/v1/policy")
        if not isinstance(data, dict):
            raise ServerUnavailable("the policy is not a JSON object")
        return data

    def submit(self, *, template: str, csr_pem: str, issuer: str, idempotency_key: str,
               renewal: tuple[str, bytes] | None = None, archived_key: dict[str, str] | None = None) -> RequestAnswer:
        """``renewal``: the old certificate (PEM) and its key's signature over the CSR;
        ``archived_key``: the new key sealed to the KRA, for templates that archive keys."""
        body: dict[str, Any] = {"template": template, "csr": csr_pem, "issuer": issuer}
        if renewal is not None:
            body["renewal"] = {"certificate": renewal[0], "signature": base64.b64encode(renewal[1]).decode()}
        if archived_key is not None:
            body["archived_key"] = archived_key
        data = self._call("POST", "/v1/requests", json=body, headers={"Idempotency-Key": idempotency_key})
        return self._answer(data)

    def request(self, request_id: int) -> RequestAnswer:
        return self._answer(self._call("GET", f"/v1/requests/{int(request_id)}"))

    def certificate_status(self, serial: str, issuer: str | None = None) -> str:
        params = {"issuer": issuer} if issuer else None
        data = self._call("GET", f"/v1/certificates/{serial}", params=params)
        status = data.get("status") if isinstance(data, dict) else None
        if status not in ("good", "revoked", "expired"):
            raise ServerUnavailable("the status answer has the wrong shape")
        return str(status)

    @staticmethod
    def _answer(data: Any) -> RequestAnswer:
        if not isinstance(data, dict):
            raise ServerUnavailable("the request answer is not a JSON object")
        status = data.get("status")
        request_id = data.get("id")
        if status not in ("issued", "pending", "denied", "failed") or not isinstance(request_id, int):
            raise ServerUnavailable("the request answer has the wrong shape")
        certificate = data.get("certificate")
        chain = data.get("chain") or []
        if status == "issued" and (not isinstance(certificate, str) or not isinstance(chain, list)
                                   or not all(isinstance(c, str) for c in chain)):
            raise ServerUnavailable("an issued answer without a certificate")
        reason = data.get("reason")
        return RequestAnswer(status=status, request_id=request_id,
                             certificate=certificate if isinstance(certificate, str) else None,
                             chain=tuple(chain) if isinstance(chain, list) else (),
                             reason=_short(reason) if reason else None)

