"""Speculative upstream calls (proxy.speculation): for an account recently
admitted, the upstream call starts with its admission and reservation. The
client gets exactly what the sequential path gives; a refusal drops the
upstream call, charges nothing and holds nothing; a refused account goes back
to the sequential path."""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from creditgate import ledger
from creditgate.http.state import STATE
from creditgate.proxy.mock_upstream import MockStats
from creditgate.proxy.speculation import Speculation
from tests.proxy.conftest import Outcome, outcome
from tests.proxy.test_faults import body, read_stream, wait_for


def speculated(outcome_: str) -> float:
    return (
        REGISTRY.get_sample_value("creditgate_upstream_speculation_total", {"outcome": outcome_})
        or 0.0
    )


async def emptied(db, account_id: uuid.UUID) -> Outcome:
    """Take the account's whole balance (an adjustment); its ledger from before."""
    before = await outcome(db, account_id)
    await ledger.post_entry(
        db,
        account_id=account_id,
        amount=-before.balance,
        kind="adjustment",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="emptied",
    )
    return before


def test_speculation_follows_admissions_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("creditgate.proxy.speculation.time.monotonic", lambda: now[0])
    s = Speculation(cooldown=60, max_accounts=2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert not s.allowed(a)  # never admitted here
    s.refused(a)  # refused before any admission: still waits for one
    now[0] += 61
    assert not s.allowed(a)
    s.admitted(a)
    assert s.allowed(a)
    s.refused(a)
    assert not s.allowed(a)
    s.admitted(a)  # a success does not end the cooldown
    assert not s.allowed(a)
    now[0] += 61
    assert s.allowed(a)
    s.admitted(b)
    s.admitted(c)  # over max_accounts: the least recently admitted (a) is forgotten
    assert not s.allowed(a) and s.allowed(b) and s.allowed(c)
    off = Speculation(enabled=False)
    off.admitted(a)
    assert not off.allowed(a)


async def test_calls_after_the_first_start_upstream_at_once_and_charge_the_same(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    holds = gw.server.app[STATE].holds
    used = speculated("used")
    unflushed = holds.unflushed_reserves
    first = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert first.status == 200 and speculated("used") == used  # sequential: never admitted before
    answers = [await first.json()]
    for _ in range(2):
        resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
        assert resp.status == 200
        answers.append(await resp.json())
    assert speculated("used") == used + 2
    assert mock_stats.requests[key] == 3
    # Non-streaming calls reserve without waiting for the flush (their settlement's covers it).
    assert holds.unflushed_reserves == unflushed + 3
    got = await outcome(db, c.account.id)
    assert got.holds == ["settled"] * 3 and got.reserved == 0
    assert [d.amount for d in got.debits] == [a["usage"]["cost_micros"] for a in answers]
    assert len({d.amount for d in got.debits}) == 1  # the same call costs the same either way

    # A stream, speculated too, reserves durably: its first bytes precede its settlement.
    resp = await gw.post(
        "/v1/chat/completions", json=body("mock-model", key, stream=True), headers=c.auth
    )
    events, _ = await read_stream(resp)
    assert resp.status == 200 and events[-1] == {"done": True}
    assert speculated("used") == used + 3 and holds.unflushed_reserves == unflushed + 3
    assert (await outcome(db, c.account.id)).holds == ["settled"] * 4


async def test_a_refused_reservation_drops_the_upstream_call_and_changes_nothing(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    assert (
        await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    ).status == 200
    # The account is emptied between two calls (as by another process or an admin).
    before = await emptied(db, c.account.id)
    dropped = speculated("dropped")
    resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert resp.status == 402
    assert (await resp.json())["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert speculated("dropped") == dropped + 1
    # The upstream may have seen the dropped call, at most once; nothing was held or charged.
    assert mock_stats.requests[key] in (1, 2)
    after = await outcome(db, c.account.id)
    assert after.holds == ["settled"] and after.reserved == 0 and after.balance == 0
    assert after.debits == before.debits
    # Refused, the account is back on the sequential path: the upstream is not called.
    seen = mock_stats.requests[key]
    resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert resp.status == 402 and mock_stats.requests[key] == seen
    assert speculated("dropped") == dropped + 1


async def test_a_refused_admission_drops_the_upstream_call_and_writes_nothing(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10, tier="tight")  # 2 requests per minute
    for _ in range(2):
        resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
        assert resp.status == 200
    dropped = speculated("dropped")
    resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["details"]["limit"] == "requests_per_minute"
    assert speculated("dropped") == dropped + 1
    # Refused before its reservation: the ledger is untouched (no hold written).
    got = await outcome(db, c.account.id)
    assert got.holds == ["settled"] * 2 and got.reserved == 0 and len(got.debits) == 2
    seen, holds = mock_stats.requests[key], got.holds
    resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert resp.status == 429 and mock_stats.requests[key] == seen  # sequential now
    assert (await outcome(db, c.account.id)).holds == holds


async def test_a_stream_dropped_after_it_started_is_closed(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    """The upstream's stream may be open when the refusal comes: it is closed, not read."""
    c = await customer_factory(10)
    ok = await gw.post(
        "/v1/chat/completions", json=body("mock-model", key, stream=True), headers=c.auth
    )
    await read_stream(ok)
    before = await emptied(db, c.account.id)
    # A slow stream: its first event comes at once, the rest would take seconds.
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, chunks=50, chunk_delay_ms=100),
        headers=c.auth,
    )
    assert resp.status == 402
    if mock_stats.requests[key] == 2:  # it reached the upstream: the upstream saw it cut
        await wait_for(lambda: mock_stats.cut[key] == 1, "the dropped stream closed")
    got = await outcome(db, c.account.id)
    assert got.holds == ["settled"] and got.reserved == 0 and got.debits == before.debits
