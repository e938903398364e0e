"""Every log line of a test run, kept so a final test can grep it for secrets.

In-process records go to ``inprocess.log``; servers the tests start as
subprocesses write their stderr to files beside it (``log_file``). Tests
register what must never be logged — API keys, prompts, completions — with
``remember_secret``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import IO

LOG_DIR = Path(tempfile.mkdtemp(prefix="creditgate-test-logs-"))
SECRETS: set[str] = set()


def remember_secret(*values: str) -> None:
    """Mark values that no log line of this run may contain."""
    SECRETS.update(v for v in values if v)


def log_file(name: str) -> IO[bytes]:
    """A fresh file in the run's log directory, for a subprocess's stderr."""
    return open(LOG_DIR / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.log", "ab")


def send_raw(host: str, port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` as is over a fresh socket (no client library to refuse it); the answer."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass  # the server may cut a connection it refused
    return b"".join(chunks)


def hostile_headers(key: str, session: str) -> list[bytes]:
    """Requests whose headers aiohttp refuses, each carrying a credential aiohttp would quote.

    aiohttp logs the raw header line of a value holding a control character,
    and the first 100 bytes of a header longer than 8,190 bytes.
    """
    start = b"GET /api/user/balance HTTP/1.1\r\nHost: x\r\n"
    bad = [f"Authorization: Bearer {key}{c}".encode() for c in ("\x01", "\x7f", "\x00")]
    bad += [
        f"Authorization: Bearer {key}{'A' * 9000}".encode(),
        f"Cookie: __session={session}{'A' * 9000}".encode(),
        f"Cookie: theme=dark; __session={session}\x01".encode(),
    ]
    return [start + line + b"\r\n\r\n" for line in bad]
