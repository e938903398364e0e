"""/openapi.json: generated from the endpoint table, and every answer of a live server fits it.

schemathesis reads the document from a running ``creditgate serve`` (real
Postgres, Redis and mock upstream), generates requests for every operation
and checks each answer: no 5xx, a documented status, a documented content
type, a body that fits its schema, and the id headers on every response.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from creditgate.http.app import ENDPOINTS, create_app
from creditgate.http.openapi import document
from tests.conftest import Services
from tests.logcapture import log_file, remember_secret
from tests.procs import free_port, server_env, start_mock_upstream, stop, wait_http, write_config

ADMIN_TOKEN = f"admin-{uuid.uuid4().hex}"
# DESIGN.md §2: the routes the contract names (POST/GET /api/keys counted once each).
CONTRACT = {
    ("post", "/v1/chat/completions"),
    ("post", "/api/chat"),
    ("get", "/v1/models"),
    ("get", "/api/user/balance"),
    ("get", "/api/user/usage"),
    ("post", "/api/keys"),
    ("get", "/api/keys"),
    ("delete", "/api/keys/{id}"),
    ("post", "/api/checkout"),
    ("post", "/api/billing-portal"),
    ("post", "/api/orgs/create"),
    ("post", "/api/admin/credits"),
    ("post", "/api/webhooks/clerk"),
    ("post", "/api/webhooks/polar"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
}


def test_document_covers_the_contract_and_every_route(settings_for_doc: Any) -> None:
    doc = document(ENDPOINTS)
    ops = {(m, p) for p, methods in doc["paths"].items() for m in methods}
    assert CONTRACT - {("get", "/openapi.json")} <= ops
    # Every route the app serves is documented (the table registers them).
    app = create_app(settings_for_doc)
    served = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert served == ops | {("get", "/openapi.json")}
    assert doc["openapi"] == "3.1.0"
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert "500" in op["responses"], (method, path)
            assert op["operationId"] and op["summary"], (method, path)


@pytest.fixture
def settings_for_doc(settings: Any) -> Any:
    return settings


@pytest.fixture(scope="module")
def live(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `creditgate serve` in front of the mock upstream, an account with credits and a key."""
    tmp = tmp_path_factory.mktemp("openapi")
    mock, upstream = start_mock_upstream()
    config = write_config(tmp, upstream)
    env = server_env(
        services,
        config,
        ADMIN_TOKEN=ADMIN_TOKEN,
        POLAR_WEBHOOK_SECRET="whsec_schemathesis",
        CLERK_WEBHOOK_SECRET="whsec_c2NoZW1hdGhlc2lzLXNjaGVtYXRoZXNpcw==",
    )

    def cli(*args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "creditgate", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return dict(json.loads(out.stdout))

    user = f"user_{uuid.uuid4().hex}"
    cli("accounts", "create", "--user", user)
    cli("credits", "grant", user, "1000", "--reason", "schemathesis")
    key = cli("keys", "create", user, "--name", "schemathesis")["key"]
    remember_secret(key, ADMIN_TOKEN)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "creditgate", "serve", "--port", str(port)],
        env=env,
        stderr=log_file("serve-openapi"),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield {"url": f"http://127.0.0.1:{port}", "key": key}
    finally:
        stop(server)
        stop(mock)


def test_openapi_json_is_served(live: dict[str, str]) -> None:
    r = httpx.get(f"{live['url']}/openapi.json")
    assert r.status_code == 200
    served = r.json()
    assert set(served["paths"]) == set(document(ENDPOINTS)["paths"]) | {"/openapi.json"}
    assert served["components"] == json.loads(json.dumps(document(ENDPOINTS)["components"]))


def _ids_present(ctx: Any, response: Any, case: Any) -> bool:
    assert response.headers.get("x-request-id"), "x-request-id missing"
    assert response.headers.get("x-correlation-id"), "x-correlation-id missing"
    return True


@pytest.mark.slow
def test_every_answer_fits_the_document(live: dict[str, str]) -> None:
    # schemathesis's own pytest plugin does not run on this pytest, so its
    # strategies drive a hypothesis test per operation here.
    api = schemathesis.openapi.from_url(f"{live['url']}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= len(CONTRACT)
    for operation in operations:
        # Admin routes get the admin token, everything else the customer's key
        # (session-only routes then answer their documented 403).
        token = ADMIN_TOKEN if operation.path.startswith("/api/admin/") else live["key"]
        _fuzz(operation, token)


def _fuzz(operation: Any, token: str) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=12,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        # No 500 ever; other 5xx only where documented (the checks below).
        assert response.status_code != 500, (case.method, case.path, response.text[:500])
        case.validate_response(
            response,
            checks=[
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                _ids_present,
            ],
        )

    check()


def test_document_is_plain_json() -> None:
    json.dumps(document(ENDPOINTS))  # no Decimal, Fragment or function leaks in
