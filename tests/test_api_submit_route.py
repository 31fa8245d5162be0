"""``POST /v1/requests`` has two ways in: the direct route (frontends/http.py SubmitRoute) takes
well-formed JSON submissions, the FastAPI route takes the rest. They answer alike.

A body sent as ``application/x-test+json`` is one the direct route leaves to FastAPI (which reads
any ``+json`` type as JSON), so the same submission can be made through each.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from support import CA, Client, assert_problem, make_csr


def post(client: Client, body: Mapping[str, object], *, direct: bool, **headers: str) -> httpx.Response:
    content_type = "application/json" if direct else "application/x-test+json"
    return client.http.post("/v1/requests", content=json.dumps(body).encode(),
                            headers={"Content-Type": content_type, **headers})


def test_both_routes_issue_and_replay_alike(ca: CA, server: str) -> None:
    client = Client.enrolled(server, ca.add_principal(f"route-{uuid.uuid4().hex[:8]}.example.internal"))
    answers: dict[bool, tuple[httpx.Response, httpx.Response]] = {}
    for direct in (True, False):
        body = {"template": "machine", "csr": make_csr()[1]}
        key = uuid.uuid4().hex
        first = post(client, body, direct=direct, **{"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        again = post(client, body, direct=direct, **{"Idempotency-Key": key})
        assert again.status_code == 200, again.text
        assert again.json()["replayed"] is True and again.json()["serial"] == first.json()["serial"]
        answers[direct] = (first, again)
    for index in (0, 1):
        mine, theirs = answers[True][index], answers[False][index]
        assert set(mine.json()) == set(theirs.json())
        assert mine.headers["content-type"] == theirs.headers["content-type"] == "application/json"
    assert set(answers[True][0].json()) == {"id", "status", "serial", "thumbprint", "certificate", "chain"}


def test_both_routes_refuse_alike(ca: CA, server: str) -> None:
    client = Client.enrolled(server, ca.add_principal(f"route-{uuid.uuid4().hex[:8]}.example.internal"))
    stranger = Client(server, "cpc_not-a-credential")
    for direct in (True, False):
        assert_problem(post(client, {"template": "nope", "csr": make_csr()[1]}, direct=direct), 400,
                       "unknown-template")
        assert_problem(post(stranger, {"template": "machine", "csr": make_csr()[1]}, direct=direct), 401,
                       "unauthenticated")
        assert_problem(post(client, {"template": "machine", "csr": "not a CSR"}, direct=direct), 400,
                       "malformed-csr")
        # handed on to FastAPI by the direct route: unknown field, bad idempotency key
        assert_problem(post(client, {"template": "machine", "csr": make_csr()[1], "x": 1}, direct=direct), 400,
                       "malformed-request")
        assert_problem(post(client, {"template": "machine", "csr": make_csr()[1]}, direct=direct,
                            **{"Idempotency-Key": "no spaces"}), 400, "malformed-request")


def test_well_formed_json_takes_the_direct_route(ca: CA, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from certpulse.ca.config import CADir
    from certpulse.ca.setup import open_service
    from certpulse.frontends import http as frontend

    answered: list[bool] = []
    answer = frontend.SubmitRoute._answer

    def counted(self: frontend.SubmitRoute, *args: Any) -> Any:
        answered.append(True)
        return answer(self, *args)

    monkeypatch.setattr(frontend.SubmitRoute, "_answer", counted)
    credential = Client.enrolled(server, ca.add_principal(f"route-{uuid.uuid4().hex[:8]}.example.internal")) \
        .http.headers["Authorization"]
    service = open_service(CADir(ca.dir), pool_size=1)

    async def submit(content_type: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=frontend.create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://ca") as client:
            return await client.post("/v1/requests", content=json.dumps({"template": "machine", "csr": make_csr()[1]}),
                                     headers={"Content-Type": content_type, "Authorization": credential})

    try:
        for content_type, direct in (("application/json", True), ("application/json; charset=utf-8", True),
                                     ("application/x-test+json", False)):
            answered.clear()
            response = asyncio.run(submit(content_type))
            assert response.status_code == 201, response.text
            assert answered == ([True] if direct else []), content_type
    finally:
        service.engine.dispose()
