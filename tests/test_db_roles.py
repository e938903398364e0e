"""Append-only enforced against the app itself: the serving role owns nothing.

The session's servers already connect as its application role (conftest);
here, what that role is refused, what ``verify`` reports when the owner
tampers with a guard, and the one-URL deployment that still works but warns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import pytest

from creditgate import ledger, migrations
from creditgate.config import Settings
from creditgate.ledger import guards, roles
from tests.conftest import Services, _admin_url, running


@pytest.fixture
async def app_conn(services: Services, db: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the serving role (what ``creditgate serve`` uses)."""
    conn = await asyncpg.connect(services.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only",
        "ALTER TABLE ledger_entries ENABLE REPLICA TRIGGER ledger_entries_append_only",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
        "DROP TRIGGER ledger_entries_append_only ON ledger_entries",
        "CREATE OR REPLACE FUNCTION creditgate_refuse_change() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "UPDATE ledger_entries SET amount = amount",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
        "UPDATE ledger_reversals SET reason = reason",
        "UPDATE credit_lot_uses SET amount = amount",
        "UPDATE usage_records SET account_id = account_id",
        "DELETE FROM holds",
        "DELETE FROM account_balances",
        "UPDATE ledger_guard_definitions SET function_definition = ''",
        "SET session_replication_role = replica",
        "CREATE TABLE cg_not_allowed (x int)",
    ],
)
async def test_the_serving_role_cannot_touch_the_guards_or_the_history(
    app_conn: asyncpg.Connection, db: asyncpg.Pool, customer_factory: Any, statement: str
) -> None:
    await customer_factory(1)  # something the UPDATEs and DELETEs would hit
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute(statement)


async def test_the_serving_role_is_not_warned_about(app_conn: asyncpg.Connection) -> None:
    assert await guards.serving_role_warnings(app_conn) == []
    report = await ledger.verify_ledger(app_conn)
    assert report.ok, report.problems
    assert report.warnings == []


# ---------------------------------------------------------------- tampering, as the owner


@dataclass(frozen=True)
class Scratch:
    owner_url: str
    app_url: str


@pytest.fixture
async def scratch(services: Services) -> AsyncIterator[Scratch]:
    """A migrated database of its own (tampering must not touch the session's)."""
    name = f"cg_roles_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    owner_url = _admin_url(services.owner_url, name)
    try:
        conn = await asyncpg.connect(owner_url)
        try:
            await migrations.migrate(conn)
            await roles.grant_app_role(conn, services.app_role)
        finally:
            await conn.close()
        yield Scratch(owner_url, roles.url_as(owner_url, services.app_role))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _problems(url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return (await ledger.verify_ledger(conn)).problems
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("tamper", "state"),
    [
        (
            "ALTER TABLE ledger_entries ENABLE REPLICA TRIGGER ledger_entries_append_only",
            "not enabled (tgenabled = R)",
        ),
        (
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only",
            "not enabled (tgenabled = D)",
        ),
        (
            "ALTER TABLE holds ENABLE ALWAYS TRIGGER holds_end_once",
            "not enabled (tgenabled = A)",
        ),
        (
            "CREATE OR REPLACE FUNCTION creditgate_refuse_change() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
            "function replaced",
        ),
        (
            "DROP TRIGGER ledger_entries_append_only ON ledger_entries;"
            " CREATE TRIGGER ledger_entries_append_only BEFORE DELETE ON ledger_entries"
            " FOR EACH ROW EXECUTE FUNCTION creditgate_refuse_change()",
            "trigger replaced",
        ),
        ("DROP TRIGGER usage_records_no_truncate ON usage_records", "missing"),
    ],
)
async def test_verify_reports_a_guard_the_owner_disabled_or_replaced(
    scratch: Scratch, tamper: str, state: str
) -> None:
    assert await _problems(scratch.app_url) == []
    owner = await asyncpg.connect(scratch.owner_url)
    try:
        await owner.execute(tamper)
    finally:
        await owner.close()
    problems = await _problems(scratch.app_url)
    assert {p["state"] for p in problems} == {state}, problems
    assert problems[0]["problem"].startswith("an invariant's trigger is missing, not enabled")


async def test_a_new_migration_rerecords_the_guards(scratch: Scratch) -> None:
    """Only the migration runner's record counts: a change it applies is the new baseline."""
    owner = await asyncpg.connect(scratch.owner_url)
    try:
        await owner.execute(
            "CREATE OR REPLACE FUNCTION creditgate_refuse_change() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no: %', TG_OP; END $$"
        )
        assert {p["state"] for p in await _problems(scratch.app_url)} == {"function replaced"}
        async with owner.transaction():  # what the runner does in a migration's transaction
            await guards.record_definitions(owner)
        assert await _problems(scratch.app_url) == []
    finally:
        await owner.close()


