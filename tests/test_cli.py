"""The ``creditgate`` command: JSON output, exit codes, and `dev` from nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import Services
from tests.logcapture import log_file, remember_secret
from tests.procs import run_cli as run


def test_operator_commands(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    code, acct = run(services, "accounts", "create", "--user", user, "--tier", "free")
    assert code == 0 and set(acct) == {"id", "kind", "externalId", "tier"}
    assert (acct["kind"], acct["externalId"]) == ("user", user)

    key = f"grant-{uuid.uuid4()}"
    code, grant = run(
        services, "credits", "grant", user, "12.5", "--reason", "t", "--idempotency-key", key
    )
    assert code == 0
    assert grant["amountMicros"] == 12_500_000 and grant["balanceMicros"] == 12_500_000
    assert grant["accountId"] == acct["id"]
    # An identical replay succeeds and writes nothing.
    code, again = run(
        services, "credits", "grant", acct["id"], "12.5", "--reason", "t", "--idempotency-key", key
    )
    assert code == 0 and again["entryId"] == grant["entryId"]
    assert again["balanceMicros"] == 12_500_000
    # The same key with another amount is a conflict.
    code, err = run(
        services, "credits", "grant", user, "13", "--reason", "t", "--idempotency-key", key
    )
    assert code == 1 and err["error"]["code"] == "CONFLICT"
    # A negative amount adjusts down.
    code, adj = run(services, "credits", "grant", user, "-2.5", "--reason", "fix")
    assert code == 0 and adj["balanceMicros"] == 10_000_000

    code, k = run(services, "keys", "create", user, "--name", "ci")
    remember_secret(k["key"])
    assert code == 0 and k["key"].startswith("cg_") and k["accountId"] == acct["id"]
    assert k["prefix"] == k["key"][:11]

    code, bal = run(services, "balance", user)
    assert code == 0 and bal["balanceMicros"] == 10_000_000 and bal["available"] == 10

    code, err = run(services, "balance", "user_nobody")
    assert code == 1 and err["error"]["code"] == "NOT_FOUND"
    code, err = run(services, "credits", "grant", user, "0.0000001", "--reason", "x")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"

    code, report = run(services, "verify")
    assert code == 0 and report["ok"] is True


def test_usage_error_exits_2(services: Services) -> None:
    code, out = run(services, "credits", "grant")
    assert code == 2 and out == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dev_starts_from_nothing_and_serves_the_printed_key(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "UPSTREAM_BASE_URL", "CREDITGATE_CONFIG")
    }
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "creditgate",
            "dev",
            "--json",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "dev"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once everything is up
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        remember_secret(info["apiKey"])
        headers = {"Authorization": f"Bearer {info['apiKey']}"}
        with httpx.Client(base_url=info["url"], headers=headers, timeout=10) as http:
            before = http.get("/api/user/balance").json()["data"]["balanceMicros"]
            r = http.post(
                "/v1/chat/completions",
                json={"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}]},
            )
            assert r.status_code == 200, r.text
            cost = r.json()["usage"]["cost_micros"]
            after = http.get("/api/user/balance").json()["data"]["balanceMicros"]
            assert before - after == cost > 0
            # Every API is tried out the same way: Messages on mock-claude,
            # Responses and embeddings on mock-model.
            calls = {
                "/v1/messages": {
                    "model": "mock-claude",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "Hi"}],
                },
                "/v1/responses": {"model": "mock-model", "input": "Hi", "store": False},
                "/v1/embeddings": {"model": "mock-model", "input": "Hi"},
            }
            for path, body in calls.items():
                r = http.post(path, json=body, headers={"anthropic-version": "2023-06-01"})
                assert r.status_code == 200, (path, r.text)
                assert r.json()["usage"]["cost_micros"] > 0, path
            ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
            assert {"mock-model", "mock-claude"} <= ids
        # It serves as an application role that owns nothing, as production should.
        assert asyncio.run(_serving_role(info)) == "creditgate_dev_app"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
            with log_file("dev") as f:
                f.write((proc.stderr.read() if proc.stderr else "").encode())
    assert code == 0
    # The embedded Postgres stopped with it.
    time.sleep(0.5)
    assert not (tmp_path / "dev" / "pg" / "postmaster.pid").exists()


async def _serving_role(info: dict[str, Any]) -> str:
    """The role ``dev`` serves as; it must not be able to touch the ledger's guards."""
    conn = await asyncpg.connect(info["servingDatabaseUrl"])
    try:
        role = str(await conn.fetchval("SELECT current_user"))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ALL")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE ledger_entries SET amount = amount")
    finally:
        await conn.close()
    owner = await asyncpg.connect(info["databaseUrl"])
    try:
        users = await owner.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await owner.close()
    # The server's own pooled connections are all the application role's.
    assert {u["usename"] for u in users} == {role}, users
    return role


