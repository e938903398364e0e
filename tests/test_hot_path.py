"""The hot path's cheaper equivalents keep the guarantees of what they replaced (issue 9).

* cached metric children are the very children ``labels()`` exports;
* the throttle's reply wait (``_within``) times out like ``asyncio.timeout``
  around ``asyncio.shield``: the reply itself is never cancelled, so a late
  one can still be read, and a cancelled caller leaves it alone;
* a settle queued with ``settle_soon`` is committed even when its future is
  cancelled (the caller left) before the statement ran;
* without an ``x-correlation-id`` the correlation id is the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, Counter

from creditgate import ledger
from creditgate.http.labelled import cached_labels
from creditgate.ledger.group_commit import GroupCommit
from creditgate.throttle.core import _within


def test_cached_children_are_the_exported_ones() -> None:
    registry = CollectorRegistry()
    metric = Counter("hot_path_total", "test", ["route", "status"], registry=registry)
    child = cached_labels(metric)
    child("/v1/chat/completions", 200).inc()
    child("/v1/chat/completions", 200).inc(2)
    child("/v1/models", 404).inc()
    assert child("/v1/chat/completions", 200) is metric.labels("/v1/chat/completions", "200")
    value = registry.get_sample_value
    assert value("hot_path_total", {"route": "/v1/chat/completions", "status": "200"}) == 3
    assert value("hot_path_total", {"route": "/v1/models", "status": "404"}) == 1


async def test_within_returns_a_reply_that_comes_in_time() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, reply.set_result, "OK")
    assert await _within(reply, loop.time() + 5) == "OK"
    done: asyncio.Future[str] = loop.create_future()
    done.set_result("already")
    assert await _within(done, loop.time() - 1) == "already"  # no wait, whatever the deadline


async def test_within_times_out_without_cancelling_the_reply() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    seen: list[str] = []
    try:
        await _within(reply, loop.time() + 0.02)
    except TimeoutError:
        seen.append("timeout")
    assert seen == ["timeout"]
    assert not reply.cancelled()  # a late reply can still be read (the throttle's undo)
    reply.set_result("late")
    assert reply.result() == "late"


async def test_within_leaves_the_reply_alone_when_its_caller_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    waiting = asyncio.ensure_future(_within(reply, loop.time() + 5))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert waiting.cancelled() and not reply.cancelled()
    reply.set_exception(ConnectionError("gone"))  # and a failure is the reply's own
    try:
        await _within(reply, loop.time() + 5)
    except ConnectionError as e:
        assert str(e) == "gone"
    else:
        raise AssertionError("the reply's exception was not raised")


async def test_a_settle_whose_caller_left_is_still_committed(db: asyncpg.Pool) -> None:
    acct = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    await ledger.post_entry(
        db,
        account_id=acct.id,
        amount=1_000_000,
        kind="grant",
        idempotency_key=f"t:{uuid.uuid4()}",
        reason="test",
    )
    holds = GroupCommit(db, lanes=1)
    hold = await holds.reserve(
        hold_id=uuid.uuid4(), account_id=acct.id, amount=50_000, ttl_seconds=60
    )
    settling = holds.settle_soon(hold.id, ledger.Usage(10, 20, 12_345))
    settling.cancel()  # the caller stopped waiting before the statement ran
    for _ in range(200):  # at most ~10 s for the lane to finish
        row = await db.fetchrow(
            "SELECT balance, reserved FROM account_balances WHERE account_id = $1", acct.id
        )
        if row["reserved"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (row["balance"], row["reserved"]) == (1_000_000 - 12_345, 0)
    debits = await db.fetch(
        "SELECT amount FROM ledger_entries WHERE hold_id = $1 AND kind = 'debit'", hold.id
    )
    assert [d["amount"] for d in debits] == [-12_345]


async def test_correlation_id_defaults_to_the_request_id(cg: TestClient) -> None:
    resp = await cg.get("/health")
    made = resp.headers["x-request-id"]
    assert uuid.UUID(made) and resp.headers["x-correlation-id"] == made
    resp = await cg.get("/health", headers={"x-request-id": "req-1"})
    assert resp.headers["x-request-id"] == resp.headers["x-correlation-id"] == "req-1"
    resp = await cg.get("/health", headers={"x-request-id": "req-2", "x-correlation-id": "c.2"})
    assert (resp.headers["x-request-id"], resp.headers["x-correlation-id"]) == ("req-2", "c.2")
    # A malformed correlation id is replaced by a new id of its own.
    resp = await cg.get("/health", headers={"x-request-id": "req-3", "x-correlation-id": "a b"})
    assert resp.headers["x-request-id"] == "req-3"
    assert uuid.UUID(resp.headers["x-correlation-id"])
