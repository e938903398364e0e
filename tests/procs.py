"""Helpers for tests that run creditgate as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TEST_CONFIG, Services
from tests.logcapture import log_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200 (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_mock_upstream(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``creditgate mock-upstream`` on a free port; returns (process, its /v1 base URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditgate", "mock-upstream", "--port", str(port), *args],
        stderr=log_file("mock-upstream"),
    )
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    return proc, f"http://127.0.0.1:{port}/v1"


def server_env(services: Services, config_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config_path),
        **extra,
    }


def write_config(tmp_path: Path, upstream_url: str, extra: str = "") -> Path:
    path = tmp_path / "creditgate.toml"
    path.write_text(TEST_CONFIG.format(upstream=upstream_url) + extra)
    return path


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, wait (bounded), SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def run_cli(services: Services, *args: str) -> tuple[int, dict[str, Any]]:
    """``creditgate ARGS --json`` against the test databases: (exit code, its JSON output)."""
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    proc = subprocess.run(
        [sys.executable, "-m", "creditgate", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    with log_file("cli") as f:
        f.write(proc.stderr.encode())
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 1, proc.stdout  # exactly one JSON object, or nothing on a usage error
    return proc.returncode, json.loads(lines[0]) if lines else {}
