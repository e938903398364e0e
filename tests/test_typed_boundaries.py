"""Typed boundaries: admit.lua's reply read by name, closed string sets a typo cannot slip past.

The decoder is checked against the real script in Redis (and the local
fallback), not against a hand-written list: a change of the script's layout
that the decoder does not follow fails here.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from creditgate.config import Tier
from creditgate.throttle import Overrides, Throttle, resolve
from creditgate.throttle.local import LocalStore
from creditgate.throttle.resp import RedisPipe
from creditgate.throttle.script import Ack, Deciding, Decision, Head, ScopeReply, decode
from tests.conftest import Services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def throttle(services: Services) -> AsyncIterator[Throttle]:
    pipe = RedisPipe(services.redis_url)
    t = Throttle(pipe, policy="closed", timeout_ms=2000)
    await t.start()
    try:
        yield t
    finally:
        await t.aclose()
        await pipe.aclose()


async def test_decode_names_each_value_of_the_scripts_reply(throttle: Throttle) -> None:
    """Account and key scope, admit then refuse: every field is the value its name says."""
    limits = resolve(
        uuid.uuid4(),
        uuid.uuid4(),
        Tier("t", 6, 600, 2, 4),
        key=Overrides(tokens_per_minute=300),
    )
    local = LocalStore()
    call = throttle._call(limits, "a", 1, 200, "lease-1", 1)
    raw = await throttle._call_redis(call)
    assert raw is not None
    for reply in (decode("a", raw), decode("a", local.run(call.keys, call.args))):
        assert reply.allowed and reply.deciding is None and reply.retry_after_ms == 0
        assert reply.day == throttle.day_zone.day_number()
        account, key = reply.scopes
        assert (account.requests_remaining, account.tokens_remaining) == (5, 400)
        assert (account.parallel_remaining, account.messages_remaining) == (1, 3)
        # The key limits only tokens: the others are "not limited" (-1) in its scope.
        assert key == ScopeReply(-1, 0, 100, key.tokens_reset_ms, -1, -1)
        assert key.tokens_reset_ms > 0 and account.requests_reset_ms > 0

    # 200 tokens more: the key's bucket (100 left) refuses, not the account's.
    refused = await throttle._call_redis(throttle._call(limits, "q", 1, 200, "x", 1))
    assert refused is not None
    decision = decode("q", refused)
    assert not decision.allowed
    assert decision.deciding == Deciding(1, "tokens_per_minute")
    assert decision.retry_after_ms > 0

    back = await throttle._call_redis(throttle._call(limits, "r", 0, -200, "lease-1", ""))
    assert back is not None
    assert decode("r", back) == Ack(throttle.day_zone.day_number())


def test_decode_refuses_a_reply_of_another_shape() -> None:
    with pytest.raises(ValueError, match="unexpected length"):
        decode("a", [1, 0, 0])
    with pytest.raises(ValueError, match="unexpected length"):
        decode("a", [1, 0, 0, 20000, 5, 1000])  # a scope cut short
    assert decode("a", [0, 4, 86_000, 20_000, 5, 1, 9, 2, 0, 0]) == Decision(
        False, Deciding(0, "messages_per_day"), 86_000, 20_000, (ScopeReply(5, 1, 9, 2, 0, 0),)
    )


def test_the_head_names_the_arguments_in_the_scripts_order() -> None:
    head = Head("r", 3_600_000, 7_200_000, 60_000, 0, -150, "lease", 20_000)
    args = head.args()
    assert args == ["r", 3_600_000, 7_200_000, 60_000, 0, -150, "lease", 20_000]
    assert Head.from_args([*args, 6, 600, 2, 4]) == head
    assert Head.from_args(["c", 0, 0, 1, 0, 0, "l", ""]).messages == ""
    with pytest.raises(ValueError, match="mode"):
        Head.from_args(["x", 0, 0, 1, 0, 0, "l", ""])


_TYPOS = """
import uuid

from creditgate.config import Product, Settings
from creditgate.doctor import Check
from creditgate.ledger import ensure_account, post_entry
from creditgate.ledger.db import Db
from creditgate.ledger.kinds import HoldOutcome
from creditgate.proxy.relay import StreamEnd
from creditgate.throttle import Admission, Limits, Throttle
from creditgate.throttle.resp import RedisPipe


def typos(pipe: RedisPipe, limits: Limits, admission: Admission, settings: Settings) -> None:
    Throttle(pipe, policy="lokal")
    limits.value("tokens_per_minut")
    admission.store = "rediss"
    end: StreamEnd = "idle-timeout"
    print(settings.throttle_on_redis_error == "close", end)


async def ledger_typos(db: Db, account_id: uuid.UUID) -> None:
    await ensure_account(db, "usr", "user_1")
    await post_entry(
        db, account_id=account_id, amount=1, kind="grnat", idempotency_key="k", reason="r"
    )
    outcome: HoldOutcome = "setled"
    print(outcome)
    print(Check("database", "okay", ""), Product("p", "packs", 1, None))
"""


def test_strict_mypy_catches_a_typo_in_a_closed_set(tmp_path: Path) -> None:
    """Policies, limit names, stores, stream ends, account and entry kinds, hold outcomes
    are Literal types: a misspelt one fails."""
    snippet = tmp_path / "typos.py"
    snippet.write_text(_TYPOS)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--strict-equality", str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if "error:" in line]
    flagged = {int(line.split(":")[1]) for line in lines}
    body = _TYPOS.splitlines()
    typos = ('"lokal"', '"tokens_per_minut"', '"rediss"', '"idle-timeout"', '"close"')
    for typo in (*typos, '"usr"', '"grnat"', '"setled"', '"okay"', '"packs"'):
        number = next(i + 1 for i, line in enumerate(body) if typo in line)
        assert number in flagged, (typo, result.stdout)
