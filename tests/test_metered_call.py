"""``MeteredCall``'s exits against in-process fakes of its narrow interfaces.

The fakes implement ``proxy.ports.HoldBook`` and ``Admissions`` and record
what the call asked of them; no database, no Redis. What the real ledger and
throttle do with those requests is tested end to end elsewhere
(tests/test_chat_e2e.py, tests/proxy/). Each test pins one exit: settled
with the upstream's usage, settled on an estimate, released, closed unended,
settled after the database failed and came back, refused, hold lost.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from creditgate.config import Config, Tier, load_config
from creditgate.errors import ServiceUnavailable
from creditgate.ledger import Hold, Settlement, Usage
from creditgate.ledger.errors import HoldEnded, HoldNotFound
from creditgate.proxy import metering
from creditgate.proxy.metering import MeteredCall
from creditgate.proxy.ports import Admissions, HoldBook
from creditgate.proxy.pricing import cost_micros
from creditgate.proxy.request import ChatRequest, parse_chat_request
from creditgate.throttle import Admission, resolve

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


@dataclass
class FakeHolds:
    """A HoldBook that answers from a script: each settle pops the next outcome."""

    outcomes: list[Settlement | BaseException] = field(default_factory=list)
    settled: list[tuple[uuid.UUID, Usage]] = field(default_factory=list)
    released: list[uuid.UUID] = field(default_factory=list)
    progress: list[tuple[uuid.UUID, Usage]] = field(default_factory=list)

    def reserve_soon(self, **kw: Any) -> asyncio.Future[Hold]:
        raise AssertionError("a metered call never reserves")

    async def give_back(self, holding: asyncio.Future[Hold]) -> None:
        raise AssertionError("a metered call never gives back a reserve")

    def settle_soon(self, hold_id: uuid.UUID, usage: Usage) -> asyncio.Future[Settlement]:
        future: asyncio.Future[Settlement] = asyncio.get_running_loop().create_future()
        self.settled.append((hold_id, usage))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
        return future

    async def settle(self, hold_id: uuid.UUID, usage: Usage) -> Settlement:
        return await self.settle_soon(hold_id, usage)

    async def release(self, hold_id: uuid.UUID) -> bool:
        self.released.append(hold_id)
        return True

    async def record_progress(self, hold_id: uuid.UUID, usage: Usage) -> None:
        self.progress.append((hold_id, usage))


@dataclass
class FakeThrottle:
    """Admissions that records each ``finish`` (the correction the throttle would make)."""

    finished: list[tuple[Admission, int | None]] = field(default_factory=list)

    async def admit(self, limits: Any, tokens: int, *, required_tokens: int = 0) -> Admission:
        raise AssertionError("a metered call is made after its admission")

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        self.finished.append((admission, actual_tokens))
        admission.finished = True


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(None, {})  # the dev config: mock-model and its prices


def _call(
    config: Config, holds: FakeHolds, throttle: FakeThrottle, *, deadline_in: float = 60.0
) -> MeteredCall:
    # Typed as the interfaces: the fakes must satisfy them (mypy checks this file's calls).
    book: HoldBook = holds
    admissions: Admissions = throttle
    chat: ChatRequest = parse_chat_request(
        {"model": "mock-model", "messages": MESSAGES, "max_tokens": 100},
        config.models,
        config.estimate_bytes_per_token,
    )
    account = uuid.uuid4()
    limits = resolve(account, None, Tier("t", 60, 10**6, 8, 1000))
    admission = Admission(limits, chat.worst_case_tokens, "lease", 0, "redis")
    hold = Hold(uuid.uuid4(), account, 5_000)
    deadline = asyncio.get_running_loop().time() + deadline_in
    return MeteredCall(book, admissions, config, chat, hold, admission, "req-1", deadline)


def _settlement(debited: int, uncollected: int = 0) -> Settlement:
    return Settlement(uuid.uuid4(), debited, uncollected, replayed=False)


async def test_settle_charges_the_upstreams_usage_and_finishes_the_throttle(config: Config) -> None:
    cost = cost_micros(config.models["mock-model"], 12, 7)
    holds, throttle = FakeHolds([_settlement(cost)]), FakeThrottle()
    call = _call(config, holds, throttle)
    usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}

    charge = await call.settle(usage, text_bytes=40)

    breakdown = (("input", 12), ("output", 7))  # the counts by kind, kept on the debit
    assert holds.settled == [(call.hold.id, Usage(12, 7, cost, False, breakdown))]
    assert throttle.finished == [(call.admission, 19)]  # corrected by the actual tokens
    assert charge.usage == {**usage, "cost": charge.usage["cost"], "cost_micros": cost}
    await call.close()  # settled: nothing more to end
    assert holds.released == [] and len(throttle.finished) == 1
    with pytest.raises(AssertionError):
        await call.settle(usage, 40)  # a call is settled once


async def test_settle_without_usage_charges_an_estimate_capped_by_max_tokens(
    config: Config,
) -> None:
    holds, throttle = FakeHolds([_settlement(1)]), FakeThrottle()
    call = _call(config, holds, throttle)

    charge = await call.settle(None, text_bytes=10**6)  # far more text than 100 tokens

    (_, usage) = holds.settled[0]
    assert usage.estimated and usage.output_tokens == call.chat.worst_case_output_tokens == 100
    assert usage.input_tokens == call.chat.prompt_tokens_estimate
    assert charge.usage["estimated"] is True
    assert throttle.finished == [(call.admission, usage.input_tokens + usage.output_tokens)]


async def test_release_ends_the_hold_free_and_gives_the_throttle_everything_back(
    config: Config,
) -> None:
    holds, throttle = FakeHolds(), FakeThrottle()
    call = _call(config, holds, throttle)

    await call.release()
    await call.release()  # once only
    await call.close()

    assert holds.released == [call.hold.id]
    assert throttle.finished == [(call.admission, None)]  # None: never served
    assert holds.settled == []


async def test_close_releases_a_call_that_was_neither_settled_nor_released(
    config: Config,
) -> None:
    holds, throttle = FakeHolds(), FakeThrottle()
    call = _call(config, holds, throttle)

    await call.close()

    assert holds.released == [call.hold.id]
    assert throttle.finished == [(call.admission, None)]


async def test_settle_is_retried_while_the_database_fails_and_charges_once(
    config: Config,
) -> None:
    settlement = _settlement(700)
    lost = ConnectionResetError("connection lost")
    holds, throttle = FakeHolds([lost, OSError("restarting"), settlement]), FakeThrottle()
    call = _call(config, holds, throttle)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    charge = await call.settle(usage, 8)

    assert charge.settlement is settlement
    # The same hold and usage each time: idempotent by hold id in the real ledger.
    assert len(holds.settled) == 3 and len(set(holds.settled)) == 1
    assert throttle.finished == [(call.admission, 5)]  # corrected once, not per attempt
    await call.close()
    assert holds.released == []


async def test_settle_retries_stop_when_the_holds_margin_is_spent(config: Config) -> None:
    holds, throttle = FakeHolds([OSError("down"), OSError("still down")]), FakeThrottle()
    # The deadline long past: no retry budget left (the sweeper's turn).
    call = _call(config, holds, throttle, deadline_in=-(config.settle_margin_seconds + 1))

    with pytest.raises(OSError, match="still down"):
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)
    # The call gave up (the first try and one retry); its settlement goes on in
    # the background, failing here for good, and is cancelled at shutdown.
    assert await metering.finish_late_settlements(0.05) == 1


async def test_a_settlement_given_up_on_goes_on_in_the_background_until_it_commits(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served usage is never forgiven: the call fails, its settlement does not stop."""
    monkeypatch.setattr(metering, "LATE_SETTLE_FIRST_WAIT", 0.01)
    monkeypatch.setattr(metering, "LATE_SETTLE_MAX_WAIT", 0.02)
    done = Settlement(uuid.uuid4(), 3, 0, replayed=False)
    failures: list[Settlement | BaseException] = [OSError(f"down {i}") for i in range(5)]
    holds, throttle = FakeHolds([*failures, done]), FakeThrottle()
    call = _call(config, holds, throttle, deadline_in=-(config.settle_margin_seconds + 1))

    with pytest.raises(OSError, match="down 1"):
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)
    assert await metering.finish_late_settlements(5.0) == 0  # committed, none left
    assert len(holds.settled) == 6  # retried until the sixth try committed
    assert {hold_id for hold_id, _ in holds.settled} == {call.hold.id}
    assert {usage for _, usage in holds.settled} == {holds.settled[0][1]}  # same usage each time
    await call.close()
    assert holds.released == []  # never released: it was settled


