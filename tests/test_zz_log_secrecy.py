"""Runs last (by name): no log line of the whole run holds a secret it used."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from creditgate import ledger
from creditgate.auth import create_api_key
from tests.conftest import Services
from tests.logcapture import LOG_DIR, SECRETS, hostile_headers, remember_secret, send_raw
from tests.procs import free_port, server_env, stop, wait_http, write_config


def test_no_key_prompt_or_completion_in_any_log() -> None:
    files = sorted(LOG_DIR.glob("*.log"))
    lines = sum(f.read_bytes().count(b"\n") for f in files)
    if len(SECRETS) < 5 or lines < 50:
        pytest.skip("run with the whole suite: too few secrets or log lines to check")
    for f in files:
        text = f.read_text("utf-8", errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"a secret reached {f.name}"


def _jwt_shaped() -> str:
    """A session token's shape (base64url header.payload.signature)."""
    import base64

    part = base64.urlsafe_b64encode(uuid.uuid4().bytes * 3).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.{part}"


async def test_headers_aiohttp_refuses_are_logged_without_their_credentials(
    services: Services, db: asyncpg.Pool, tmp_path: Path
) -> None:
    account = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    key = (await create_api_key(db, account.id, "log-secrecy")).key
    session = _jwt_shaped()
    remember_secret(key, session[:40])
    port = free_port()
    log_path = LOG_DIR / f"serve-hostile-headers-{uuid.uuid4().hex[:8]}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "creditgate", "serve", "--port", str(port)],
            env=server_env(services, write_config(tmp_path, "http://127.0.0.1:9/v1")),
            stderr=log,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        for request in hostile_headers(key, session):
            answer = send_raw("127.0.0.1", port, request)
            assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
            # Answered in the error envelope, like every other refusal.
            envelope = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert envelope["error"]["code"] == "VALIDATION_ERROR", answer[:300]
            assert envelope["error"]["type"] == "invalid_request_error"
    finally:
        stop(proc)
    text = log_path.read_text("utf-8", errors="replace")
    # aiohttp did log each refusal (the redaction, not silence, keeps the key out).
    assert text.count('"logger":"aiohttp.server"') >= 6, text[-2000:]
    for secret in (key, key[3:20], session[:40], session[20:60]):
        assert secret not in text
    assert "[redacted]" in text


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ('{"msg":"request","route":"/v1/chat/completions","status":200}', None),
        ('{"msg":"api key created","prefix":"cg_AbCd1234"}', "cg_AbCd1234"),
        # An environment variable's name is not a key (keys are lower-case cg_…).
        ('{"msg":"upstream key unset","variable":"CG_UPSTREAM_KEY_MAIN"}', None),
        ('{"msg":"upstream key unset","variable":"SK_PROVIDER_SECRET_KEY"}', None),
        ('{"msg":"The session token is missing or malformed."}', None),
        ("b'Authorization: Bearer cg_" + "k" * 43 + "\\\\x01'", "Authorization: [redacted]"),
        ("Cookie: theme=dark; __session=eyJhbGciOiJSUzI1NiJ9.eyJzdWIi", "Cookie: [redacted]"),
        ('{"exc":"token eyJhbGciOiJSUzI1NiJ9.e30.sig"}', '{"exc":"token [redacted]"}'),
    ],
)
def test_redaction_keeps_ordinary_lines_and_prefixes(line: str, kept: str | None) -> None:
    from creditgate.logs import redact

    out = redact(line)
    assert (kept or line) in out
    assert "k" * 20 not in out and "eyJhbGci" not in out
