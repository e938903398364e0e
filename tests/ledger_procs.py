"""Real processes for the ledger's multi-process tests: servers and a private Postgres.

Everything listens on 127.0.0.1 (or a unix socket) on free ports, every wait is
bounded, and every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx

from creditgate import migrations
from tests.logcapture import log_file
from tests.procs import free_port


def write_exact_config(
    path: Path,
    upstream_url: str,
    *,
    settle_margin_seconds: float = 30,
    timeouts: str = "",
    output_price: str = "10",
    max_output_tokens: int = 100,
) -> Path:
    """A TOML config: one model whose cost is output tokens × ``output_price`` µc only.

    With a zero input price the worst case of a call is known exactly:
    ``max_output_tokens × output_price`` µc, so a test can grant "exactly N calls".
    """
    path.write_text(
        f"""
[upstreams.main]
base_url = "{upstream_url}"

[models."exact"]
input_price = 0
output_price = {output_price}
max_output_tokens = {max_output_tokens}
deployments = [{{ upstream = "main", model = "exact" }}]
{f"timeouts = {timeouts}" if timeouts else ""}

[tiers.free]
requests_per_minute = 1000000
tokens_per_minute = 1000000000
max_parallel = 100000
messages_per_day = 1000000

[ledger]
settle_margin_seconds = {settle_margin_seconds}
"""
    )
    return path


class Server:
    """One ``creditgate serve`` process on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Into the run's log directory: the secrecy test reads these too.
        self._log = log_file("ledger-serve")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "creditgate", "serve", "--port", str(self.port)],
            env={**os.environ, "LOG_LEVEL": "warning", **env},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"creditgate serve exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError("creditgate serve did not become healthy")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def servers(n: int, env: dict[str, str]) -> Iterator[list[Server]]:
    started = [Server(env) for _ in range(n)]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.stop()


class PrivatePostgres:
    """A Postgres of the test's own (pgserver's binaries), which it may stop and start.

    Never the machine's shared server: stopping that would break everyone else.
    Its data lives in a temporary directory of its own, not under pytest's
    ``tmp_path``: any pytest session starting on the machine re-restricts
    ``/tmp/pytest-of-<user>`` to its owner, which would lock pgserver's
    system user (under root) out of the data directory mid-test.
    """

    def __init__(self) -> None:
        from creditgate.embedded import EmbeddedPostgres

        self._dir = Path(tempfile.mkdtemp(prefix="creditgate-test-pg-"))
        self._embedded = EmbeddedPostgres(self._dir)
        server: Any = self._embedded._server
        self._pgdata = Path(server.pgdata)
        self._user = server.system_user
        self.url = self._embedded.url
        self._socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self._restarted = False

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[import-untyped]

        proc = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self._pgdata), *args],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl {args[-1]} failed: {proc.stdout} {proc.stderr}")

    def stop(self) -> None:
        """Fast shutdown: sessions are cut, open transactions roll back."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._restarted = True
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir}",
            "-l",
            str(self._pgdata / "log"),
            "start",
        )

    def close(self) -> None:
        if self._restarted:  # pgserver only knows the first postmaster: stop ours
            with contextlib.suppress(RuntimeError):
                self._pg_ctl("-w", "-m", "fast", "stop")
        self._embedded.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def migrate(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()


def run_verify(database_url: str) -> tuple[int, str]:
    """``creditgate verify --json`` as an operator would run it."""
    proc = subprocess.run(
        [sys.executable, "-m", "creditgate", "verify", "--json"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout


async def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll an async predicate until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False