async def test_a_background_settlement_stops_at_a_refusal(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "LATE_SETTLE_FIRST_WAIT", 0.01)
    refused: list[Settlement | BaseException] = [
        OSError("down"),
        OSError("still down"),
        OSError("down again"),
        HoldEnded("hold already ended (released)"),
    ]
    holds, throttle = FakeHolds(refused), FakeThrottle()
    call = _call(config, holds, throttle, deadline_in=-(config.settle_margin_seconds + 1))

    with pytest.raises(OSError, match="still down"):
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)
    assert await metering.finish_late_settlements(5.0) == 0
    assert len(holds.settled) == 4 and holds.outcomes == []  # stopped at the refusal


async def test_shutdown_cancels_a_background_settlement_still_failing(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metering, "LATE_SETTLE_FIRST_WAIT", 0.01)
    monkeypatch.setattr(metering, "LATE_SETTLE_MAX_WAIT", 0.02)
    failing: list[Settlement | BaseException] = [OSError("down")] * 10_000
    holds, throttle = FakeHolds(failing), FakeThrottle()
    call = _call(config, holds, throttle, deadline_in=-(config.settle_margin_seconds + 1))

    with pytest.raises(OSError):
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)
    assert await metering.finish_late_settlements(0.2) == 1  # cancelled; the sweeper's turn
    assert not metering._late_settlements


