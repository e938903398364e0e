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
