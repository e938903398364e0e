"""Slow and numerous clients against `creditgate serve`: cut after the configured timeouts, capped.

Raw sockets, because an HTTP client library will not send half a request.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Services
from tests.logcapture import log_file
from tests.procs import free_port, server_env, stop, wait_http, write_config

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
# Bounds on waiting for the server, far above the configured timeouts: a
# connection still open after this was never going to be cut.
PATIENCE = 15.0


def _serve(tmp_path: Path, services: Services, http: str) -> Iterator[int]:
    port = free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", f"\n[http]\n{http}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditgate", "serve", "--port", str(port)],
        env=server_env(services, config, ADMIN_TOKEN=ADMIN_TOKEN),
        stderr=log_file("serve-slow-clients"),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield port
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def short_timeouts(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from _serve(
        tmp_path_factory.mktemp("slow"),
        services,
        "header_timeout_seconds = 1\nbody_timeout_seconds = 1",
    )


@pytest.fixture(scope="module")
def capped(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from _serve(tmp_path_factory.mktemp("capped"), services, "max_connections = 3")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    return sock


def trickle_until_cut(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` a byte every 50 ms (a slow-loris) until the server closes; what it answered.

    Fails if the server still listens after PATIENCE seconds.
    """
    deadline = time.monotonic() + PATIENCE
    sock.settimeout(0.05)
    answer = b""
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return answer
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk
    raise AssertionError(f"the connection was not cut within {PATIENCE} s; got {answer!r}")


def test_headers_sent_too_slowly_are_cut(short_timeouts: int) -> None:
    with connect(short_timeouts) as sock:
        headers = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000
        answer = trickle_until_cut(sock, headers)
    assert answer == b""  # no request was ever complete: nothing to answer


def test_a_body_sent_too_slowly_is_408_and_cut(short_timeouts: int) -> None:
    body = b'{"account": "x", "amount": 1, "reason": "r", "idempotencyKey": "k"}' + b" " * 10_000
    with connect(short_timeouts) as sock:
        sock.sendall(
            b"POST /api/admin/credits HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        answer = trickle_until_cut(sock, body)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code":"REQUEST_TIMEOUT"' in answer


def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout(
    short_timeouts: int,
) -> None:
    with connect(short_timeouts) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        # Kept alive, then cut: recv returns EOF well within PATIENCE.
        assert sock.recv(65536) == b""


def test_connections_past_the_cap_are_refused_with_503_and_freed_ones_reused(capped: int) -> None:
    held = [connect(capped) for _ in range(3)]
    try:
        with connect(capped) as extra:
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b'"code":"SERVICE_UNAVAILABLE"' in answer
        # The held ones are served as usual.
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
        held.pop().close()
        deadline = time.monotonic() + PATIENCE
        while True:  # the server notices the close (bounded)
            with connect(capped) as again:
                again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if again.recv(65536).startswith(b"HTTP/1.1 200 "):
                    break
            assert time.monotonic() < deadline, "a freed slot was never reused"
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