def test_expiring_grant_overdraft_and_usage_commands(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    code, acct = run(services, "accounts", "create", "--user", user)
    assert code == 0
    code, grant = run(
        services, "credits", "grant", user, "5", "--reason", "trial", "--expires-at", "2999-01-01"
    )
    assert code == 0 and grant["expiresAt"] == "2999-01-01T00:00:00Z"
    code, err = run(
        services, "credits", "grant", user, "5", "--reason", "t", "--expires-at", "2001-01-01"
    )
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"

    code, od = run(services, "accounts", "set-overdraft", user, "2.5")
    assert code == 0 and od["overdraftLimitMicros"] == 2_500_000
    assert od["accountId"] == acct["id"]
    code, err = run(services, "accounts", "set-overdraft", user, "-1")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"
    # The overdraft lets an adjustment go below zero, down to the limit and no further.
    code, adj = run(services, "credits", "grant", user, "-7", "--reason", "fix")
    assert code == 0 and adj["balanceMicros"] == -2_000_000
    code, err = run(services, "credits", "grant", user, "-0.6", "--reason", "fix")
    assert code == 1 and err["error"]["code"] == "INSUFFICIENT_CREDITS"
    code, err = run(services, "accounts", "set-overdraft", user, "1")
    assert code == 1 and err["error"]["code"] == "CONFLICT"

    code, page = run(services, "usage", user, "--limit", "1")
    assert code == 0 and [e["kind"] for e in page["entries"]] == ["adjustment"]
    code, rest = run(services, "usage", user, "--cursor", page["nextCursor"], "--kind", "grant")
    assert code == 0 and [e["amountMicros"] for e in rest["entries"]] == [5_000_000]
    assert rest["nextCursor"] is None
    code, err = run(services, "usage", user, "--limit", "500")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"


def test_verify_reports_a_tampered_ledger_and_exits_1(services: Services) -> None:
    import asyncio

    import asyncpg

    from creditgate import ledger, migrations
    from tests.conftest import _admin_url

    name = f"cg_verify_{uuid.uuid4().hex[:10]}"
    url = _admin_url(services.owner_url, name)

    async def tamper() -> None:
        admin = await asyncpg.connect(services.owner_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
            acct = await ledger.ensure_account(conn, "user", "user_tampered")
            await ledger.post_entry(
                conn,
                account_id=acct.id,
                amount=5_000_000,
                kind="grant",
                idempotency_key="t",
                reason="t",
            )
            # What only a superuser bypassing the schema could do.
            await conn.execute(
                "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only"
            )
            await conn.execute("UPDATE ledger_entries SET amount = 6000000")
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(services.owner_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(tamper())
    try:
        code, report = run(Services(url, services.redis_url, url, services.app_role), "verify")
    finally:
        asyncio.run(drop())
    assert code == 1 and report["ok"] is False
    assert report["error"]["code"] == "LEDGER_MISMATCH"
    problems = {p["problem"].split(" (")[0] for p in report["problems"]}
    assert any(p.startswith("balance row differs") for p in problems)
    assert any(p.startswith("running balance broken") for p in problems)
    assert any(p.startswith("an invariant's trigger is missing") for p in problems)