async def test_concurrent_migrates_grant_and_create_without_tripping_over_each_other(
    scratch: Scratch, services: Services
) -> None:
    role = f"cg_app_{uuid.uuid4().hex[:10]}"
    conns = [await asyncpg.connect(scratch.owner_url) for _ in range(4)]
    try:
        created = await asyncio.gather(*(roles.ensure_app_role(c, role, None) for c in conns))
        assert sorted(created) == [False, False, False, True]
        await asyncio.gather(*(roles.grant_app_role(c, role) for c in conns))
        app = await asyncpg.connect(roles.url_as(scratch.owner_url, role))
        try:
            assert await app.fetchval("SELECT count(*) FROM ledger_entries") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("TRUNCATE ledger_entries")
        finally:
            await app.close()
    finally:
        owner = conns[0]
        database = await owner.fetchval("SELECT current_database()")
        for sql in (
            f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"',
            f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM "{role}"',
            f'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM "{role}"',
            f'REVOKE ALL ON SCHEMA public FROM "{role}"',
            f'REVOKE ALL ON DATABASE "{database}" FROM "{role}"',
            f'DROP ROLE "{role}"',
        ):
            await owner.execute(sql)
        for c in conns:
            await c.close()


# ---------------------------------------------------------------- the one-URL deployment


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "creditgate", *args, "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_owner_url_verifies_with_a_warning_and_exit_0(services: Services) -> None:
    proc = _cli({"DATABASE_URL": services.owner_url}, "verify")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert [w["warning"] for w in report["warnings"]] == [guards.SUPERUSER]
    assert "warning: the serving role is a superuser" in proc.stderr
    # The application role: the same ledger, no warning.
    proc = _cli({"DATABASE_URL": services.database_url}, "verify")
    assert proc.returncode == 0 and json.loads(proc.stdout)["warnings"] == []
    assert "warning" not in proc.stderr


async def test_serving_with_the_owner_url_works_and_warns_at_start(
    settings: Settings,
    services: Services,
    db: asyncpg.Pool,
    customer_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = await customer_factory(1)
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.WARNING):
        async with running(replace(settings, database_url=services.owner_url)) as client:
            resp = await client.post("/v1/chat/completions", json=body, headers=c.auth)
            assert resp.status == 200
    assert [r.getMessage() for r in caplog.records].count(guards.SUPERUSER) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        async with running(settings) as client:  # the application role
            resp = await client.post("/v1/chat/completions", json=body, headers=c.auth)
            assert resp.status == 200
    assert guards.SUPERUSER not in [r.getMessage() for r in caplog.records]
    assert guards.OWNER not in [r.getMessage() for r in caplog.records]


async def test_a_serving_role_that_can_truncate_the_ledger_is_warned_about(
    services: Services,
) -> None:
    """Not a superuser, but TRUNCATE (or ownership) lets it bypass the row triggers."""
    role = f"cg_trunc_{uuid.uuid4().hex[:10]}"
    owner = await asyncpg.connect(services.owner_url)
    try:
        await owner.execute(f'CREATE ROLE "{role}" LOGIN')
        await owner.execute(f'GRANT SELECT, TRUNCATE ON ledger_entries TO "{role}"')
        conn = await asyncpg.connect(roles.url_as(services.owner_url, role))
        try:
            warnings = await guards.serving_role_warnings(conn)
        finally:
            await conn.close()
        assert [(w.message, w.role, w.tables) for w in warnings] == [
            (guards.OWNER, role, ("ledger_entries",))
        ]
    finally:
        await owner.execute(f'REVOKE ALL ON ledger_entries FROM "{role}"')
        await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
        await owner.close()


# ---------------------------------------------------------------- migrate with two URLs