async def test_a_stream_records_its_progress_soon_after_its_first_text_then_each_interval(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed a moment into a stream still owes the prompt and that text:
    the first record falls due FIRST_PROGRESS_DELAY after the first text."""
    holds, throttle = FakeHolds([]), FakeThrottle()
    call = _call(config, holds, throttle)
    call.progress(0)  # no text yet: nothing owed beyond the hold's own record
    call.progress(10)  # the first text: its record is not due yet
    await asyncio.sleep(0)
    assert holds.progress == []
    await asyncio.sleep(metering.FIRST_PROGRESS_DELAY * 1.5)
    call.progress(30)
    await asyncio.sleep(0)
    assert [(h, u.input_tokens, u.estimated) for h, u in holds.progress] == [
        (call.hold.id, call.chat.prompt_tokens_estimate, True)
    ]
    first = holds.progress[0][1]
    assert first.output_tokens > 0 and first.cost > 0
    call.progress(60)  # within the interval: not yet
    await asyncio.sleep(0)
    assert len(holds.progress) == 1
    monkeypatch.setattr(metering, "PROGRESS_INTERVAL", 0.0)
    call.progress(90)  # the interval passed: a new, larger record
    await asyncio.sleep(0)
    assert len(holds.progress) == 2 and holds.progress[1][1].cost > first.cost


async def test_a_refusal_is_final_not_retried(config: Config) -> None:
    holds, throttle = FakeHolds([HoldEnded("hold already ended (released)")]), FakeThrottle()
    call = _call(config, holds, throttle)

    with pytest.raises(HoldEnded):
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)
    assert len(holds.settled) == 1
    assert throttle.finished == [(call.admission, 2)]


async def test_a_lost_hold_is_a_503_with_nothing_charged(config: Config) -> None:
    holds, throttle = FakeHolds([HoldNotFound("no such hold")]), FakeThrottle()
    call = _call(config, holds, throttle)

    with pytest.raises(ServiceUnavailable) as raised:
        await call.settle({"prompt_tokens": 1, "completion_tokens": 1}, 1)

    assert raised.value.status == 503 and "nothing was charged" in raised.value.message
    assert len(holds.settled) == 1  # not retried: a missing hold will not reappear
    assert throttle.finished == [(call.admission, 2)]  # the throttle corrected all the same
    await call.close()  # ended once: nothing released
    assert holds.released == []
