"""Runs last (by name): no log line of the whole run holds a secret it used."""

from __future__ import annotations

import pytest

from tests.logcapture import LOG_DIR, SECRETS


def test_no_key_prompt_or_completion_in_any_log() -> None:
    files = sorted(LOG_DIR.glob("*.log"))
    lines = sum(f.read_bytes().count(b"\n") for f in files)
    if len(SECRETS) < 5 or lines < 50:
        pytest.skip("run with the whole suite: too few secrets or log lines to check")
    for f in files:
        text = f.read_text("utf-8", errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"a secret reached {f.name}"