def test_migrate_as_owner_creates_and_grants_the_app_role(services: Services) -> None:
    """``MIGRATE_DATABASE_URL`` owner, ``DATABASE_URL`` a role that does not exist yet."""
    import asyncio

    name = f"cg_mig2_{uuid.uuid4().hex[:10]}"
    role = f"cg_app_{uuid.uuid4().hex[:10]}"  # unique: roles are cluster-wide
    owner_url = _admin_url(services.owner_url, name)
    app_url = roles.url_as(owner_url, role)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(services.owner_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        env = {"MIGRATE_DATABASE_URL": owner_url, "DATABASE_URL": app_url}
        proc = _cli(env, "migrate")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["appRole"] == role and len(out["applied"]) == len(migrations.available())
        assert out["partitionsMade"] == 0  # the migration made this month and twelve ahead

        async def drop_newest_partition() -> None:
            conn = await asyncpg.connect(owner_url)
            try:
                newest = await conn.fetchval(
                    "DELETE FROM ledger_partitions WHERE range_from ="
                    " (SELECT max(range_from) FROM ledger_partitions) RETURNING name"
                )
                await conn.execute(f'DROP TABLE "{newest}"')
            finally:
                await conn.close()

        asyncio.run(drop_newest_partition())
        # Again: nothing to apply, grants recomputed, the missing month made, still fine.
        proc = _cli(env, "migrate")
        assert proc.returncode == 0, proc.stderr
        again = json.loads(proc.stdout)
        assert again["applied"] == [] and again["partitionsMade"] == 1, again
        # The operator commands and verify work as the app role, without a warning.
        app_env = {"DATABASE_URL": app_url}
        assert _cli(app_env, "accounts", "create", "--user", "user_roles").returncode == 0
        grant = _cli(app_env, "credits", "grant", "user_roles", "3", "--reason", "t")
        assert grant.returncode == 0, grant.stderr
        proc = _cli(app_env, "verify")
        assert proc.returncode == 0 and json.loads(proc.stdout)["warnings"] == []

        async def refused() -> None:
            conn = await asyncpg.connect(app_url)
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ALL")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("UPDATE ledger_entries SET reason = 'x'")
            finally:
                await conn.close()

        asyncio.run(refused())
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        asyncio.run(admin(f'DROP ROLE IF EXISTS "{role}"'))


# ---------------------------------------------------------------- configuration


def test_migrate_target_reads_both_urls_and_the_alias() -> None:
    owner = "postgresql://owner:pw@db:5432/cg"
    app = "postgresql://cg_app:s%40cret@db:5432/cg"
    t = roles.migrate_target({"MIGRATE_DATABASE_URL": owner, "DATABASE_URL": app})
    assert (t.owner_url, t.app_role, t.app_password) == (owner, "cg_app", "s@cret")
    assert roles.migrate_target({"DATABASE_OWNER_URL": owner, "DATABASE_URL": app}) == t
    # One URL: migrate and serve as it, no grants.
    assert roles.migrate_target({"DATABASE_URL": owner}).app_role is None
    # An explicit role (e.g. one the operator created, or a URL without a user).
    t = roles.migrate_target({"DATABASE_URL": owner, "DATABASE_APP_ROLE": "svc_role"})
    assert (t.app_role, t.app_password) == ("svc_role", None)
    with pytest.raises(roles.RoleError, match="DATABASE_APP_ROLE"):
        roles.migrate_target({"DATABASE_URL": owner, "DATABASE_APP_ROLE": 'x"; DROP'})
    with pytest.raises(roles.RoleError, match="DATABASE_URL"):
        roles.migrate_target({})


def test_compose_and_kubernetes_serve_as_the_application_role() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    migrate_env, serve_env = compose["migrate"]["environment"], compose["creditgate"]["environment"]
    target = roles.migrate_target(migrate_env)
    assert target.owner_url == migrate_env["MIGRATE_DATABASE_URL"]
    assert target.app_role is not None
    assert serve_env["DATABASE_URL"] == migrate_env["DATABASE_URL"]
    assert "MIGRATE_DATABASE_URL" not in serve_env

    k8s = root / "deploy" / "k8s"
    secrets = {
        d["metadata"]["name"]: d["stringData"]
        for d in yaml.safe_load_all((k8s / "secret.example.yaml").read_text())
    }
    (job,) = yaml.safe_load_all((k8s / "migrate-job.yaml").read_text())
    (deployment,) = yaml.safe_load_all((k8s / "deployment.yaml").read_text())

    def env_of(doc: dict[str, Any]) -> dict[str, str]:
        container = doc["spec"]["template"]["spec"]["containers"][0]
        merged: dict[str, str] = {}
        for source in container["envFrom"]:
            merged |= secrets[source["secretRef"]["name"]]
        return merged

    job_target = roles.migrate_target(env_of(job))
    assert job_target.app_role == "creditgate_app"
    assert job_target.owner_url != env_of(deployment)["DATABASE_URL"]
    assert "MIGRATE_DATABASE_URL" not in env_of(deployment)
